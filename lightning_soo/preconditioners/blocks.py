"""One side of a two-sided preconditioner (Shampoo's L or R) as a block-diagonal statistic with per-block roots.

A side of dimension ``dim`` is one dense block when ``dim <= max_block``, otherwise split into contiguous blocks of
at most ``max_block`` (as Distributed Shampoo blocks large dimensions), and diagonal when its rows are one-hot
(an embedding's input side, where the statistic is exactly diagonal). Each block's root ``(F_b + ρ_b I)^(-e)`` is
computed by eigendecomposition; the cost of a refresh is ``Σ_b n_b³`` instead of ``dim³`` and the memory
``Σ_b n_b²`` instead of ``dim²``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_soo.capture.rows import Count, IndexRows, RowCount, Rows
from lightning_soo.preconditioners.base import fit_square
from lightning_soo.preconditioners.statistics import Factor


def block_slices(dim: int, max_block: int) -> list[slice]:
    """Contiguous blocks of at most ``max_block`` covering ``range(dim)``, as equal as possible."""
    count = -(-dim // max_block)
    base, extra = divmod(dim, count)
    out, start = [], 0
    for k in range(count):
        size = base + (k < extra)
        out.append(slice(start, start + size))
        start += size
    return out


class BlockSide:
    """Block-diagonal running statistic ``F = diag(F_1, …, F_k)`` of rows, and its damped inverse root."""

    def __init__(self, dim: int, max_block: int, *, diagonal: bool, dtype: torch.dtype, device: torch.device) -> None:
        self.dim, self.diagonal = dim, diagonal
        self.slices = [slice(0, dim)] if diagonal else block_slices(dim, max_block)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.factors = [Factor(s.stop - s.start, diagonal=diagonal, **kw) for s in self.slices]
        self.roots: list[Tensor | None] = [None] * len(self.slices)  # (F_b + ρ_b I)^(-e)
        self.lams: list[Tensor | None] = [None] * len(self.slices)  # eigenvalues of F_b + ρ_b I
        self.applied_damping = 0.0  # the largest ρ_b of the last refresh

    # -- statistics -------------------------------------------------------------------------------------
    def add(
        self,
        rows: Rows,
        count: Count,
        scale: float = 1.0,
        weights: Tensor | None = None,
        squared: Tensor | RowCount | None = None,
    ) -> None:
        """Add ``scale · Σ x xᵀ`` of ``rows`` block by block (one-hot rows: ``weights`` per row; ``squared``: see
        ``Factor.add``)."""
        if isinstance(rows, IndexRows):
            self.factors[0].add(rows, count, scale, weights=weights, squared=squared)
            return
        if len(self.slices) == 1:
            self.factors[0].add(rows, count, scale, squared=squared)
            return
        for factor, s in zip(self.factors, self.slices, strict=True):
            factor.add(rows[:, s], count, scale, squared=squared)

    @property
    def pending(self) -> bool:
        return self.factors[0].pending

    def finite_probes(self) -> list[Tensor]:
        """What decides whether this step's statistics are finite (``Factor.finite_probe``)."""
        return [f.finite_probe for f in self.factors]

    def statistics_tensors(self) -> list[Tensor]:
        return [t for f in self.factors for t in f.statistics_tensors()]

    def fold(self, decay: float | None, scale: float | Tensor, keep: Tensor | None = None) -> bool:
        """Fold this step's mean (times ``scale``) into the running average with weight ``decay`` on the old
        value (``decay=None`` adds it instead, AdaGrad-style), where the device flag ``keep`` holds; see
        ``Factor.fold``."""
        return all([f.fold(decay, scale, keep) for f in self.factors])

    def reset(self) -> None:
        for f in self.factors:
            f.reset()

    @property
    def values(self) -> list[Tensor | None]:
        return [f.value for f in self.factors]

    @property
    def has_values(self) -> bool:
        return all(v is not None for v in self.values)

    def dense_value(self) -> Tensor:
        """The whole statistic (block-diagonal matrix, or a vector when diagonal); for tests and inspection."""
        values = self.values
        if self.diagonal:
            return values[0]
        return values[0] if len(values) == 1 else torch.block_diag(*values)

    # -- roots ----------------------------------------------------------------------------------------
    def set_roots(self, results: list[tuple[Tensor, Tensor, float]]) -> None:
        """Take every block's ``(root, damped eigenvalues, ρ)`` from a refresh (``linalg.inverse_root_many``)."""
        self.roots = [root for root, _, _ in results]
        self.lams = [lam for _, lam, _ in results]
        self.applied_damping = max(rho for _, _, rho in results)

    def apply(self, g: Tensor, left: bool, inverse: bool = False) -> Tensor:
        """``root · G`` (left) or ``G · root`` (right); with ``inverse`` the root's inverse ``(F + ρI)^(+e)``."""
        if len(self.slices) == 1:
            return self._apply_block(self.roots[0], g, left, inverse)
        parts = [
            self._apply_block(root, g[s] if left else g[:, s], left, inverse)
            for root, s in zip(self.roots, self.slices, strict=True)
        ]
        return torch.cat(parts, dim=0 if left else 1)

    @staticmethod
    def _apply_block(root: Tensor, g: Tensor, left: bool, inverse: bool) -> Tensor:
        if root.dim() == 1:
            r = 1.0 / root if inverse else root
            return r.unsqueeze(1) * g if left else g * r
        if inverse:  # the root is SPD: solve instead of keeping eigenvectors around
            return torch.linalg.solve(root, g) if left else torch.linalg.solve(root, g.mT).mT
        return root @ g if left else g @ root

    def eigenvalues(self) -> Tensor:
        return torch.cat(self.lams)

    def cost(self) -> float:
        return 0.0 if self.diagonal else float(sum((s.stop - s.start) ** 3 for s in self.slices))

    # -- persistence and sharing ----------------------------------------------------------------------
    def named_tensors(self, prefix: str) -> dict[str, Tensor | None]:
        out: dict[str, Tensor | None] = {}
        for k, f in enumerate(self.factors):
            out[f"{prefix}.{k}"] = f.value
            out[f"{prefix}_root.{k}"] = self.roots[k]
            out[f"{prefix}_lam.{k}"] = self.lams[k]
        return out

    def load(self, prefix: str, state: dict[str, Any], derived: bool) -> None:
        """Statistics from ``state`` fitted to this side's blocks (a checkpoint saved with other blocks or
        diagonal-ness gives the overlapping part of its block-diagonal statistic); roots only when ``derived``.

        Raises:
            ValueError: when the saved side's dimension is not this side's.
        """
        device, dtype = self.factors[0].device, self.factors[0].dtype
        saved = [state[f"{prefix}.{k}"] for k in range(len(state)) if f"{prefix}.{k}" in state]
        whole = None
        if saved:
            whole = torch.cat(saved) if saved[0].dim() == 1 else torch.block_diag(*saved)
            whole = fit_square(prefix, whole, self.dim, self.diagonal).to(device, dtype)
        for k, (f, s) in enumerate(zip(self.factors, self.slices, strict=True)):
            f.value = None if whole is None else (whole[s] if self.diagonal else whole[s, s]).clone()
            roots = state.get(f"{prefix}_root.{k}") if derived else None
            lams = state.get(f"{prefix}_lam.{k}") if derived else None
            self.roots[k] = None if roots is None else roots.to(device, dtype, copy=True)
            self.lams[k] = None if lams is None else lams.to(device, dtype, copy=True)

    def shared_tensors(self, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Roots and eigenvalues (allocated when missing), which a layer's owner rank broadcasts."""
        out = []
        for k, s in enumerate(self.slices):
            n = s.stop - s.start
            for store, shape in ((self.roots, (n,) if self.diagonal else (n, n)), (self.lams, (n,))):
                t = store[k]
                t = torch.zeros(shape, dtype=dtype, device=device) if t is None else t.contiguous()
                store[k] = t
                out.append(t)
        return out
