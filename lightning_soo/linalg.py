"""Damped inverses, eigendecompositions and inverse p-th roots of symmetric PSD matrices, with fallbacks.

Every function returns ``None`` instead of raising when the result cannot be computed or is not finite, so
callers can keep their last good preconditioner. Fallback order: the input dtype, then float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def all_finite(*tensors: Tensor) -> bool:
    """No NaN or Inf in any tensor. One reduction pass each (NaN and Inf propagate into the sum), cheaper than
    ``isfinite(x).all()``; a finite tensor whose sum overflows counts as non-finite, which is the safe side."""
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def left_mul(m: Tensor, g: Tensor) -> Tensor:
    """``M @ G`` for a dense ``M`` or a diagonal stored as a vector."""
    return m.unsqueeze(1) * g if m.dim() == 1 else m @ g


def right_mul(g: Tensor, m: Tensor) -> Tensor:
    """``G @ M`` for a dense ``M`` or a diagonal stored as a vector."""
    return g * m if m.dim() == 1 else g @ m


def symmetrize(m: Tensor) -> Tensor:
    return 0.5 * (m + m.mT)


def add_diagonal(m: Tensor, value: float) -> Tensor:
    """``m + value * I`` as a new tensor."""
    out = m.clone()
    out.diagonal().add_(value)
    return out


def damped_inverse(m: Tensor, damping: float) -> Tensor | None:
    """``(m + damping * I)^{-1}`` by Cholesky; eigendecomposition with clamping in float64 as fallback."""
    if not all_finite(m):
        return None
    a = m + m.mT
    a.mul_(0.5).diagonal().add_(damping)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        inv = torch.cholesky_inverse(chol)
        if all_finite(inv):
            return inv
    eig = eigh(m)
    if eig is None:
        return None
    lam, q = eig
    inv = (q / (lam.clamp(min=0) + damping)) @ q.mT
    return inv if all_finite(inv) else None


def eigh(m: Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD matrix.

    Retried in float64, then in float64 with a diagonal shift (``1e-6`` of the mean eigenvalue, removed from the
    eigenvalues afterwards), which helps LAPACK converge on nearly degenerate spectra; None if all fail.
    """
    if not all_finite(m):
        return None
    a = symmetrize(m)
    shift = 1e-6 * max(mean_eigenvalue(a), 1e-30)
    for dtype, jitter in ((a.dtype, 0.0), (torch.float64, 0.0), (torch.float64, shift)):
        try:
            lam, q = _eigh(add_diagonal(a.to(dtype), jitter) if jitter else a.to(dtype))
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
        if all_finite(lam) and all_finite(q):
            return (lam - jitter).clamp(min=0).to(m.dtype), q.to(m.dtype)
    return None


def _eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``; a separate name so fault-injection tests can make it fail."""
    return torch.linalg.eigh(a)


def inverse_root_eig(
    m: Tensor, damping: float, exponent: float, relative: bool = False
) -> tuple[Tensor, Tensor, float] | None:
    """``((m + ρI)^{-exponent}, eigenvalues of m + ρI, ρ)`` by eigendecomposition, ``ρ = damping`` or, with
    ``relative``, ``damping · λ_max(m)``; a 1-D ``m`` is a diagonal matrix. None when it cannot be computed."""
    if m.dim() == 1:
        if not all_finite(m):
            return None
        lam, q = m.clamp(min=0), None
    else:
        eig = eigh(m)
        if eig is None:
            return None
        lam, q = eig
    rho = max(damping * float(lam.max()) if relative and lam.numel() else damping, 1e-30)
    lam = lam + rho
    powered = lam.pow(-exponent)
    root = powered if q is None else (q * powered) @ q.mT
    return (root, lam, rho) if all_finite(root) else None


def inverse_root(m: Tensor, damping: float, exponent: float) -> Tensor | None:
    """``(m + damping * I)^{-exponent}`` (Shampoo's ``-1/4`` roots); None when it cannot be computed."""
    out = inverse_root_eig(m, damping, exponent)
    return None if out is None else out[0]


def mean_eigenvalue(m: Tensor) -> float:
    """``tr(m) / dim``, for dense (2-D) or diagonal (1-D) factors."""
    d = m.diagonal() if m.dim() == 2 else m
    return float(d.mean()) if d.numel() else 0.0
