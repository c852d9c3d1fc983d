"""Model code people train (transformers' GPT-2, Llama tied and untied, ViT and ResNet; ``nn.TransformerEncoder``;
a nanoGPT-style tied model), tiny and randomly initialised: coverage (share of trainable elements whose gradient
was rewritten, measured by comparing gradients before and after), finite and falling losses, and
``CurvatureScheduler()`` with defaults and ``PSGDCallback(fit="hessian")`` training them under Lightning.

torchvision's and timm's own models run too where torchvision imports (``importorskip``): PyPI's torchvision wheel
is CUDA-built and its C ops fail to register beside the CPU torch wheel, which also breaks ``import lightning``,
so the test extra installs neither; transformers' ResNet is the torchvision architecture without it.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_soo import CurvatureScheduler, KFACCallback, PSGDCallback
from tests.cases import trainer
from tests.integration.real_models import CASES, coverage

pytest.importorskip("transformers")
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore")]
TIED = ("gpt2", "llama tied", "nanogpt tied")


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
@pytest.mark.parametrize("name", list(CASES))
def test_coverage_and_falling_loss(name: str, method: str) -> None:
    torch.manual_seed(0)
    model, batch, loss_fn = CASES[name]()
    share, losses = coverage(model, batch, loss_fn, method, steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    if method == "gauss_newton" and name in TIED:  # a weight tied in two orientations stays plain (said why)
        assert share > 0.75
    else:
        assert share >= 0.95, share


class Wrapped(L.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.model, self.batch, self.loss_fn = CASES[name]()

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        return self.loss_fn(self.model, batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.batch.repeat(3, *([1] * (self.batch.dim() - 1)))), len(self.batch))


@pytest.mark.parametrize("which", ["scheduler", "psgd_hessian"])
@pytest.mark.parametrize("name", list(CASES))
def test_trains_under_lightning(name: str, which: str) -> None:
    torch.manual_seed(0)
    module = Wrapped(name)
    callbacks = [KFACCallback(), CurvatureScheduler()] if which == "scheduler" else [PSGDCallback(fit="hessian")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=3, callbacks=callbacks).fit(module)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert not [w for w in caught if "could not be made" in str(w.message)]
    if which == "scheduler":
        assert callbacks[1].last_quality  # measured at step 0
        index = next(v for k, v in callbacks[1].last_quality.items() if k.endswith("quality_index/model"))
        assert index == index and index > 0


def _torchvision_resnet() -> nn.Module:
    models = pytest.importorskip("torchvision.models")
    return models.resnet18(num_classes=4)


def _timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4)


@pytest.mark.parametrize("make", [_torchvision_resnet, _timm_vit])
def test_torchvision_and_timm_where_installed(make) -> None:
    model = make()
    x = torch.randn(4, 3, 32, 32)
    share, losses = coverage(model, x, lambda m, b: nn.functional.cross_entropy(m(b), torch.arange(4)), "kfac", 3)
    assert share >= 0.95 and losses[-1] < losses[0]
