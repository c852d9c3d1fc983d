"""torch.compile inside a LightningModule: the callback captures statistics and matches the eager run."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_soo import KFACCallback
from tests.cases import trainer


class Net(L.LightningModule):
    def __init__(self, compiled: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
        self.net = torch.compile(net) if compiled else net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_compiled_module_matches_eager() -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    results = []
    for compiled in (False, True):
        model = Net(compiled)
        cb = KFACCallback(statistics_interval=2, preconditioner_interval=2)
        trainer(max_steps=6, callbacks=[cb]).fit(model, DataLoader(data, batch_size=16))
        state = cb.state_dict()
        assert state["counters"]["preconditioned_steps"] == 6
        factors = [(s["a"], s["b"]) for s in state["layers"].values()]
        results.append((factors, [p.detach() for p in model.parameters()]))
    (f_eager, p_eager), (f_comp, p_comp) = results
    for (a1, b1), (a2, b2) in zip(f_eager, f_comp, strict=True):
        torch.testing.assert_close(a1, a2, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b1, b2, rtol=1e-4, atol=1e-6)
    for p1, p2 in zip(p_eager, p_comp, strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)


def test_compiled_modules_keep_their_eager_names() -> None:
    """Under ``torch.compile`` module names gain ``_orig_mod.``: exclude patterns and layer names use eager names."""
    from torch import nn

    from lightning_soo import PreconditionerManager

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.compile(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))

    eager = PreconditionerManager(Net(), exclude=["net.2"])
    assert list(eager.layers) == ["net.0"]
    compiled_root = PreconditionerManager(torch.compile(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))))
    assert list(compiled_root.layers) == ["0", "1"]


def test_a_model_with_nothing_to_precondition_says_so() -> None:
    from torch import nn

    from lightning_soo import PreconditionerManager

    messages: list[str] = []
    PreconditionerManager(nn.Sequential(nn.LayerNorm(3), nn.GRU(3, 3)), warn=messages.append)
    assert len(messages) == 1 and "no layer KFAC can precondition" in messages[0] and "0.weight" in messages[0]


class LayerNorm2d(nn.LayerNorm):
    """torchvision's and timm's ConvNeXt form: a LayerNorm over channels of a channels-first map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias).permute(0, 3, 1, 2)


class Casted(nn.Linear):
    """A subclass of ``nn.Linear`` overriding forward: captured at its ``F.linear`` call, under Dynamo too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * 2.0


def test_compiled_convnext_shape_and_an_overridden_layer_match_eager() -> None:
    """The census's step under Dynamo crashed on ConvNeXt's channels-last LayerNorm (``NameError:
    ___get_torch_function_mode_stack_at``): it runs eagerly now; a layer captured at its functional call got no
    statistics from compiled steps (its update 15% off the eager one)."""
    from lightning_soo import PreconditionerManager

    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), LayerNorm2d(4), nn.Flatten(), Casted(16, 5), nn.Linear(5, 3))
        model = torch.compile(net) if compiled else net
        manager = PreconditionerManager(model, preconditioner_interval=1, warn=lambda m: None)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            x, y = torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            manager.begin_step(batch_size=8)
            F.cross_entropy(model(x), y).backward()
            manager.step(opt)
            grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
            opt.step()
        assert set(manager.layers) == {"0", "3", "4"}
    for eager, comp in zip(grads[:3], grads[3:], strict=True):
        for name, g in eager.items():
            torch.testing.assert_close(comp[name], g, rtol=1e-4, atol=1e-6, msg=name)
