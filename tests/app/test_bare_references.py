"""The bare references of ``benchmarks/bare.py`` compute the preconditioners they stand for: their timing is the
measured floor of ``benchmarks/overhead.py``, so each is checked in float64 against a dense definition (explicit
Kronecker products, per-example gradients from ``torch.func``, dense inverses)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from benchmarks.bare import Bare, BareGaussNewton, BareKFAC, BarePSGD, BareShampoo

N, SIZES = 7, (5, 4, 3)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Tanh(), nn.Linear(SIZES[1], SIZES[2])).double()


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, SIZES[0], generator=g, dtype=torch.float64), torch.randint(0, SIZES[2], (N,), generator=g)


def _matrices(model: nn.Module) -> list[Tensor]:
    """Each Linear layer's gradient as ``[W | b]``."""
    return [torch.cat([m.weight.grad, m.bias.grad.unsqueeze(1)], 1) for m in model if isinstance(m, nn.Linear)]


def _step(bare_type: type[Bare], **kw: float | str) -> tuple[nn.Module, list[Tensor], list[Tensor]]:
    """One statistics and refresh step of a bare reference from fresh statistics (no running average): the model,
    the gradients before, and the preconditioned ones."""
    model = _model()
    bare = bare_type(model, 1, 1, **kw)  # type: ignore[arg-type]
    bare.decay = 0.0  # the running averages are this step's statistics
    x, y = _batch()
    bare.begin_step()
    nn.functional.cross_entropy(model(x), y).backward()
    before = _matrices(model)
    torch.manual_seed(5)  # PSGD's probes
    bare.step()
    return model, before, _matrices(model)


def _per_example_grads(model: nn.Module) -> list[Tensor]:
    """``∇ℓ_n`` of each example's own loss, per Linear layer as ``N x d_out x (d_in + 1)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _batch()

    def loss(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xn[None],)), yn[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [torch.cat([g[f"{i}.weight"], g[f"{i}.bias"].unsqueeze(2)], 2) for i in (0, 2)]


def _rows(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Each layer's ``H̄`` (inputs with the ones column) and ``Δ`` (output gradients of the summed loss)."""
    x, _ = _batch()
    h1 = torch.tanh(model[0](x)).detach()
    inputs = [x, h1]
    per = _per_example_grads(model)
    out = []
    for h, g in zip(inputs, per, strict=True):
        hb = torch.cat([h, torch.ones(N, 1, dtype=h.dtype)], 1)
        out.append((hb, g[:, :, -1]))  # the bias column of ∇ℓ_n is δ_n
    return out


@pytest.mark.parametrize("inverse", ["cholesky", "eigen"])
def test_bare_kfac_is_the_damped_kronecker_inverse(inverse: str) -> None:
    damping = 0.05
    model, before, after = _step(BareKFAC, damping=damping, inverse=inverse)
    for (hb, d), g, pg in zip(_rows(model), before, after, strict=True):
        a, b = hb.mT @ hb / N, d.mT @ d / N  # B = N·ΔᵀΔ of the mean loss's Δ/N
        if inverse == "eigen":  # (B ⊗ A + ρI)⁻¹ vec(G), row-major vec
            m = torch.kron(b, a) + damping * torch.eye(a.shape[0] * b.shape[0], dtype=a.dtype)
            want = torch.linalg.solve(m, g.reshape(-1)).reshape(g.shape)
        else:  # (B + √ρ I)⁻¹ G (A + √ρ I)⁻¹
            r = damping**0.5
            want = torch.linalg.inv(b + r * torch.eye(b.shape[0], dtype=b.dtype)) @ g
            want = want @ torch.linalg.inv(a + r * torch.eye(a.shape[0], dtype=a.dtype))
        torch.testing.assert_close(pg, want, rtol=1e-9, atol=1e-12)


def _root(m: Tensor, damping: float) -> Tensor:
    lam, q = torch.linalg.eigh(m)
    lam = lam.clamp(min=0) + damping * lam.max()
    return q @ torch.diag(lam**-0.25) @ q.mT


def test_bare_shampoo_is_the_per_example_inverse_fourth_roots() -> None:
    damping = 1e-2
    model, before, after = _step(BareShampoo, damping=damping)
    for gn, g, pg in zip(_per_example_grads(model), before, after, strict=True):
        left = torch.einsum("nij,nkj->ik", gn, gn) / N  # Σ G_n G_nᵀ / N
        right = torch.einsum("nji,njk->ik", gn, gn) / N  # Σ G_nᵀ G_n / N
        torch.testing.assert_close(g, gn.mean(0))
        torch.testing.assert_close(pg, _root(left, damping) @ g @ _root(right, damping), rtol=1e-9, atol=1e-12)


def _li_bound(m: Tensor) -> Tensor:
    """Li's lower bound of a symmetric matrix's spectral norm, by its definition: ``m`` applied to its largest row."""
    x = m[torch.linalg.vector_norm(m, dim=1).argmax()] @ m
    return torch.linalg.vector_norm(x / torch.linalg.vector_norm(x) @ m)


def test_bare_psgd_takes_one_whitening_step_then_preconditions_by_its_grams() -> None:
    lr = 0.1
    _, before, after = _step(BarePSGD, lr=lr)
    torch.manual_seed(5)
    for g, pg in zip(before, after, strict=True):
        v = torch.randn_like(g)  # the probe the step drew
        a, b = g, v  # from Q = I: A = Q_l G Q_rᵀ = G, B = Q_l⁻ᵀ V Q_r⁻¹ = V
        qs = []
        for t1, t2 in ((a @ a.mT, b @ b.mT), (a.mT @ a, b.mT @ b)):
            bound = _li_bound(t1 + t2)
            norm = torch.linalg.matrix_norm(t1 + t2, 2)
            assert norm / 2**0.5 <= bound <= norm * (1 + 1e-12)
            qs.append(torch.eye(t1.shape[0], dtype=g.dtype) - lr / bound * torch.triu(t1 - t2))
        ql, qr = qs
        torch.testing.assert_close(pg, ql.mT @ ql @ g @ qr.mT @ qr, rtol=1e-9, atol=1e-12)


def test_bare_gauss_newton_is_the_damped_empirical_fisher_inverse() -> None:
    """``(UUᵀ/N + ρI)⁻¹ vec(G)`` by a dense solve, ``U`` the per-example gradients, ``ρ`` relative to ``λ_max(UUᵀ/N)``
    (its power iteration within 1% of the largest eigenvalue here)."""
    damping = 0.3
    model = _model()
    bare = BareGaussNewton(model, 1, 1, damping=damping, grafting=False)
    x, y = _batch()
    bare.begin_step()
    nn.functional.cross_entropy(model(x), y).backward()
    before = _matrices(model)
    bare.step()
    after = _matrices(model)
    for layer, gn, g, pg in zip(bare.layers, _per_example_grads(model), before, after, strict=True):
        u = gn.reshape(N, -1).mT  # D x N
        fisher = u @ u.mT / N
        rho = float(bare.state[layer]["rho"])
        assert rho == pytest.approx(damping * float(torch.linalg.eigvalsh(fisher)[-1]), rel=1e-2)
        want = torch.linalg.solve(fisher + rho * torch.eye(u.shape[0], dtype=u.dtype), g.reshape(-1)).reshape(g.shape)
        torch.testing.assert_close(pg, want, rtol=1e-6, atol=1e-8)  # Woodbury divides by ρ
