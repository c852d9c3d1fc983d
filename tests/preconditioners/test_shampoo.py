"""Shampoo against brute force in float64, and ShampooCallback in Lightning."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_soo import PreconditionerManager, ShampooCallback, linalg
from tests.cases import MLP, LossRecorder, trainer
from tests.reference import module_grad_matrix, per_example_grads
from tests.reference import mse as mse

pytestmark = pytest.mark.usefixtures("float64")


def _step(module: nn.Module, x: Tensor, y: Tensor, damping: float = 0.1, grafting: str | None = None, **options):
    module.zero_grad()
    opts = {"beta": 0.0, "damping_mode": "absolute", **options}
    manager = PreconditionerManager(module, "shampoo", opts, damping=damping, grafting=grafting, kl_clip=None)
    manager.begin_step()
    (0.5 * (module(x) - y).square().flatten(1).sum(1)).mean().backward()
    g = module_grad_matrix(module).clone()
    manager.step()
    return next(iter(manager.layers.values())).preconditioner, g, module_grad_matrix(module)


def _root(m: Tensor, rho: float, e: float = 0.25) -> Tensor:
    lam, q = torch.linalg.eigh(m)
    return (q * (lam.clamp(min=0) + rho).pow(-e)) @ q.T


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_per_example_statistics_equal_explicit_sums(host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)  # both paths against brute force
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    pre, _, _ = _step(lin, x, y)
    gs = per_example_grads(lin, mse, x, y)  # (6, 3, 5)
    torch.testing.assert_close(pre.l, torch.einsum("nij,nkj->ik", gs, gs) / 6, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre.r, torch.einsum("nji,njk->ik", gs, gs) / 6, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_embedding_statistics(host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)  # both paths against brute force
    torch.manual_seed(1)
    emb = nn.Embedding(7, 3)
    idx, y = torch.randint(0, 7, (5,)), torch.randn(5, 3)
    pre, _, _ = _step(emb, idx, y)
    gs = per_example_grads(emb, mse, idx, y)  # (5, 3, 7): G_n = δ_n e_nᵀ
    torch.testing.assert_close(pre.l, torch.einsum("nij,nkj->ik", gs, gs) / 5, rtol=1e-12, atol=1e-12)
    assert pre.r.dim() == 1  # the one-hot side's statistic is exactly diagonal: stored as a vector
    torch.testing.assert_close(torch.diag(pre.r), torch.einsum("nji,njk->ik", gs, gs) / 5, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grafting", [None, "sgd"])
def test_rewritten_gradient_equals_dense_roots(grafting: str | None) -> None:
    torch.manual_seed(2)
    lin = nn.Linear(5, 4)
    x, y = torch.randn(8, 5), torch.randn(8, 4)
    pre, g, out = _step(lin, x, y, damping=0.05, grafting=grafting)
    expected = _root(pre.l, 0.05) @ g @ _root(pre.r, 0.05)
    if grafting == "sgd":
        expected = expected * g.norm() / expected.norm()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_classic_mode_relative_damping_and_matvec() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    pre, g, out = _step(lin, x, y, damping=1e-2, statistics="gradient", damping_mode="relative")
    assert not pre.uses_hooks
    torch.testing.assert_close(pre.l, g @ g.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre.r, g.T @ g, rtol=1e-12, atol=1e-12)
    rho_l = 1e-2 * float(torch.linalg.eigvalsh(pre.l).max())
    rho_r = 1e-2 * float(torch.linalg.eigvalsh(pre.r).max())
    torch.testing.assert_close(out, _root(pre.l, rho_l) @ g @ _root(pre.r, rho_r), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pre.curvature_matvec(out), g, rtol=1e-8, atol=1e-10)


def _block_diag_part(m: Tensor, size: int) -> Tensor:
    """The block-diagonal part of ``m`` for the library's equal-as-possible blocks of at most ``size``."""
    from lightning_soo.preconditioners.blocks import block_slices

    return torch.block_diag(*(m[s, s] for s in block_slices(m.shape[0], size)))


@pytest.mark.parametrize("statistics", ["per_example", "gradient"])
def test_blocks_over_max_factor_dim(statistics: str) -> None:
    torch.manual_seed(5)
    lin = nn.Linear(10, 7)  # sides 7 and 11, blocks of at most 3: (3, 2, 2) and (3, 3, 3, 2)
    x, y = torch.randn(9, 10), torch.randn(9, 7)
    pre, g, out = _step(lin, x, y, damping=0.05, max_factor_dim=3, statistics=statistics)
    assert [s.stop - s.start for s in pre.left.slices] == [3, 2, 2]
    assert [s.stop - s.start for s in pre.right.slices] == [3, 3, 3, 2]
    if statistics == "per_example":
        gs = per_example_grads(lin, mse, x, y)
        full_l, full_r = torch.einsum("nij,nkj->ik", gs, gs) / 9, torch.einsum("nji,njk->ik", gs, gs) / 9
    else:
        full_l, full_r = g @ g.T, g.T @ g
    torch.testing.assert_close(pre.l, _block_diag_part(full_l, 3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre.r, _block_diag_part(full_r, 3), rtol=1e-12, atol=1e-12)
    expected = _root(pre.l, 0.05) @ g @ _root(pre.r, 0.05)  # the root of a block-diagonal matrix, densely
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pre.curvature_matvec(pre.precondition(g)), g, rtol=1e-9, atol=1e-11)


def test_embedding_one_hot_side_is_diagonal_even_when_wide() -> None:
    torch.manual_seed(6)
    emb = nn.Embedding(50, 3)
    idx, y = torch.randint(0, 50, (20,)), torch.randn(20, 3)
    pre, g, out = _step(emb, idx, y, max_factor_dim=8)
    assert pre.r.dim() == 1 and pre.r.shape == (50,)
    gs = per_example_grads(emb, mse, idx, y)
    torch.testing.assert_close(torch.diag(pre.r), torch.einsum("nji,njk->ik", gs, gs) / 20, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, _root(pre.l, 0.1) @ g @ _root(torch.diag(pre.r), 0.1), rtol=1e-10, atol=1e-12)


def test_failed_refresh_keeps_last_root() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(3, 2)
    pre, g, _ = _step(lin, torch.randn(4, 3), torch.randn(4, 2))
    before = pre.precondition(g)
    pre.right.factors[0].value = pre.right.factors[0].value.clone().fill_(float("nan"))  # the right side fails
    assert pre.refresh(0.1) is False
    assert torch.equal(pre.precondition(g), before)  # neither side changed


def test_state_dict_round_trip_with_blocks() -> None:
    torch.manual_seed(7)
    lin = nn.Linear(6, 5)
    pre, g, _ = _step(lin, torch.randn(8, 6), torch.randn(8, 5), max_factor_dim=4)
    state = pre.state_dict()
    assert {"l.0", "l.1", "r_root.1", "r_lam.0"} <= set(state)
    from lightning_soo import Shampoo

    fresh = Shampoo(5, 7, dtype=torch.float64, device=torch.device("cpu"), options=pre.options)
    fresh.load_state_dict(state)
    assert fresh.ready and torch.equal(fresh.precondition(g), pre.precondition(g))


def test_callback_trains_and_validates() -> None:
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    rec = LossRecorder()
    cb = ShampooCallback()
    trainer(max_steps=30, callbacks=[cb, rec]).fit(MLP())
    losses = torch.tensor(rec.losses)
    assert torch.isfinite(losses).all() and losses[-5:].mean() < 0.7 * losses[:5].mean()
    assert cb.state_dict()["counters"]["preconditioned_steps"] == 30
    with pytest.raises(ValueError, match="`exponent`"):
        ShampooCallback(exponent=0)
    with pytest.raises(ValueError, match="`statistics`"):
        ShampooCallback(statistics="fisher")
