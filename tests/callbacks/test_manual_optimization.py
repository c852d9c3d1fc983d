"""Manual optimization: gradient accumulation written in ``training_step`` (the loss divided by k, a step every k
batches, as Lightning's documentation writes it) equals ``accumulate_grad_batches=k``; and ``CurvatureScheduler``
freezes after its fraction of training when two optimizers step per batch (``global_step`` then counts two per
batch, and ``estimated_stepping_batches`` counts steps under ``max_steps``, batches under ``max_epochs``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_soo import CurvatureScheduler, GaussNewtonCallback, KFACCallback, ShampooCallback
from tests.cases import classification_data, trainer

K, STEPS = 2, 3
CALLBACKS = {"kfac": KFACCallback, "shampoo": ShampooCallback, "gauss_newton": GaussNewtonCallback}
# the curvature's scale shows: no grafting, absolute damping (relative damping and grafting undo a common scale)
OPTIONS: dict[str, dict[str, object]] = {
    "kfac": {},
    "shampoo": {"grafting": None},
    "gauss_newton": {"grafting": None, "damping": 1e-2, "damping_mode": "absolute"},
}


class Auto(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).double()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x.double()), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(classification_data(n=K * STEPS * 10), batch_size=10)


class Manual(Auto):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:  # type: ignore[override]
        opt = self.optimizers()
        x, y = batch
        self.manual_backward(F.cross_entropy(self.net(x.double()), y) / K)
        if (batch_idx + 1) % K == 0:
            opt.step()  # type: ignore[union-attr]
            opt.zero_grad()  # type: ignore[union-attr]


@pytest.mark.parametrize("method", list(CALLBACKS))
def test_manual_accumulation_equals_automatic(method: str) -> None:
    """The statistics of the k batches were taken as one batch's (the loss's 1/k not undone): K-FAC's update
    75% off the automatic one, Shampoo's 29%, Gauss-Newton's 118%."""
    params = []
    for module, acc in ((Auto(), K), (Manual(), 1)):
        callback = CALLBACKS[method](preconditioner_interval=1, kl_clip=None, **OPTIONS[method])
        trainer(max_epochs=1, accumulate_grad_batches=acc, callbacks=[callback]).fit(module)
        params.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-12, atol=1e-12)


class GAN(L.LightningModule):
    """Two optimizers stepping per batch (a GAN's generator and discriminator, shapes only)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen, self.disc = nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:  # type: ignore[override]
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        (z,) = batch
        for opt, loss in (
            (opt_d, lambda: self.disc(self.gen(z).detach()).mean()),
            (opt_g, lambda: -self.disc(self.gen(z)).mean()),
        ):
            self.toggle_optimizer(opt)
            opt.zero_grad()
            self.manual_backward(loss())
            opt.step()
            self.untoggle_optimizer(opt)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.gen.parameters(), lr=0.01), torch.optim.SGD(self.disc.parameters(), lr=0.01)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(80, 4)), batch_size=10)


class FrozenAt(Callback):
    def __init__(self, method: KFACCallback) -> None:
        self.method, self.batch = method, -1

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        manager = self.method.manager
        if self.batch < 0 and manager is not None and manager.frozen:
            self.batch = trainer.fit_loop.epoch_loop.total_batch_idx


@pytest.mark.parametrize("limit", [{"max_steps": 16}, {"max_epochs": 1}])
def test_two_optimizers_per_batch_freeze_after_the_fraction(limit: dict[str, int]) -> None:
    """8 batches, 16 optimizer steps: frozen at the 5th batch (index 4) either way; under ``max_steps`` the phase
    used to last 8 of the 8 batches, so curvature never froze."""
    torch.manual_seed(0)
    method = KFACCallback()
    spy = FrozenAt(method)
    scheduler = CurvatureScheduler(frequent_fraction=0.5, frequent_interval=1, quality_every_n_steps=None)
    trainer(callbacks=[method, scheduler, spy], **limit).fit(GAN())
    assert spy.batch == 4
