"""On the CPU the hot path reads its flags on the host (free there) and skips the ``torch.where`` passes an
accelerator needs (``linalg.HOST_DECIDES_ON_CPU``). Both paths must compute the same thing: the gradients written
(KL clip, grafting, norm cap, a non-finite preconditioner) and the factors folded (non-finite statistics, a step of
padding only, every decay, a layer called twice)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager, linalg
from tests.engine.test_batched import _written

OPTIONS = [
    {},
    {"kl_clip": 1e-3, "grafting": "sgd", "max_update_norm": 0.05},
    {"kl_clip": None},  # finiteness from a sum of P·G
    {"kl_clip": None, "grafting": "sgd"},  # finiteness from the norm grafting computes
]


@pytest.mark.parametrize("poison", [False, True], ids=["finite", "poisoned"])
@pytest.mark.parametrize("options", OPTIONS, ids=["defaults", "all-on", "no-clip", "no-clip-grafted"])
def test_the_gradients_written(options: dict, poison: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    on_device = _written(False, monkeypatch, poison=poison, host=False, **options)
    on_host = _written(False, monkeypatch, poison=poison, host=True, **options)
    for a, b in zip(on_host, on_device, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _Twice(nn.Module):
    """A layer called twice per step: its statistics gather two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.mid(h)))


def _factors(method: str, host: bool, options: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[list, dict]:
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
    torch.manual_seed(0)
    model = _Twice().double()
    manager = PreconditionerManager(model, method, options, preconditioner_interval=2, warn=lambda m: None)
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        x = torch.randn(16, 5, dtype=torch.float64, generator=gen)
        weight = torch.ones(16, 1, dtype=torch.float64)
        if step == 2:
            x[3, 1] = math.nan  # non-finite statistics: skipped
        if step == 4:
            weight.zero_()  # every row is padding: nothing folds
        manager.begin_step()
        (model(x).square() * weight).mean().backward()
        manager.step()
        model.zero_grad()
    tensors = [t.clone() for layer in manager.layers.values() for t in layer.preconditioner.curvature_state()]
    return tensors, dict(manager.counters)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("kfac", {}),
        ("kfac", {"factor_decay": 0.0}),
        ("shampoo", {}),
        ("shampoo", {"accumulate": "sum"}),
        ("gauss_newton", {}),
        ("psgd", {}),
    ],
    ids=["kfac", "kfac-latest", "shampoo", "shampoo-adagrad", "gauss_newton", "psgd"],
)
def test_the_factors_folded(method: str, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    on_device, device_counters = _factors(method, False, options, monkeypatch)
    on_host, host_counters = _factors(method, True, options, monkeypatch)
    assert host_counters == device_counters and host_counters["skipped_statistics"] >= 1
    assert len(on_host) == len(on_device) > 0
    for a, b in zip(on_host, on_device, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["random", "zero", "nan"])
def test_psgd_norm_bound(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_soo.preconditioners.psgd import norm_lower_bound

    a = torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = {"random": a + a.T, "zero": torch.zeros_like(a), "nan": torch.full_like(a, math.nan)}[kind]
    bounds = []
    for host in (True, False):
        monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
        bounds.append(norm_lower_bound(a))
    torch.testing.assert_close(bounds[0], bounds[1], rtol=1e-12, atol=0)
    if kind == "random":
        assert 0 < bounds[0] <= torch.linalg.matrix_norm(a, 2) * (1 + 1e-12)
