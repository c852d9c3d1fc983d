"""Damped inverses, eigendecompositions and inverse p-th roots of symmetric PSD matrices, with fallbacks.

Every function returns ``None`` instead of raising when the result cannot be computed or is not finite, so
callers can keep their last good preconditioner. Fallback order: the input dtype, then float64.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


def _total(t: Tensor) -> Tensor:
    """``t``'s sum (a 0-d ``t`` is its own: no operation)."""
    return t if t.dim() == 0 else t.sum()


def all_finite(*tensors: Tensor) -> bool:
    """No NaN or Inf in any tensor. One reduction pass each (NaN and Inf propagate into the sum), cheaper than
    ``isfinite(x).all()``; a finite tensor whose sum overflows counts as non-finite, which is the safe side."""
    return math.isfinite(sum(float(_total(t)) for t in tensors))


def finite(*tensors: Tensor) -> Tensor | bool:
    """``finite_flag`` where the device keeps its decisions, ``all_finite`` where the host reads them
    (``host_decides``)."""
    return all_finite(*tensors) if host_decides(tensors[0]) else finite_flag(*tensors)


def finite_flag(*tensors: Tensor) -> Tensor:
    """A 0-d bool tensor on the device: no NaN or Inf in any tensor (one reduction each; a finite tensor whose
    sum overflows counts as non-finite, the safe side). Nothing is read back: decide with ``torch.where``."""
    total = _total(tensors[0])
    for t in tensors[1:]:
        total = total + _total(t)
    return is_finite(total)


def is_finite(t: Tensor) -> Tensor:
    """``torch.isfinite(t)`` in two operations instead of four (``0·x`` is 0 for every finite ``x``, NaN for NaN
    and ±Inf): on an accelerator each is a kernel launch, and the hot path takes this once or twice per layer."""
    return t.mul(0).eq(0)


#: Where the flags of the hot path (finite or not, a factor counted or not) are decided. On an accelerator they stay
#: on the device (``torch.where``; reading one would drain the queue). On the CPU reading a flag costs nothing, while
#: each ``torch.where`` over a factor or a gradient is a full memory pass: there the host reads the flag and skips the
#: pass. Tests set it False to run the accelerator's path on the CPU.
HOST_DECIDES_ON_CPU = True


def host_decides(t: Tensor) -> bool:
    """Decide about ``t``'s flags on the host (a CPU tensor, unless ``HOST_DECIDES_ON_CPU`` is off)."""
    return HOST_DECIDES_ON_CPU and t.device.type == "cpu"


def stacks_on(device: torch.device) -> bool:
    """Equal layers on ``device`` close and fit as one stack (``preconditioners.banks``, ``psgd_math``): where the
    device decides, and on the CPU only with ``BATCH_ON_CPU`` (and ``HOST_DECIDES_ON_CPU`` off)."""
    return device.type != "cpu" or (BATCH_ON_CPU and not HOST_DECIDES_ON_CPU)


#: width of the column blocks of ``gram_`` (no blocks below two of them); on accelerators from ``GRAM_MIN_GPU`` columns
GRAM_BLOCK = 192
GRAM_MIN_GPU = 1024


def gram_cuts(d: int, device: torch.device) -> list[int] | None:
    """The column-block boundaries ``gram_`` multiplies a ``d``-column Gram in (None: one product)."""
    parts = min(4, d // GRAM_BLOCK) if device.type == "cpu" or d >= GRAM_MIN_GPU else 1
    return None if parts < 2 else [d * i // parts for i in range(parts + 1)]


def gram_(out: Tensor, rows: Tensor, beta: float, alpha: float, mirror: bool = True) -> Tensor:
    """``out ← beta·out + alpha·rowsᵀrows`` in place (``beta=0`` ignores ``out``, NaN included), for a symmetric
    ``out``: only the column blocks on and above the diagonal are multiplied (up to four blocks: 62% of the
    multiply-adds) and the rest mirrored, or left as they were without ``mirror`` (``mirror_`` fills them later;
    ``gram_cuts`` says whether there are any). On the CPU 20-30% faster from 512 columns (2048 x 785 rows: 16.4
    to 11.5 ms, one thread); narrower products, and accelerators below ``GRAM_MIN_GPU`` columns, take one
    ``addmm_``."""
    cuts = gram_cuts(rows.shape[1], rows.device)
    if cuts is None:
        return out.addmm_(rows.mT, rows, beta=beta, alpha=alpha)
    for a, b in itertools.pairwise(cuts):
        out[a:b, a:].addmm_(rows[:, a:b].mT, rows[:, a:], beta=beta, alpha=alpha)
    return mirror_(out) if mirror else out


def mirror_(out: Tensor) -> Tensor:
    """Copy the blocks on and above the diagonal of ``gram_``'s partition into the ones below (in place)."""
    cuts = gram_cuts(out.shape[-1], out.device)
    for a, b in itertools.pairwise(cuts[1:] if cuts is not None else []):
        out[a:b, :a].copy_(out[:a, a:b].mT)
    return out


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


def _row_major(inv: Tensor) -> Tensor:
    """A symmetric ``cholesky_inverse`` (LAPACK's column-major result, its two triangles equal exactly) as the
    row-major view of itself: the products that use it are 2% faster on the CPU (512 x 512 by 512 x 784, one
    thread)."""
    return inv.mT if inv.stride(-1) != 1 else inv


def damped_inverse(m: Tensor, damping: float) -> Tensor | None:
    """``(m + damping * I)^{-1}`` by Cholesky; eigendecomposition with clamping in float64 as fallback."""
    if not all_finite(m):
        return None
    a = m + m.mT
    a.mul_(0.5).diagonal().add_(damping)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        inv = _row_major(torch.cholesky_inverse(chol))
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


def mean_eigenvalue(m: Tensor) -> float:
    """``tr(m) / dim``, for dense (2-D) or diagonal (1-D) factors."""
    d = m.diagonal() if m.dim() == 2 else m
    return float(d.mean()) if d.numel() else 0.0


# -- many matrices at once: one batched call per group of equal shape, dtype and device -----------------------------
#: stack equally shaped CPU matrices too (tests and ``benchmarks/refresh.py`` set it to exercise the batched path)
BATCH_ON_CPU = False


def _groups(ms: list[Tensor], cpu: bool = False) -> list[list[int]]:
    """Indices of equally shaped matrices on an accelerator. On the CPU every matrix is its own group: LAPACK
    already spreads one decomposition over the cores, and stacking measured 3-12% slower there
    (``benchmarks/refresh.py``); the batch pays where each call is a kernel launch, and (``cpu``) where each is a
    small product whose call costs more than its work."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, m in enumerate(ms):
        batch = m.device.type != "cpu" or BATCH_ON_CPU or cpu
        key = (tuple(m.shape), m.dtype, m.device) if batch else (i,)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def damped_inverse_many(ms: list[Tensor], dampings: list[float]) -> list[Tensor | None]:
    """``[damped_inverse(m, d) ...]`` with one batched Cholesky per group of equal shapes (a transformer's
    blocks share theirs); a matrix whose factorisation fails falls back to ``damped_inverse`` alone. One device
    read per group."""
    out: list[Tensor | None] = [None] * len(ms)
    for idx in _groups(ms):
        if len(idx) == 1:  # alone (always, on the CPU): the single-matrix path has fewer operations (234 -> 137 µs
            out[idx[0]] = damped_inverse(ms[idx[0]], dampings[idx[0]])  # for a 129 x 129 factor, one thread)
            continue
        s = torch.stack([ms[i] for i in idx])
        s = (s + s.mT).mul_(0.5)
        shift = torch.tensor([dampings[i] for i in idx], dtype=s.dtype, device=s.device)
        s.diagonal(dim1=-2, dim2=-1).add_(shift.unsqueeze(-1))
        chol, info = torch.linalg.cholesky_ex(s)
        factored = (info == 0).reshape(-1, 1, 1)  # failed members get an identity factor: their turn comes alone
        eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
        inv = _row_major(torch.cholesky_inverse(torch.where(factored & torch.isfinite(chol), chol, eye)))
        ok = ((info == 0) & torch.isfinite(inv.sum((-2, -1)))).tolist()
        for k, i in enumerate(idx):
            out[i] = inv[k] if ok[k] else damped_inverse(ms[i], dampings[i])
    return out


def eigh_many(ms: list[Tensor]) -> list[tuple[Tensor, Tensor] | None]:
    """``[eigh(m) ...]`` with one batched ``torch.linalg.eigh`` per group of equal shapes; a group whose batched
    call fails, or a member whose result is not finite, falls back to ``eigh`` (with its retries) alone."""
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(ms)
    for idx in _groups(ms):
        if len(idx) == 1:  # alone (always, on the CPU): no stacking
            out[idx[0]] = eigh(ms[idx[0]])
            continue
        s = torch.stack([ms[i] for i in idx])
        try:
            lam, q = _eigh((s + s.mT).mul_(0.5))
            ok = (torch.isfinite(lam.sum(-1)) & torch.isfinite(q.sum((-2, -1)))).tolist()
        except RuntimeError:
            ok = [False] * len(idx)
        for k, i in enumerate(idx):
            out[i] = (lam[k].clamp(min=0), q[k]) if ok[k] else eigh(ms[i])
    return out


def inverse_root_many(
    ms: list[Tensor], damping: float, exponent: float, relative: bool = False
) -> list[tuple[Tensor, Tensor, float] | None]:
    """``[inverse_root_eig(m, ...) ...]`` with batched eigendecompositions (``eigh_many``) and one device read for
    every ``ρ`` and finiteness verdict; 1-D ``m`` are diagonal matrices."""
    eigs: list[tuple[Tensor, Tensor | None] | None] = [None] * len(ms)
    dense = [i for i, m in enumerate(ms) if m.dim() == 2]
    for i, eig in zip(dense, eigh_many([ms[i] for i in dense]), strict=True):
        eigs[i] = eig
    for i, m in enumerate(ms):
        if m.dim() == 1:
            eigs[i] = (m.clamp(min=0), None)
    present = [i for i, e in enumerate(eigs) if e is not None]
    if not present:
        return [None] * len(ms)
    tops = torch.stack([eigs[i][0].amax() for i in present]).tolist()  # type: ignore[index]
    out: list[tuple[Tensor, Tensor, float] | None] = [None] * len(ms)
    roots: list[tuple[int, Tensor, Tensor, float]] = []
    for i, top in zip(present, tops, strict=True):
        lam, q = eigs[i]  # type: ignore[misc]
        rho = max(damping * top if relative else damping, 1e-30)
        lam = lam + rho
        powered = lam.pow(-exponent)
        roots.append((i, powered if q is None else (q * powered.unsqueeze(-2)) @ q.mT, lam, rho))
    finite = torch.stack([torch.isfinite(root.sum()) for _, root, _, _ in roots]).tolist()
    for (i, root, lam, rho), ok in zip(roots, finite, strict=True):
        out[i] = (root, lam, rho) if ok and math.isfinite(rho) else None
    return out


# -- the Gram matrices of examples (Gauss-Newton): top eigenvalues and Cholesky factors ------------------------------
#: columns and passes of the subspace iteration of ``largest_eigenvalue_many``
TOP_BLOCK, TOP_PASSES = 8, 8


def largest_eigenvalue_many(ks: list[Tensor]) -> list[float]:
    """λ_max of each PSD ``k`` by subspace iteration: ``TOP_BLOCK`` columns (the all-ones vector, ``K𝟙`` being the
    examples' gradients projected on their mean, the dominant direction early on, and fixed pseudo-random ones)
    multiplied by ``K`` ``TOP_PASSES`` times and re-orthonormalised, then the largest Ritz value. A lower bound that
    converges like ``(λ_{block+1} / λ_1)^(2·passes)``; each pass reads ``K`` once for all its columns (9 reads of an
    ``N x N`` matrix, where power iteration took 31), equally shaped matrices stacked (``_groups``; on the CPU too,
    where each pass is a thin product and QR: 48 matrices of 256 x 256 took 21 ms stacked against 37 one by one,
    two threads), one host read per group. NaN for a matrix that is not finite; the user's random stream is
    untouched."""
    out = [0.0] * len(ks)
    for idx in _groups(ks, cpu=True):
        k = ks[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([ks[i] for i in idx])  # alone: no copy
        n = k.shape[-1]
        if n == 0:
            continue
        generator = torch.Generator(device=k.device).manual_seed(0)
        x = torch.randn(n, min(TOP_BLOCK, n), generator=generator, dtype=k.dtype, device=k.device)
        x[:, 0] = 1.0
        x = x.expand(len(idx), -1, -1)
        try:
            for _ in range(TOP_PASSES):
                x = torch.linalg.qr(k @ x).Q
            tops = torch.linalg.eigvalsh(symmetrize(x.mT @ (k @ x)))[..., -1].tolist()
        except RuntimeError:  # a non-finite member (LAPACK may refuse it): each on its own
            tops = [largest_eigenvalue_many([ks[i]])[0] if len(idx) > 1 else math.nan for i in idx]
        for i, top in zip(idx, tops, strict=True):
            out[i] = top
    return out


def cholesky_many(ms: list[Tensor]) -> list[Tensor | None]:
    """Lower Cholesky factors of SPD matrices (row-major: one layout everywhere, so solves agree bitwise across
    ranks), equally shaped ones in one batched call (``_groups``); a member that fails, or is alone, takes
    ``cholesky`` (retried in float64); None where it fails."""
    out: list[Tensor | None] = [None] * len(ms)
    for idx in _groups(ms):
        if len(idx) == 1:
            out[idx[0]] = cholesky(ms[idx[0]])
            continue
        chol, info = torch.linalg.cholesky_ex(torch.stack([ms[i] for i in idx]))
        ok = ((info == 0) & torch.isfinite(chol.sum((-2, -1)))).tolist()
        for k, i in enumerate(idx):
            out[i] = chol[k].contiguous() if ok[k] else cholesky(ms[i])
    return out


def cholesky(s: Tensor) -> Tensor | None:
    """Lower Cholesky factor of the SPD ``s`` (row-major); retried in float64; None on failure."""
    if not all_finite(s):
        return None
    for dtype in (s.dtype, torch.float64):
        chol, info = torch.linalg.cholesky_ex(s.to(dtype))
        if int(info) == 0 and all_finite(chol):
            return chol.to(s.dtype).contiguous()
    return None
