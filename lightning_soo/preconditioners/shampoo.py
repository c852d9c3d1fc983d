"""Shampoo: ``P·G = (L + ρI)^(-e) G (R + ρI)^(-e)`` with ``e = 1/4`` by default.

Statistics, as running averages (``accumulate="ema"``, weight ``beta`` on the old value) or AdaGrad-style sums:

* ``statistics="per_example"`` (default, the seed's formula): from the captured rows, without materialising
  per-example gradients ``G_n = δ_n h̄_nᵀ``: ``L = Σ_n G_n G_nᵀ = Δᵀ diag(‖h̄_n‖²) Δ`` and
  ``R = Σ_n G_nᵀ G_n = H̄ᵀ diag(‖δ_n‖²) H̄``, divided by the number of examples. Under weight sharing every row
  (position) is treated as an example, as in K-FAC-expand; ``weight_sharing="reduce"`` makes one row per example.
* ``statistics="gradient"``: classic Shampoo from the mini-batch gradient, ``L = G Gᵀ``, ``R = Gᵀ G`` (no hooks).

Damping is absolute or relative to each block's largest eigenvalue. A side wider than ``max_factor_dim`` is split
into blocks of at most that size (block-diagonal factor, see ``blocks``); an embedding's one-hot side is exactly
diagonal under per-example statistics and kept so. ``precondition`` is linear (``curvature_matvec`` is its
inverse); layer-wise grafting to the plain gradient's norm is applied by the manager (``grafting="sgd"``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_soo import linalg
from lightning_soo.layers import EmbeddingAdapter, IndexRows, LayerAdapter, Rows
from lightning_soo.preconditioners.base import Preconditioner
from lightning_soo.preconditioners.blocks import BlockSide


class Shampoo(Preconditioner):
    """Shampoo's two-sided preconditioner of one layer."""

    symmetric_statistics = True

    @classmethod
    def for_layer(cls, adapter: LayerAdapter, *, dtype: torch.dtype, device: torch.device, **options: Any) -> Shampoo:
        d_out, d_in = adapter.shape
        one_hot = isinstance(adapter, EmbeddingAdapter) and options.get("statistics", "per_example") == "per_example"
        return cls(d_out, d_in, dtype=dtype, device=device, input_diagonal=one_hot, **options)

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
        max_factor_dim: int = 1024,
        input_diagonal: bool = False,
    ) -> None:
        super().__init__(d_out, d_in, dtype=dtype, device=device)
        self.uses_hooks = statistics == "per_example"
        self.uses_grad = not self.uses_hooks
        self.exponent, self.relative = exponent, damping_mode == "relative"
        self.accumulate, self.beta = accumulate, beta
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.left = BlockSide(d_out, max_factor_dim, diagonal=False, **kw)
        self.right = BlockSide(d_in, max_factor_dim, diagonal=input_diagonal, **kw)

    @property
    def sides(self) -> tuple[BlockSide, BlockSide]:
        return self.left, self.right

    @property
    def l(self) -> Tensor:  # noqa: E743
        """The whole left statistic ``L`` (block-diagonal when blocked)."""
        return self.left.dense_value()

    @property
    def r(self) -> Tensor:
        """The whole right statistic ``R`` (a vector when diagonal)."""
        return self.right.dense_value()

    # -- statistics ---------------------------------------------------------------------------------------
    def observe_inputs(self, rows: Rows, n_examples: int) -> Rows:
        return rows  # kept until the output gradients of the same rows arrive

    def observe_output_grads(self, rows: Tensor, n_examples: int, ctx: Any) -> None:
        h: Rows = ctx
        if isinstance(h, IndexRows):
            self.left.add(rows, n_examples)  # ‖h̄_n‖ = 1 for one-hot rows
            self.right.add(h, n_examples, weights=rows.square().sum(1))  # diagonal: Σ ‖δ_n‖² at each row's index
            return
        self.left.add(rows * h.square().sum(1, keepdim=True).sqrt(), n_examples)  # Δᵀ diag(‖h̄‖²) Δ
        self.right.add(h * rows.square().sum(1, keepdim=True).sqrt(), n_examples)  # H̄ᵀ diag(‖δ‖²) H̄

    def observe_grad(self, grad: Tensor) -> None:
        self.left.add(grad.mT, 1)  # G Gᵀ
        self.right.add(grad, 1)  # Gᵀ G

    def statistics_tensors(self) -> list[Tensor]:
        return self.left.statistics_tensors() + self.right.statistics_tensors()

    def close_statistics(self, grad_scale: float) -> bool | None:
        if not (self.left.pending and self.right.pending):
            self.discard_statistics()
            return None
        if not linalg.all_finite(*self.left.step_sums(), *self.right.step_sums()):
            self.discard_statistics()
            return False
        scale = grad_scale**2 if self.uses_hooks else 1.0  # both factors carry two output gradients' scale
        decay = self.beta if self.accumulate == "ema" else None
        for side in self.sides:
            side.fold(decay, scale)
        return True

    def discard_statistics(self) -> None:
        for side in self.sides:
            side.reset()

    # -- preconditioner -----------------------------------------------------------------------------------
    def refresh(self, damping: float) -> bool | None:
        if not (self.left.has_values and self.right.has_values):
            return None
        saved = [(list(s.roots), list(s.lams)) for s in self.sides]
        for side in self.sides:
            if not side.refresh(damping, self.relative, self.exponent):
                for s, (roots, lams) in zip(self.sides, saved, strict=True):  # keep the last good pair
                    s.roots, s.lams = roots, lams
                return False
        self.ready = True
        self.refreshes += 1
        return True

    def precondition(self, grad: Tensor) -> Tensor:
        g = grad.to(self.dtype)
        return self.right.apply(self.left.apply(g, left=True), left=False)

    def curvature_matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.dtype)
        return self.right.apply(self.left.apply(v, left=True, inverse=True), left=False, inverse=True)

    def refresh_cost(self) -> float:
        return self.left.cost() + self.right.cost() + 1.0

    # -- persistence and sharing ----------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        named = {**self.left.named_tensors("l"), **self.right.named_tensors("r")}
        return {k: v for k, v in named.items() if v is not None}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        self.left.load("l", state, self.dtype, self.device)
        self.right.load("r", state, self.dtype, self.device)

    def curvature_state(self) -> list[Tensor]:
        return [v for side in self.sides for v in side.values if v is not None]

    def inverse_tensors(self) -> list[Tensor]:
        self._header = torch.tensor([float(self.ready)], dtype=self.dtype, device=self.device)
        return [self._header, *(t for side in self.sides for t in side.shared_tensors(self.dtype, self.device))]

    def inverse_tensors_loaded(self) -> None:
        self.ready = float(self._header[0]) > 0.5

    def spectrum(self) -> Tensor | None:
        if not self.ready:
            return None
        return torch.outer(self.left.eigenvalues(), self.right.eigenvalues()).reshape(-1).pow(self.exponent)
