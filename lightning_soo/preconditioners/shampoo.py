"""Shampoo: ``P·G = (L + ρI)^(-e) G (R + ρI)^(-e)`` with ``e = 1/4`` by default.

Statistics, as running averages (``accumulate="ema"``, weight ``beta`` on the old value) or AdaGrad-style sums:

* ``statistics="per_example"`` (default, the seed's formula): from the captured rows, without materialising
  per-example gradients ``G_n = δ_n h̄_nᵀ``: ``L = Σ_n G_n G_nᵀ = Δᵀ diag(‖h̄_n‖²) Δ`` and
  ``R = Σ_n G_nᵀ G_n = H̄ᵀ diag(‖δ_n‖²) H̄``, divided by the number of examples. Under weight sharing every row
  (position) is treated as an example, as in K-FAC-expand; ``weight_sharing="reduce"`` makes one row per example.
  A use of a tied weight in the swapped orientation adds its rows the same way (``observe_transposed``).
* ``statistics="gradient"``: classic Shampoo from the mini-batch gradient, ``L = G Gᵀ``, ``R = Gᵀ G`` (no hooks).

Damping is absolute or relative to each block's largest eigenvalue. A side wider than ``max_factor_dim`` is split
into blocks of at most that size (block-diagonal factor, see ``blocks``); an embedding's one-hot side is exactly
diagonal under per-example statistics and kept so. ``precondition`` is linear (``curvature_matvec`` is its
inverse); layer-wise grafting to the plain gradient's norm is applied by the manager (``grafting="sgd"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_soo import linalg
from lightning_soo.capture.adapters import Count, IndexRows, Observation, Rows
from lightning_soo.capture.rows import RowCount
from lightning_soo.options import ShampooOptions, StepOptions
from lightning_soo.preconditioners.banks import Sides, close_banked
from lightning_soo.preconditioners.base import Preconditioner
from lightning_soo.preconditioners.blocks import BlockSide
from lightning_soo.preconditioners.statistics import Factor


def _row_norms(rows: Tensor) -> Tensor:
    """Each row's Euclidean norm as a column: one reduction (``square``, ``sum`` and ``sqrt`` are three launches)."""
    return torch.linalg.vector_norm(rows, dim=1, keepdim=True)


class Shampoo(Preconditioner):
    """Shampoo's two-sided preconditioner of one layer."""

    options_type = ShampooOptions
    options: ShampooOptions
    symmetric_statistics = True
    loss_examples = True  # B (Shampoo: both sides) averages the loss's examples, not the layer's rows
    count_scaled_rows = True  # both sides are quadratic in the output gradients: a count tensor at the close
    config_keys = ("exponent", "damping_mode", "max_factor_dim", "statistics")
    supports_transposed = True
    vectors_diagonal = True  # a norm's scale (``precondition_vectors``): a diagonal R, not one eigh of d x d per vector

    @classmethod
    def one_hot_diagonal(cls, options: StepOptions) -> bool:
        return getattr(options, "statistics", "per_example") == "per_example"  # exact for per-example statistics

    def build(self) -> None:
        o = self.options
        self.uses_hooks = self.row_norms = o.statistics == "per_example"
        self.uses_grad = not self.uses_hooks
        self.exponent, self.relative = o.exponent, o.damping_mode == "relative"
        self.accumulate, self.beta = o.accumulate, o.beta
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        self.left = BlockSide(self.d_out, o.max_factor_dim, diagonal=False, **kw)
        self.right = BlockSide(self.d_in, o.max_factor_dim, diagonal=self.input_diagonal, **kw)

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
    def observe_inputs(self, rows: Rows, count: Count) -> Rows:
        return rows  # kept until the output gradients of the same rows arrive

    def observe_transposed(self, inputs: Rows, grads: Tensor, count: Count, n_examples: Count) -> None:
        """A use in the swapped orientation (a tied head, or a tied embedding after its head): each row's gradient
        is ``h δᵀ`` in this layer's coordinates, so ``L += ‖δ‖² h hᵀ`` and ``R += ‖h‖² δ δᵀ`` (a diagonal side
        keeps the diagonal); one-hot ``h`` (an embedding's tokens) have ``‖h‖ = 1``."""
        if isinstance(inputs, IndexRows):  # a padding row's zero gradient is its zero weight: no mask needed
            self.left.add(inputs, n_examples, weights=grads.square().sum(1))
            self.right.add(grads, n_examples)
            return
        self.left.add(inputs * _row_norms(grads), n_examples)
        self.right.add(grads * _row_norms(inputs), n_examples)

    def observe(self, obs: Observation, rows: Tensor, scale: float | Tensor | RowCount = 1.0) -> None:
        """Per-example statistics weight each row by the other side's norm: the adapter's rows come unmasked, with
        the output-gradient norms (``row_norms``), where it made them."""
        self._observe(rows, obs.n, obs.h, scale, obs.norms)

    def dense_ready(self) -> bool:
        (left, *more_left), (right, *more_right) = self.left.factors, self.right.factors
        return self.uses_hooks and not (more_left or more_right) and left.takes_first() and right.takes_first()

    def observe_dense(self, obs: Observation) -> None:
        h, d, n = obs.h, obs.d, obs.n
        norms = _row_norms(d) if obs.norms is None else obs.norms
        # both sides are quadratic in the rows: the count's square, in the product or at the close
        self.left.factors[0].add_first(d * _row_norms(h), n, squared=True)  # type: ignore[operator, arg-type]
        self.right.factors[0].add_first(h * norms, n, squared=True)  # type: ignore[operator, arg-type]

    def observe_output_grads(self, rows: Tensor, n_examples: Count, ctx: Any, scale: float | Tensor = 1.0) -> None:
        self._observe(rows, n_examples, ctx, scale, None)

    def _observe(
        self, rows: Tensor, n_examples: Count, h: Rows, scale: float | Tensor | RowCount, norms: Tensor | None
    ) -> None:
        # both sides are quadratic in the rows: a count tensor's square is taken at the close (``Factor.add``)
        sq, s2 = (scale, 1.0) if isinstance(scale, Tensor | RowCount) else (None, scale * scale)
        if isinstance(h, IndexRows):
            self.left.add(rows, n_examples, s2, squared=sq)  # ‖h̄_n‖ = 1 for one-hot rows
            weights = rows.square().sum(1)  # diagonal: Σ ‖δ_n‖² at each index
            self.right.add(h, n_examples, s2, weights=weights, squared=sq)
            return
        norms = _row_norms(rows) if norms is None else norms
        self.left.add(rows * _row_norms(h), n_examples, s2, squared=sq)  # Δᵀ diag(‖h̄‖²) Δ
        self.right.add(h * norms, n_examples, s2, squared=sq)  # H̄ᵀ diag(‖δ‖²) H̄

    def observe_grad(self, grad: Tensor) -> None:
        self.left.add(grad.mT, 1)  # G Gᵀ
        self.right.add(grad, 1)  # Gᵀ G

    def statistics_tensors(self) -> list[Tensor]:
        return self.left.statistics_tensors() + self.right.statistics_tensors()

    def statistics_factors(self) -> list[tuple[Factor, bool]]:
        return [(f, True) for side in self.sides for f in side.factors]  # both sides take the loss's N

    def close_statistics(self, output_scale: float | Tensor) -> Tensor | bool | None:
        if not (self.left.pending and self.right.pending):
            self.discard_statistics()
            return None
        keep = linalg.finite(*self.left.finite_probes(), *self.right.finite_probes())
        scale = output_scale**2 if self.uses_hooks else 1.0  # both factors are quadratic in the output gradient
        decay = self.beta if self.accumulate == "ema" else None
        if not all([side.fold(decay, scale, keep) for side in self.sides]):  # a first value was not finite
            for side in self.sides:
                for f in side.factors:
                    f.value = None
        return keep

    @classmethod
    def close_many(cls, pres: list[Preconditioner], output_scale: float | Tensor) -> list[Tensor | bool | None]:
        """Layers whose sides are one dense block each, of equal shapes, close as banks (``banks``)."""
        s2 = output_scale**2  # one operation for all layers

        def sides(p: Shampoo) -> Sides | None:
            if len(p.left.factors) != 1 or len(p.right.factors) != 1:
                return None
            scale = s2 if p.uses_hooks else 1.0
            return [(p.left.factors[0], scale), (p.right.factors[0], scale)]

        def decay(p: Shampoo) -> float | None:
            return p.beta if p.accumulate == "ema" else None

        return close_banked(pres, sides, decay, lambda p: p.close_statistics(output_scale))

    def discard_statistics(self) -> None:
        for side in self.sides:
            side.reset()

    # -- preconditioner -----------------------------------------------------------------------------------
    def refresh(self, damping: float) -> bool | None:
        return self.refresh_many([self], damping)[0]

    @classmethod
    def refresh_many(cls, pres: list[Preconditioner], damping: float) -> list[bool | None]:
        """Every block root of every layer from batched eigendecompositions (one per block shape and mode); a
        layer any of whose blocks fails keeps its last good roots."""
        todo = [p for p in pres if isinstance(p, Shampoo) and p.left.has_values and p.right.has_values]
        results: dict[int, bool] = {}
        for relative, exponent in {(p.relative, p.exponent) for p in todo}:
            group = [p for p in todo if (p.relative, p.exponent) == (relative, exponent)]
            values = [v for p in group for side in p.sides for v in side.values]
            roots = iter(linalg.inverse_root_many(values, damping, exponent, relative))  # type: ignore[arg-type]
            for p in group:
                per_side = [[next(roots) for _ in side.values] for side in p.sides]
                ok = all(r is not None for side in per_side for r in side)
                if ok:
                    for side, rs in zip(p.sides, per_side, strict=True):
                        side.set_roots(rs)  # type: ignore[arg-type]
                    p.applied_damping = max(side.applied_damping for side in p.sides)
                results[id(p)] = ok
        return [None if id(p) not in results else (p.refreshed() if results[id(p)] else False) for p in pres]

    def precondition(self, grad: Tensor) -> Tensor:
        g = grad.to(self.dtype)
        return self.right.apply(self.left.apply(g, left=True), left=False)

    def kronecker_operands(self) -> tuple[Tensor, Tensor] | None:
        """The two roots, when each side is one dense block."""
        roots = [side.roots[0] for side in self.sides if len(side.roots) == 1]
        if len(roots) != 2 or any(root is None or root.dim() != 2 for root in roots):
            return None
        return roots[0], roots[1]  # type: ignore[return-value]

    def curvature_matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.dtype)
        return self.right.apply(self.left.apply(v, left=True, inverse=True), left=False, inverse=True)

    def refresh_cost(self) -> float:
        return self.left.cost() + self.right.cost() + 1.0

    # -- persistence and sharing ----------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        named = {**self.left.named_tensors("l"), **self.right.named_tensors("r")}
        return {k: v for k, v in named.items() if v is not None}

    def _load_tensors(self, state: dict[str, Any], derived: bool) -> None:
        self.left.load("l", state, derived)
        self.right.load("r", state, derived)

    def curvature_state(self) -> list[Tensor]:
        return [v for side in self.sides for v in side.values if v is not None]

    def inverse_tensors(self) -> list[Tensor]:
        header = self._header_tensor()
        return [header, *(t for side in self.sides for t in side.shared_tensors(self.dtype, self.device))]

    def inverse_tensors_loaded(self) -> None:
        self._read_header()

    def spectrum(self) -> Tensor | None:
        if not self.ready:
            return None
        return torch.outer(self.left.eigenvalues(), self.right.eigenvalues()).reshape(-1).pow(self.exponent)
