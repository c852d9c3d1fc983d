"""PSGD (Kron): the fitted preconditioner reaches its fixed points on problems with a known answer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_soo.preconditioners import PSGD
from lightning_soo.preconditioners.psgd import norm_lower_bound, update_probability
from tests.reference import newton_fit_conditions, spd

F64, CPU = torch.float64, torch.device("cpu")


def _sqrt(m: Tensor) -> Tensor:
    lam, q = torch.linalg.eigh(m)
    return (q * lam.sqrt()) @ q.T


def _spread(samples: Tensor) -> float:
    """max/min eigenvalue of the covariance of the flattened samples."""
    flat = samples.reshape(samples.shape[0], -1)
    lam = torch.linalg.eigvalsh(flat.T @ flat / flat.shape[0])
    return float(lam.max() / lam.min())


@pytest.mark.parametrize("max_factor_dim", [64, 4], ids=["triangular", "diagonal-left"])
def test_whitening_fixed_point(max_factor_dim: int) -> None:
    """Gradients from a Kronecker-structured Gaussian (covariance spread 100): after enough fitting steps (the
    preconditioner's step annealed, as for any stochastic fixed point) P·G is white: spread under 1.5."""
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 5, 4
    left, right = spd(d_out, 10.0, g), spd(d_in, 10.0, g)  # vec covariance kron(L, R): spread 100
    if max_factor_dim < d_out:
        left = torch.diag(torch.logspace(0, 1, d_out, dtype=F64))  # a diagonal factor whitens a diagonal side
    sl, sr = _sqrt(left), _sqrt(right)

    def draw(n: int) -> Tensor:
        return sl @ torch.randn(n, d_out, d_in, generator=g, dtype=F64) @ sr

    pre = PSGD(d_out, d_in, dtype=F64, device=CPU, max_factor_dim=max_factor_dim, min_update_probability=1.0)
    assert pre.q_l is None and pre.update_due()
    anneal = {1000: 0.02, 3000: 0.005, 5000: 0.002}
    for step, grad in enumerate(draw(8000)):
        pre.lr_preconditioner = anneal.get(step, pre.lr_preconditioner)
        pre.observe_grad(grad)
        assert _accepted(pre.close_statistics(1.0))
    assert pre.refresh(0.0) is True and pre.updates == 8000
    assert pre.q_l.dim() == (1 if max_factor_dim < d_out else 2) and pre.q_r.dim() == 2
    fresh = draw(20000)
    raw, whitened = _spread(fresh), _spread(torch.stack([pre.precondition(x) for x in fresh]))
    assert raw > 90.0 and whitened < 1.5, (raw, whitened)


def _accepted(flag: Tensor | None) -> bool:
    """``close_statistics`` folded a pair: it returned a device flag that says the statistics were kept."""
    return flag is not None and bool(flag)


def test_newton_form_fits_inverse_hessian_of_a_quadratic() -> None:
    """loss = ½ tr(Wᵀ A W B) has the Kronecker Hessian A ⊗ B; the Newton form drives P·H towards the identity."""
    lin = nn.Linear(3, 4, bias=False).double()
    fitted, hessian = newton_fit_conditions(lin, "", lambda: lin.weight)
    assert fitted < 1.5 and hessian > 90  # against cond(H) = 100 for SGD


def test_curvature_matvec_inverts_precondition() -> None:
    g = torch.Generator().manual_seed(2)
    pre = PSGD(4, 6, dtype=F64, device=CPU, max_factor_dim=5)  # triangular left, diagonal right
    for grad in torch.randn(50, 4, 6, generator=g, dtype=F64) * torch.linspace(0.1, 3, 6, dtype=F64):
        pre.observe_grad(grad)
        pre.close_statistics(1.0)
    pre.refresh(0.0)
    v = torch.randn(4, 6, generator=g, dtype=F64)
    torch.testing.assert_close(pre.curvature_matvec(pre.precondition(v)), v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pre.q_l, torch.triu(pre.q_l))  # Q stays upper triangular


def test_schedule_and_state_round_trip() -> None:
    assert update_probability(0, 1.0, 0.03, 0.001, 500) == 1.0
    assert update_probability(10_000, 1.0, 0.03, 0.001, 500) == 0.03
    pre = PSGD(3, 2, dtype=F64, device=CPU, max_update_probability=0.25, min_update_probability=0.25)
    grads = torch.randn(13, 3, 2, dtype=F64)
    done = []
    for grad in grads[:12]:
        pre.observe_grad(grad)
        done.append(_accepted(pre.close_statistics(1.0)))
    assert done == [True, False, False, False] * 3  # p = 1/4: every fourth step, the first always
    pre.refresh(0.0)
    twin = PSGD(3, 2, dtype=F64, device=CPU, max_update_probability=0.25, min_update_probability=0.25)
    twin.load_state_dict(pre.state_dict())
    for p in (pre, twin):  # the same schedule position and probe stream after a resume
        for grad in grads[12:]:
            p.observe_grad(grad)
            p.close_statistics(1.0)
        p.refresh(0.0)
    assert torch.equal(pre.q_l, twin.q_l) and torch.equal(pre.precondition(grads[0]), twin.precondition(grads[0]))


def test_non_finite_gradient_keeps_q_and_norm_bound() -> None:
    pre = PSGD(3, 2, dtype=F64, device=CPU)
    pre.observe_grad(torch.randn(3, 2, dtype=F64))
    pre.close_statistics(1.0)
    q = pre.q_l.clone()
    pre.observe_grad(torch.full((3, 2), float("nan"), dtype=F64))
    kept = pre.close_statistics(1.0)
    assert kept is not None and not bool(kept) and torch.equal(pre.q_l, q)
    m = torch.randn(6, 6, dtype=F64)
    m = m @ m.T
    bound, norm = float(norm_lower_bound(m)), float(torch.linalg.matrix_norm(m, 2))
    assert norm / 2**0.5 <= bound <= norm * (1 + 1e-12)


@pytest.mark.parametrize("n", [7, 600, 1100])
def test_triangular_products_equal_dense(n: int) -> None:
    from lightning_soo.preconditioners.psgd_math import factor_gram, triu_matmul

    g = torch.Generator().manual_seed(n)
    q = torch.triu(torch.randn(n, n, generator=g, dtype=F64))
    t = torch.randn(n, n, generator=g, dtype=F64)
    torch.testing.assert_close(triu_matmul(t, q), torch.triu(t) @ q, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(factor_gram(q), q.T @ q, rtol=1e-12, atol=1e-10)


def test_non_finite_first_pair_is_reported_as_not_kept() -> None:
    """The first pair sets Q's scale; a non-finite one sets nothing and says so (the manager counts it skipped)."""
    pre = PSGD(3, 2, dtype=F64, device=CPU)
    pre.observe_grad(torch.full((3, 2), float("nan"), dtype=F64))
    kept = pre.close_statistics(1.0)
    assert kept is not None and not bool(kept) and pre.q_l is None
    pre.observe_grad(torch.randn(3, 2, dtype=F64))
    assert _accepted(pre.close_statistics(1.0)) and pre.q_l is not None
