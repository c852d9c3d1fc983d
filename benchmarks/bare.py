"""Bare K-FAC, Shampoo, Gauss-Newton and PSGD, for reference only: the kernels each method cannot avoid and nothing
else.

Forward hooks keep each Linear layer's input; a hook on its output forms the statistics in the backward pass and
folds them into running averages (``lerp_``); a refresh factorises them (K-FAC: Cholesky inverses, or
eigendecompositions with ``inverse="eigen"``; Shampoo: eigendecompositions and inverse fourth roots; Gauss-Newton:
the examples' Gram and its Cholesky factor, Woodbury's form; PSGD: the factors' Grams ``QᵀQ``); the step writes
the preconditioned ``[W | b]`` into the gradients (PSGD first fits its factors to the gradient and a Gaussian probe,
Li's whitening step with its two triangular solves). No padding rule, no finiteness checks, no KL clip, no grafting
but Gauss-Newton's, no π-damping, no accumulation, mixed precision or DDP, no checkpoints.

``benchmarks/overhead.py`` times each beside the library's method in the same interleaved run: the bare reference
is a *measured* floor (the same kernels at the rates this machine gives them, LAPACK's included, with a plain
Python loop around them), where the FLOP floor prices every FLOP at a product's rate. The gap between the library
and its bare reference is what the library's safety and generality cost a step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_soo.preconditioners.psgd_math import norm_lower_bound

#: power iterations for Gauss-Newton's largest eigenvalue (the library's subspace iteration reads its Gram 9 times)
POWER_STEPS = 9


class Bare:
    """The manager's step interface (``begin_step``, ``step``, ``timings``, ``steps``) over bare per-layer state."""

    hooks = True  # whether statistics come from the backward pass (PSGD's come from the gradient)

    def __init__(self, model: nn.Module, statistics_interval: int, preconditioner_interval: int) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
        self.every, self.refresh_every = statistics_interval, preconditioner_interval
        self.decay = 0.95
        self.steps = 0
        self.timings: dict[str, float] = {}
        self._collecting = False
        self.state: dict[nn.Module, dict[str, Tensor]] = {}
        for layer in self.layers:
            d_out, d_in = layer.weight.shape
            kw: dict[str, Any] = {"dtype": layer.weight.dtype, "device": layer.weight.device}
            self.state[layer] = self.initial(torch.eye(d_out, **kw), torch.eye(d_in + 1, **kw))
            if self.hooks:
                layer.register_forward_hook(self._forward)

    def initial(self, eye_out: Tensor, eye_in: Tensor) -> dict[str, Tensor]:
        """A layer's starting state from identities of its two sides."""
        return {"b": eye_out, "a": eye_in, "b_op": eye_out, "a_op": eye_in}

    def _forward(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if not self._collecting or not output.requires_grad:
            return
        x, state = args[0].detach(), self.state[module]
        output.register_hook(lambda g: self.observe(state, torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1), g))

    def observe(self, state: dict[str, Tensor], h: Tensor, g: Tensor) -> None:
        """Fold one batch's statistics (input rows ``[x | 1]``, output gradients ``g`` of a mean loss)."""

    def refresh(self, state: dict[str, Tensor]) -> None:
        """Recompute a layer's preconditioning operands from its statistics."""

    def precondition(self, state: dict[str, Tensor], g: Tensor) -> Tensor:
        """The preconditioned ``[W | b]`` gradient (default: ``B_op G A_op``)."""
        return state["b_op"] @ g @ state["a_op"]

    def begin_step(self, batch_size: int | None = None) -> None:
        self._collecting = self.steps % self.every == 0

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._collecting = False
        refresh = self.steps % self.refresh_every == 0
        for layer in self.layers:
            state, w, b = self.state[layer], layer.weight, layer.bias
            assert w.grad is not None and b is not None and b.grad is not None
            g = torch.cat([w.grad, b.grad.unsqueeze(1)], dim=1)
            if not self.hooks and self.steps % self.every == 0:
                self.fit(state, g)
            if refresh:
                self.refresh(state)
            out = self.precondition(state, g)
            w.grad.copy_(out[:, :-1])
            b.grad.copy_(out[:, -1])
        self.steps += 1

    def fit(self, state: dict[str, Tensor], g: Tensor) -> None:
        """Fit the statistics to this step's gradient (methods without hooks)."""


class BareKFAC(Bare):
    """Grams ``H̄ᵀH̄ / N`` and ``ΔᵀΔ · N``; damped Cholesky inverses (two products a step), or with ``inverse="eigen"``
    eigendecompositions and the eigenbasis products (four a step, the damping added to the eigenvalue products)."""

    def __init__(
        self,
        model: nn.Module,
        statistics_interval: int,
        preconditioner_interval: int,
        damping: float = 0.1,
        inverse: str = "cholesky",
    ) -> None:
        self.damping, self.inverse = damping, inverse
        super().__init__(model, statistics_interval, preconditioner_interval)

    def observe(self, state: dict[str, Tensor], h: Tensor, g: Tensor) -> None:
        n = h.shape[0]
        state["a"].lerp_(h.mT @ h / n, 1 - self.decay)
        state["b"].lerp_(g.mT @ g * n, 1 - self.decay)  # the 1/N of a mean loss undone

    def refresh(self, state: dict[str, Tensor]) -> None:
        if self.inverse == "eigen":
            for side in ("a", "b"):
                state["lam_" + side], state["q_" + side] = torch.linalg.eigh(state[side])
            return
        for side in ("a", "b"):
            damped = state[side].clone()
            damped.diagonal().add_(self.damping**0.5)
            state[side + "_op"] = torch.cholesky_inverse(torch.linalg.cholesky(damped))

    def precondition(self, state: dict[str, Tensor], g: Tensor) -> Tensor:
        if self.inverse != "eigen":
            return super().precondition(state, g)
        if "q_a" not in state:
            return g
        v = state["q_b"].mT @ g @ state["q_a"]
        v = v / (torch.outer(state["lam_b"], state["lam_a"]) + self.damping)
        return state["q_b"] @ v @ state["q_a"].mT


class BareShampoo(Bare):
    """Per-example statistics ``L = Δᵀ diag(‖h̄‖²) Δ``, ``R = H̄ᵀ diag(‖δ‖²) H̄`` (each row scaled by the other side's
    norm, one Gram each), inverse fourth roots by eigendecomposition with damping relative to the largest
    eigenvalue, two products a step."""

    def __init__(
        self, model: nn.Module, statistics_interval: int, preconditioner_interval: int, damping: float = 1e-4
    ) -> None:
        self.damping = damping
        super().__init__(model, statistics_interval, preconditioner_interval)

    def observe(self, state: dict[str, Tensor], h: Tensor, g: Tensor) -> None:
        n = h.shape[0]
        g = g * n  # the 1/N of a mean loss undone
        left = g * torch.linalg.vector_norm(h, dim=1, keepdim=True)
        right = h * torch.linalg.vector_norm(g, dim=1, keepdim=True)
        state["b"].lerp_(left.mT @ left / n, 1 - self.decay)
        state["a"].lerp_(right.mT @ right / n, 1 - self.decay)

    def refresh(self, state: dict[str, Tensor]) -> None:
        for side in ("a", "b"):
            lam, q = torch.linalg.eigh(state[side])
            lam = lam.clamp(min=0) + self.damping * lam[-1].clamp(min=1e-30)
            state[side + "_op"] = (q * lam.pow(-0.25)) @ q.mT


class BarePSGD(Bare):
    """Li's Kron whitening fit every statistics step: ``A = Q_l G Q_rᵀ``, ``B = Q_l⁻ᵀ V Q_r⁻¹`` for a Gaussian
    ``V`` (two triangular solves), each factor moved by ``-μ/‖AAᵀ + BBᵀ‖ · triu(AAᵀ - BBᵀ) Q`` (the norm bounded
    by Li's cheap estimate); a refresh forms ``P = QᵀQ`` of each side, two products a step."""

    hooks = False

    def __init__(
        self, model: nn.Module, statistics_interval: int, preconditioner_interval: int, lr: float = 0.1
    ) -> None:
        self.lr = lr
        super().__init__(model, statistics_interval, preconditioner_interval)

    def fit(self, state: dict[str, Tensor], g: Tensor) -> None:
        ql, qr = state["b"], state["a"]
        v = torch.randn_like(g)
        a = ql @ g @ qr.mT
        b = torch.linalg.solve_triangular(ql.mT, v, upper=False)  # Q_l⁻ᵀ V
        b = torch.linalg.solve_triangular(qr, b, upper=True, left=False)  # · Q_r⁻¹
        for side, q, t1, t2 in (("b", ql, a @ a.mT, b @ b.mT), ("a", qr, a.mT @ a, b.mT @ b)):
            step = self.lr / (float(norm_lower_bound(t1 + t2)) + 1.2e-38)  # Li's bound, as the library's
            state[side] = torch.sub(q, torch.triu(t1 - t2) @ q, alpha=step)

    def refresh(self, state: dict[str, Tensor]) -> None:
        state["b_op"], state["a_op"] = state["b"].mT @ state["b"], state["a"].mT @ state["a"]


class BareGaussNewton(Bare):
    """Layer-wise empirical Fisher applied exactly by Woodbury, ``(UUᵀ/N + ρI)⁻¹ G = (G − U (K + NρI)⁻¹ Uᵀ G) / ρ``
    with the per-example gradients ``g_n = δ_n h̄_nᵀ`` as the columns of ``U``, never formed: ``K = (H̄H̄ᵀ) ∘ (ΔΔᵀ)``
    and its Cholesky factor at refreshes, ``Uᵀ vec(G) = rowsum((ΔG) ∘ H̄)`` and ``U w = Δᵀ diag(w) H̄`` a step. The
    curvature is the latest examples (no running average), so statistics are taken only on refresh steps; ``ρ`` is
    ``damping`` times ``λ_max(K)/N`` (power iteration). With SGD grafting (``grafting``, as the library's default:
    the update takes the gradient's norm; without it the deep MLP diverges)."""

    def __init__(
        self,
        model: nn.Module,
        statistics_interval: int,
        preconditioner_interval: int,
        damping: float = 0.3,
        grafting: bool = True,
    ) -> None:
        self.damping, self.grafting = damping, grafting
        super().__init__(model, statistics_interval, preconditioner_interval)

    def initial(self, eye_out: Tensor, eye_in: Tensor) -> dict[str, Tensor]:
        return {}

    def begin_step(self, batch_size: int | None = None) -> None:
        self._collecting = self.steps % self.refresh_every == 0

    def observe(self, state: dict[str, Tensor], h: Tensor, g: Tensor) -> None:
        state["h"], state["d"] = h, g * h.shape[0]  # the 1/N of a mean loss undone: δ_n of each example's loss

    def refresh(self, state: dict[str, Tensor]) -> None:
        h, d = state["h"], state["d"]
        n = h.shape[0]
        k = (h @ h.mT).mul_(d @ d.mT)
        v = torch.ones(n, 1, dtype=k.dtype, device=k.device)
        for _ in range(POWER_STEPS):
            v = k @ v
            v = v / torch.linalg.vector_norm(v)
        top = float(v.mT @ k @ v) / n
        rho = self.damping * top if top > 0 else self.damping  # as the library: absolute when there is no scale
        k.diagonal().add_(n * rho)
        chol, info = torch.linalg.cholesky_ex(k)
        if int(info) == 0 or "chol" not in state:  # a failed factorisation keeps the last one
            state["chol"], state["rho"] = chol, torch.tensor(rho)
            state["basis_h"], state["basis_d"] = h, d

    def precondition(self, state: dict[str, Tensor], g: Tensor) -> Tensor:
        h, d, chol = state["basis_h"], state["basis_d"], state["chol"]
        c = (d @ g).mul_(h).sum(1, keepdim=True)  # Uᵀ vec(G)
        w = torch.linalg.solve_triangular(chol.mT, torch.linalg.solve_triangular(chol, c, upper=False), upper=True)
        out = torch.addmm(g, (d * w).mT, h, alpha=-1.0).div_(float(state["rho"]))
        return out.mul_(torch.linalg.vector_norm(g) / torch.linalg.vector_norm(out)) if self.grafting else out
