"""PSGD's linear algebra: the criterion's gradient terms, the spectral-norm bound that normalises its step, products
with triangular factors, and one fitting step of a stack of equal layers' dense factors (``fit_stacked``: on an
accelerator, each operation once per stack instead of once per layer; one more equal layer adds 2 launches to a
fitting step instead of 93, ``tests/engine/test_launches.py``) or diagonal ones (``fit_stacked_diagonal``). A
factor is an upper-triangular matrix, a diagonal stored as a vector, or a stack of triangular matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_soo import linalg


def norm_lower_bound(a: Tensor) -> Tensor:
    """A cheap lower bound of the spectral norm of a symmetric ``a`` (within about √2 of it, per Li): the norm of
    ``a`` applied to its largest column, normalised."""
    if linalg.host_decides(a):  # the scale, the column and the norm read on the host: no device-side fallbacks
        s = float(a.abs().amax())  # on the CPU 9x faster than ``vector_norm(a, inf)`` (128 x 128)
        if not s > 0:  # zero, or not finite: as the device path
            return a.new_zeros(())
        # the bound is scale-free: only the column is scaled (so that ``x`` cannot overflow), not ``a``; the
        # largest column is the largest row (``a`` is symmetric), whose norms are a contiguous reduction
        x = (a[int(torch.linalg.vector_norm(a, dim=1).argmax())] / s) @ a
        n = float(torch.linalg.vector_norm(x))
        return torch.linalg.vector_norm((x / n if n > 0 else x) @ a.mT)
    scale = torch.linalg.vector_norm(a, float("inf"))  # one reduction per quantity: each is a launch
    a = a / torch.where(scale > 0, scale, 1.0)
    col = a.index_select(1, torch.linalg.vector_norm(a, dim=0).argmax().reshape(1)).squeeze(1)  # no device sync
    x = col @ a
    norm = torch.linalg.vector_norm(x)
    bound = scale * torch.linalg.vector_norm((x / torch.where(norm > 0, norm, 1.0)) @ a.mT)
    return torch.where(scale > 0, bound, 0.0)


def norm_lower_bound_many(a: Tensor) -> Tensor:
    """``norm_lower_bound`` of every matrix of a stack ``a`` (``L x n x n``) at once, on the device: ``L`` bounds."""
    scale = torch.linalg.vector_norm(a, float("inf"), dim=(1, 2))
    a = a / torch.where(scale > 0, scale, 1.0).reshape(-1, 1, 1)
    index = torch.linalg.vector_norm(a, dim=1).argmax(1)  # each member's largest column
    col = a.gather(2, index.reshape(-1, 1, 1).expand(-1, a.shape[1], 1))  # L x n x 1
    x = col.mT @ a  # L x 1 x n
    norm = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
    bound = scale * torch.linalg.vector_norm((x / torch.where(norm > 0, norm, 1.0)) @ a.mT, dim=(1, 2))
    return torch.where(scale > 0, bound, 0.0)


def fit_stacked(
    ql: Tensor, qr: Tensor, h: Tensor, v: Tensor, lr: float, tiny: float, balance: bool
) -> tuple[Tensor, Tensor]:
    """One fitting step of stacked dense factors (``L x d_out x d_out``, ``L x d_in x d_in``) from stacked pairs
    ``(V, H)`` (``L x d_out x d_in``): ``PSGD._update`` for every member, in one operation each."""
    if balance:  # the factors' dynamic ranges balanced (every 100th update)
        nl, nr = ql.abs().amax((1, 2), keepdim=True), qr.abs().amax((1, 2), keepdim=True)
        g = (nl * nr).sqrt()
        ql, qr = ql * (g / nl), qr * (g / nr)
    a = (ql @ h) @ qr.mT  # Q_l H Q_rᵀ
    b = solve_right(solve_left_t(ql, v), qr)  # Q_l⁻ᵀ V Q_r⁻¹
    new = []
    for q, left in ((ql, True), (qr, False)):
        t1, t2 = criterion_terms(a, b, left, False)
        step = lr / (norm_lower_bound_many(t1 + t2) + tiny)
        new.append(q - step.reshape(-1, 1, 1) * triu_matmul(t1 - t2, q))
    return new[0], new[1]


def fit_stacked_diagonal(
    ql: Tensor, qr: Tensor, h: Tensor, v: Tensor, lr: float, tiny: float, balance: bool
) -> tuple[Tensor, Tensor]:
    """``fit_stacked`` for diagonal factors on both sides (stacked ``L x d_out`` and ``L x d_in``: the vector
    parameters of ``precondition_vectors``), elementwise, each operation once per stack."""
    if balance:
        nl, nr = ql.abs().amax(1, keepdim=True), qr.abs().amax(1, keepdim=True)
        g = (nl * nr).sqrt()
        ql, qr = ql * (g / nl), qr * (g / nr)
    a = ql.unsqueeze(2) * h * qr.unsqueeze(1)  # Q_l H Q_r, as ``PSGD._update`` takes it one layer at a time
    b = v / ql.unsqueeze(2) / qr.unsqueeze(1)
    new = []
    for q, dim in ((ql, 2), (qr, 1)):
        t1, t2 = a.square().sum(dim), b.square().sum(dim)
        step = lr / ((t1 + t2).abs().amax(1, keepdim=True) + tiny)
        new.append(q - step * (t1 - t2) * q)
    return new[0], new[1]


MIN_BLOCK = 256  # below this, dense products beat the block recursion


def triu_matmul(t: Tensor, q: Tensor) -> Tensor:
    """``triu(T) · Q`` for an upper-triangular ``Q``: the product is upper triangular, and 2x2 blocking skips the
    zero blocks (recursively; about 40% of the dense FLOPs at two levels)."""
    n = q.shape[-1]  # a stack of them (leading dimensions) alike
    if n < 2 * MIN_BLOCK:
        return torch.triu(t) @ q
    h = n // 2
    out = torch.zeros_like(q)
    out[..., :h, :h] = triu_matmul(t[..., :h, :h], q[..., :h, :h])
    out[..., :h, h:] = torch.triu(t[..., :h, :h]) @ q[..., :h, h:] + t[..., :h, h:] @ q[..., h:, h:]
    out[..., h:, h:] = triu_matmul(t[..., h:, h:], q[..., h:, h:])
    return out


def factor_gram(q: Tensor) -> Tensor:
    """``QᵀQ`` of an upper-triangular factor (2x2 blocking skips the zero blocks, using symmetry), ``q²`` of a
    diagonal one."""
    if q.dim() == 1:
        return q * q
    n = q.shape[0]
    if n < 2 * MIN_BLOCK:
        return q.mT @ q
    h = n // 2
    q11, q12, q22 = q[:h, :h], q[:h, h:], q[h:, h:]
    out = torch.empty_like(q)
    out[:h, :h] = factor_gram(q11)
    out[:h, h:] = q11.mT @ q12
    out[h:, :h] = out[:h, h:].mT
    out[h:, h:] = q12.mT @ q12 + factor_gram(q22)
    return out


def solve_left_t(q: Tensor, x: Tensor) -> Tensor:
    """``Q⁻ᵀ X``."""
    return x / q.unsqueeze(1) if q.dim() == 1 else torch.linalg.solve_triangular(q.mT, x, upper=False)


def solve_right(x: Tensor, q: Tensor) -> Tensor:
    """``X Q⁻¹``."""
    return x / q if q.dim() == 1 else torch.linalg.solve_triangular(q, x, upper=True, left=False)


def criterion_terms(a: Tensor, b: Tensor, left: bool, diagonal: bool) -> tuple[Tensor, Tensor]:
    """The criterion's gradient terms for one factor: ``AAᵀ, BBᵀ`` (left) or ``AᵀA, BᵀB`` (right); only their
    diagonals for a diagonal factor."""
    if diagonal:
        dim = 1 if left else 0
        return a.square().sum(dim), b.square().sum(dim)
    return _self_gram(a, left), _self_gram(b, left)


def _self_gram(x: Tensor, left: bool) -> Tensor:
    """``XXᵀ`` (left) or ``XᵀX``, multiplying only the blocks on and above the diagonal (``linalg.gram_``); a stack
    of matrices by one batched product."""
    if x.dim() == 3:
        return x @ x.mT if left else x.mT @ x
    rows = x.mT if left else x
    d = rows.shape[1]
    return linalg.gram_(rows.new_empty(d, d), rows, beta=0.0, alpha=1.0)
