"""Shampoo against brute force in float64, and ShampooCallback in Lightning."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_soo import PreconditionerManager, ShampooCallback
from tests.lightning_models import MLP, LossRecorder, trainer
from tests.reference import module_grad_matrix, per_example_grads


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out - y).square().flatten(1).sum(1).sum()


def _step(module: nn.Module, x: Tensor, y: Tensor, damping: float = 0.1, **options) -> tuple:
    module.zero_grad()
    opts = {"beta": 0.0, "damping_mode": "absolute", "grafting": None, **options}
    manager = PreconditionerManager(module, "shampoo", opts, damping=damping)
    manager.begin_step()
    (0.5 * (module(x) - y).square().flatten(1).sum(1)).mean().backward()
    g = module_grad_matrix(module).clone()
    manager.step()
    return next(iter(manager.layers.values())).preconditioner, g, module_grad_matrix(module)


def _root(m: Tensor, rho: float, e: float = 0.25) -> Tensor:
    lam, q = torch.linalg.eigh(m)
    return (q * (lam.clamp(min=0) + rho).pow(-e)) @ q.T


def test_per_example_statistics_equal_explicit_sums() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    pre, _, _ = _step(lin, x, y)
    gs = per_example_grads(lin, _mse, x, y)  # (6, 3, 5)
    torch.testing.assert_close(pre.l, torch.einsum("nij,nkj->ik", gs, gs) / 6, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre.r, torch.einsum("nji,njk->ik", gs, gs) / 6, rtol=1e-12, atol=1e-12)


def test_embedding_statistics() -> None:
    torch.manual_seed(1)
    emb = nn.Embedding(7, 3)
    idx, y = torch.randint(0, 7, (5,)), torch.randn(5, 3)
    pre, _, _ = _step(emb, idx, y)
    gs = per_example_grads(emb, _mse, idx, y)  # (5, 3, 7): G_n = δ_n e_nᵀ
    torch.testing.assert_close(pre.l, torch.einsum("nij,nkj->ik", gs, gs) / 5, rtol=1e-12, atol=1e-12)
    assert pre.r.dim() == 2  # one-hot side kept as a dense diagonal matrix at this size
    torch.testing.assert_close(pre.r, torch.einsum("nji,njk->ik", gs, gs) / 5, rtol=1e-12, atol=1e-12)


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


def test_failed_refresh_keeps_last_root() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(3, 2)
    pre, _, _ = _step(lin, torch.randn(4, 3), torch.randn(4, 2))
    root = pre.l_root.clone()
    pre.l = pre.l.clone().fill_(float("nan"))
    assert pre.refresh(0.1) is False
    assert torch.equal(pre.l_root, root)


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
