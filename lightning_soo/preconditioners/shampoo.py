"""Shampoo: ``P·G = (L + ρI)^(-e) G (R + ρI)^(-e)`` with ``e = 1/4`` by default.

Statistics, as running averages (``accumulate="ema"``, weight ``beta`` on the old value) or AdaGrad-style sums:

* ``statistics="per_example"`` (default, the seed's formula): from the captured rows, without materialising
  per-example gradients ``G_n = δ_n h̄_nᵀ``: ``L = Σ_n G_n G_nᵀ = Δᵀ diag(‖h̄_n‖²) Δ`` and
  ``R = Σ_n G_nᵀ G_n = H̄ᵀ diag(‖δ_n‖²) H̄``, divided by the number of examples. Under weight sharing every row
  (position) is treated as an example, as in K-FAC-expand; ``weight_sharing="reduce"`` makes one row per example.
* ``statistics="gradient"``: classic Shampoo from the mini-batch gradient, ``L = G Gᵀ``, ``R = Gᵀ G`` (no hooks).

Damping is absolute or relative to the factor's largest eigenvalue. A side wider than ``max_factor_dim`` is kept
diagonal. Grafting (``grafting="sgd"``, default) rescales ``P·G`` to the Frobenius norm of ``G`` per layer, so a
learning rate tuned for SGD keeps its meaning; ``curvature_matvec`` is the inverse of ``P`` without grafting.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_soo import linalg
from lightning_soo.layers import IndexRows, LayerAdapter, Rows
from lightning_soo.preconditioners.base import Preconditioner
from lightning_soo.preconditioners.factor import Factor


def _side(
    value: Tensor, damping: float, relative: bool, exponent: float
) -> tuple[Tensor, Tensor | None, Tensor] | None:
    """(eigenvalues + ρ, eigenvectors or None for a diagonal side, the inverse root)."""
    if value.dim() == 1:
        if not linalg.all_finite(value):
            return None
        lam, q = value.clamp(min=0), None
    else:
        eig = linalg.eigh(value)
        if eig is None:
            return None
        lam, q = eig
    rho = damping * float(lam.max()) if relative and lam.numel() else damping
    lam = lam + max(rho, 1e-30)
    root = lam.pow(-exponent) if q is None else (q * lam.pow(-exponent)) @ q.mT
    return lam, q, root


def _apply(side: Tensor, g: Tensor, left: bool) -> Tensor:
    if side.dim() == 1:
        return side.unsqueeze(1) * g if left else g * side
    return side @ g if left else g @ side


class Shampoo(Preconditioner):
    """Shampoo's two-sided preconditioner of one layer."""

    symmetric_statistics = True
    state_tensors = ("l", "r", "l_root", "r_root", "lam_l", "q_l", "lam_r", "q_r")

    @classmethod
    def for_layer(cls, adapter: LayerAdapter, *, dtype: torch.dtype, device: torch.device, **options: Any) -> Shampoo:
        d_out, d_in = adapter.shape
        return cls(d_out, d_in, dtype=dtype, device=device, **options)

    def __init__(
        self,
        d_out: int,
        d_in: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        statistics: Literal["per_example", "gradient"] = "per_example",
        exponent: float = 0.25,
        damping_mode: Literal["absolute", "relative"] = "relative",
        accumulate: Literal["ema", "sum"] = "ema",
        beta: float = 0.95,
        grafting: Literal["sgd"] | None = "sgd",
        max_factor_dim: int = 4096,
    ) -> None:
        super().__init__(d_out, d_in, dtype=dtype, device=device)
        self.uses_hooks = statistics == "per_example"
        self.uses_grad = not self.uses_hooks
        self.exponent, self.relative = exponent, damping_mode == "relative"
        self.accumulate, self.beta, self.grafting = accumulate, beta, grafting
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self._l = Factor(d_out, diagonal=d_out > max_factor_dim, **kw)
        self._r = Factor(d_in, diagonal=d_in > max_factor_dim, **kw)
        self.l_root = self.r_root = self.lam_l = self.q_l = self.lam_r = self.q_r = None

    @property
    def l(self) -> Tensor | None:  # noqa: E743
        return self._l.value

    @l.setter
    def l(self, value: Tensor | None) -> None:  # noqa: E743
        self._l.value = value

    @property
    def r(self) -> Tensor | None:
        return self._r.value

    @r.setter
    def r(self, value: Tensor | None) -> None:
        self._r.value = value

    # -- statistics ---------------------------------------------------------------------------------------
    def observe_inputs(self, rows: Rows, n_examples: int) -> Rows:
        return rows  # kept until the output gradients of the same rows arrive

    def observe_output_grads(self, rows: Tensor, n_examples: int, ctx: Any) -> None:
        h: Rows = ctx
        h_norm2 = (
            torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device)
            if isinstance(h, IndexRows)
            else (h.square().sum(1))
        )
        d_norm2 = rows.square().sum(1)
        self._l.add(rows * h_norm2.sqrt().unsqueeze(1), n_examples)  # Δᵀ diag(‖h‖²) Δ
        if isinstance(h, IndexRows):
            self._r.add(h, n_examples, weights=d_norm2)  # diagonal: Σ ‖δ_n‖² at each row's index
        else:
            self._r.add(h * d_norm2.sqrt().unsqueeze(1), n_examples)  # H̄ᵀ diag(‖δ‖²) H̄

    def observe_grad(self, grad: Tensor) -> None:
        self._l.add(grad.mT, 1)  # G Gᵀ
        self._r.add(grad, 1)  # Gᵀ G

    def statistics_tensors(self) -> list[Tensor]:
        return self._l.statistics_tensors() + self._r.statistics_tensors()

    def close_statistics(self, grad_scale: float) -> bool | None:
        if not (self._l.pending and self._r.pending):
            self.discard_statistics()
            return None
        if not linalg.all_finite(self._l.step_sum, self._r.step_sum):
            self.discard_statistics()
            return False
        scale = grad_scale**2 if self.uses_hooks else 1.0  # both factors carry two output gradients' scale
        for factor in (self._l, self._r):
            if self.accumulate == "sum" and factor.value is not None:
                factor.value.add_(factor.average(scale))
                factor.reset()
            else:
                factor.fold(self.beta if self.accumulate == "ema" else 0.0, scale)
        return True

    def discard_statistics(self) -> None:
        self._l.reset()
        self._r.reset()

    # -- preconditioner -----------------------------------------------------------------------------------
    def refresh(self, damping: float) -> bool | None:
        if self.l is None or self.r is None:
            return None
        left = _side(self.l, damping, self.relative, self.exponent)
        right = _side(self.r, damping, self.relative, self.exponent)
        if left is None or right is None:
            return False
        self.lam_l, self.q_l, self.l_root = left
        self.lam_r, self.q_r, self.r_root = right
        self.ready = True
        self.refreshes += 1
        return True

    def precondition(self, grad: Tensor) -> Tensor:
        g = grad.to(self.dtype)
        out = _apply(self.r_root, _apply(self.l_root, g, left=True), left=False)
        if self.grafting == "sgd":
            norm = out.norm()
            if float(norm) > 0:
                out = out * (g.norm() / norm)
        return out

    def curvature_matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.dtype)
        pos_l = self._power(self.lam_l, self.q_l)
        pos_r = self._power(self.lam_r, self.q_r)
        return _apply(pos_r, _apply(pos_l, v, left=True), left=False)

    def _power(self, lam: Tensor, q: Tensor | None) -> Tensor:
        """``(F + ρI)^(+e)``, the inverse of the root."""
        return lam.pow(self.exponent) if q is None else (q * lam.pow(self.exponent)) @ q.mT

    def refresh_cost(self) -> float:
        return float((0 if self._l.diagonal else self.d_out**3) + (0 if self._r.diagonal else self.d_in**3)) + 1.0

    def inverse_tensors(self) -> list[Tensor]:
        do, di = self.d_out, self.d_in
        dl, dr = self._l.diagonal, self._r.diagonal
        spec = [
            ("l_root", (do,) if dl else (do, do)),
            ("r_root", (di,) if dr else (di, di)),
            ("lam_l", (do,)),
            ("lam_r", (di,)),
            ("q_l", None if dl else (do, do)),
            ("q_r", None if dr else (di, di)),
        ]
        self._header = torch.tensor([float(self.ready)], dtype=self.dtype, device=self.device)
        out = [self._header]
        for name, shape in spec:
            if shape is None:
                continue
            t = getattr(self, name)
            t = torch.zeros(shape, dtype=self.dtype, device=self.device) if t is None else t.contiguous()
            setattr(self, name, t)
            out.append(t)
        return out

    def inverse_tensors_loaded(self) -> None:
        self.ready = float(self._header[0]) > 0.5

    def spectrum(self) -> Tensor | None:
        if not self.ready:
            return None
        return torch.outer(self.lam_l, self.lam_r).reshape(-1).pow(self.exponent)
