"""Batched refreshes (one decomposition per factor shape) give the preconditioners the layer-by-layer path gives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager

pytestmark = pytest.mark.usefixtures("float64", "batched")


@pytest.fixture
def batched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stack CPU matrices as an accelerator does (on the CPU the library decomposes them one by one)."""
    from lightning_soo import linalg

    monkeypatch.setattr(linalg, "BATCH_ON_CPU", True)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("kfac", {"inverse": "cholesky"}),
        ("kfac", {"inverse": "eigen"}),
        ("kfac", {"max_factor_dim": 5}),
        ("shampoo", {}),
        ("shampoo", {"damping_mode": "absolute", "max_factor_dim": 3}),
        ("gauss_newton", {}),
        ("gauss_newton", {"damping_mode": "absolute"}),
    ],
)
def test_batched_refresh_equals_layer_by_layer(method: str, options: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 3))
    manager = PreconditionerManager(model, method, options, preconditioner_interval=1000)
    manager.begin_step()
    model(torch.randn(16, 4)).square().mean().backward()
    manager.step()  # step 0 refreshes: the batched path
    pres = [layer.preconditioner for layer in manager.layers.values()]
    singles = copy.deepcopy(pres)
    for p in singles:
        assert p.refresh(1e-2)
    assert type(pres[0]).refresh_many(pres, 1e-2) == [True] * len(pres)
    g = torch.Generator().manual_seed(1)
    for batched, single in zip(pres, singles, strict=True):
        v = torch.randn(batched.d_out, batched.d_in, generator=g)
        torch.testing.assert_close(batched.precondition(v), single.precondition(v), rtol=1e-10, atol=1e-12)


def test_a_failing_member_falls_back_alone() -> None:
    """A non-finite factor in a batch fails its own layer only; the others refresh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    manager = PreconditionerManager(model, preconditioner_interval=1000, warn=lambda m: None)
    manager.begin_step()
    model(torch.randn(8, 4)).square().mean().backward()
    manager.step()
    pres = [layer.preconditioner for layer in manager.layers.values()]
    pres[1].a = torch.full_like(pres[1].a, float("nan"))
    assert type(pres[0]).refresh_many(pres, 1e-2) == [True, False, True]


def test_a_singular_member_does_not_stop_the_batch() -> None:
    """Cholesky fails on one member (a zero factor with no damping to speak of): it falls back alone."""
    from lightning_soo import linalg

    good = torch.eye(3) * 2.0
    bad = torch.zeros(3, 3)
    invs = linalg.damped_inverse_many([good, bad, good], [0.5, 0.0, 0.5])
    torch.testing.assert_close(invs[0], torch.eye(3) / 2.5)
    torch.testing.assert_close(invs[2], torch.eye(3) / 2.5)
    assert invs[1] is None or torch.isfinite(invs[1]).all()


@pytest.mark.parametrize("damping_mode", ["relative", "absolute"])
def test_gauss_newton_a_non_finite_member_fails_alone(damping_mode: str) -> None:
    """Gauss-Newton's Grams of one size are scaled and factored as a stack; a member whose rows are not finite fails
    its own refresh (keeping its last preconditioner), the others refresh as they would alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    options = {"damping_mode": damping_mode}
    manager = PreconditionerManager(model, "gauss_newton", options, preconditioner_interval=1000, warn=lambda m: None)
    manager.begin_step()
    model(torch.randn(8, 4)).square().mean().backward()
    manager.step()
    pres = [layer.preconditioner for layer in manager.layers.values()]
    singles = copy.deepcopy(pres)
    before = pres[1].chol.clone()
    pres[1].latest.d[0, 0] = float("nan")
    assert type(pres[0]).refresh_many(pres, 1e-2) == [True, False, True]
    torch.testing.assert_close(pres[1].chol, before, rtol=0, atol=0)
    for i in (0, 2):
        assert singles[i].refresh(1e-2)
        torch.testing.assert_close(pres[i].chol, singles[i].chol, rtol=1e-10, atol=1e-12)
        assert pres[i].damping == pytest.approx(singles[i].damping, rel=1e-10)
