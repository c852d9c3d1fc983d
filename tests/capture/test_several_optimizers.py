"""Manual optimization with several optimizers (a GAN): capture is per layer, so each network's statistics come
from the passes of the batch up to its own optimizer step, in either order."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_soo import KFACCallback, ShampooCallback
from tests.cases import trainer

Z, X, B = 3, 4, 8


class GAN(L.LightningModule):
    def __init__(self, d_first: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.d_first = d_first
        self.generator = nn.Sequential(nn.Linear(Z, 8), nn.Tanh(), nn.Linear(8, X))
        self.discriminator = nn.Sequential(nn.Linear(X, 8), nn.Tanh(), nn.Linear(8, 1))

    def _d_step(self, real: Tensor, z: Tensor) -> None:
        _, opt_d = self.optimizers()
        fake = self.generator(z).detach()
        ones, zeros = torch.ones(B, 1), torch.zeros(B, 1)
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        loss = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        opt_d.zero_grad()
        self.manual_backward(loss)
        opt_d.step()

    def _g_step(self, z: Tensor) -> None:
        opt_g, _ = self.optimizers()
        loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z)), torch.ones(B, 1))
        opt_g.zero_grad()
        self.manual_backward(loss)
        opt_g.step()

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        (real,) = batch
        z = torch.randn(B, Z)
        if self.d_first:
            self._d_step(real, z)
            self._g_step(z)
        else:
            self._g_step(z)
            self._d_step(real, z)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.generator.parameters(), lr=0.01, momentum=0.9),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.01, momentum=0.9),
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4 * B, X, generator=torch.Generator().manual_seed(0)) + 3.0), B)


@pytest.mark.parametrize("callback", [KFACCallback, ShampooCallback])
@pytest.mark.parametrize("d_first", [True, False])
def test_both_networks_preconditioned_and_d_sees_real_data(d_first: bool, callback: type) -> None:
    torch.manual_seed(0)
    module = GAN(d_first)
    cb = callback(preconditioner_interval=1)
    seen: list[Tensor] = []
    managers = []

    class Spy(L.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            managers.append(cb.manager)
            pre = cb.manager.layers["discriminator.0"].preconditioner
            observe = pre.observe  # every call's rows pass through it, whatever the method

            def spy(obs, rows, scale=1.0):
                seen.append(obs.h.detach().clone())
                return observe(obs, rows, scale)

            pre.observe = spy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=3, callbacks=[cb, Spy()]).fit(module)
    (manager,) = managers
    assert len(manager.layers) == 4
    assert all(layer.preconditioner.ready for layer in manager.layers.values())
    assert not [w for w in caught if "never ran" in str(w.message)]
    real = next(iter(module.train_dataloader()))[0]
    rows = torch.cat(seen)[:, :X]
    assert any(torch.allclose(rows[i : i + B], real) for i in range(rows.shape[0] - B + 1)), "D never saw real data"
