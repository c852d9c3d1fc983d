"""Per-example gradients of one layer as Gauss-Newton's Woodbury form uses them: ``K = UᵀU``, ``Uᵀv`` and ``Uw``,
kept as the factors ``H`` and ``Δ`` of ``g_n = δ_n h_nᵀ`` where each row is an example (``RowBasis``), or
materialised (``DenseBasis``: convolutions, whose examples sum over positions)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_soo.capture.adapters import IndexRows, Rows


class RowBasis:
    """Per-example gradients ``g_n = δ_n h_nᵀ`` kept as their factors ``H`` (dense or one-hot) and ``Δ``."""

    def __init__(self, h: Rows, d: Tensor) -> None:
        self.h, self.d = h, d

    @property
    def n(self) -> int:
        return self.d.shape[0]

    def tensors(self) -> list[Tensor]:
        return [self.h.index if isinstance(self.h, IndexRows) else self.h, self.d]

    def gram(self) -> Tensor:
        dd = self.d @ self.d.mT
        if isinstance(self.h, IndexRows):
            return dd * (self.h.index.unsqueeze(1) == self.h.index.unsqueeze(0)).to(dd.dtype)
        return dd * (self.h @ self.h.mT)

    def project(self, v: Tensor) -> Tensor:
        """``Uᵀ vec(V)``: ``δ_nᵀ V h_n`` for every example."""
        if isinstance(self.h, IndexRows):
            return (self.d * v[:, self.h.index].mT).sum(1)
        if self.h.shape[1] <= self.d.shape[1]:
            return (self.d @ v).mul_(self.h).sum(1)  # in place: the product is new
        return (self.h @ v.mT).mul_(self.d).sum(1)

    def combine(self, w: Tensor, shape: tuple[int, int]) -> Tensor:
        """``U w = Σ_n w_n δ_n h_nᵀ``."""
        dw = self.d * w.unsqueeze(1)
        if isinstance(self.h, IndexRows):
            out = torch.zeros(shape, dtype=dw.dtype, device=dw.device)
            return out.index_add_(1, self.h.index, dw.mT)
        return dw.mT @ self.h

    def remove(self, g: Tensor, w: Tensor, rho: float) -> Tensor:
        """``(G − U w) / ρ`` (dense rows: one ``addmm``)."""
        if isinstance(self.h, IndexRows):
            return (g - self.combine(w, g.shape)) / rho
        return torch.addmm(g, (self.d * w.unsqueeze(1)).mT, self.h, beta=1.0 / rho, alpha=-1.0 / rho)

    def select(self, keep: Tensor) -> RowBasis:
        h = IndexRows(self.h.index[keep], self.h.size) if isinstance(self.h, IndexRows) else self.h[keep]
        return RowBasis(h, self.d[keep])


class DenseBasis:
    """Per-example gradients materialised as ``U`` (``N x d_out x d_in``)."""

    def __init__(self, u: Tensor) -> None:
        self.u = u

    @property
    def n(self) -> int:
        return self.u.shape[0]

    def tensors(self) -> list[Tensor]:
        return [self.u]

    def gram(self) -> Tensor:
        flat = self.u.flatten(1)
        return flat @ flat.mT

    def project(self, v: Tensor) -> Tensor:
        return self.u.flatten(1) @ v.reshape(-1)

    def combine(self, w: Tensor, shape: tuple[int, int]) -> Tensor:
        return (w @ self.u.flatten(1)).reshape(shape)

    def remove(self, g: Tensor, w: Tensor, rho: float) -> Tensor:
        """``(G − U w) / ρ`` in one ``addmv``."""
        flat = torch.addmv(g.reshape(-1), self.u.flatten(1).mT, w, beta=1.0 / rho, alpha=-1.0 / rho)
        return flat.reshape(g.shape)

    def select(self, keep: Tensor) -> DenseBasis:
        return DenseBasis(self.u[keep])


Basis = RowBasis | DenseBasis


def materialise(h: Rows, d: Tensor, n: int) -> Tensor:
    """Per-example gradients ``Σ_{t ∈ n} δ_t h_tᵀ`` of ``n`` examples with equally many rows each."""
    if isinstance(h, IndexRows):
        h = torch.nn.functional.one_hot(h.index, h.size).to(d.dtype)
    return d.reshape(n, -1, d.shape[1]).mT @ h.reshape(n, -1, h.shape[1])
