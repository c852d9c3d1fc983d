"""Cheaper Kronecker products on statistics steps with few examples: ``L·G·R = (L·Δᵀ)(H̄·R)`` when ``G = Δᵀ H̄``.

On a statistics step the capture hooks hold the rows a layer's gradient is made of: ``G = Δᵀ H̄`` (``Δ`` the output
gradients autograd handed the layer, ``H̄`` its inputs with the bias column; padding rows are zero in both sums). Then
``P·G = L·G·R = (L·Δᵀ)(H̄·R)``, which costs ``2N(d_out² + d_in² + d_out·d_in)`` multiply-adds instead of
``2·d_out·d_in·(d_out + d_in)``: fewer whenever ``N`` is below about two thirds of the width (batch 256 on the
785 x 512 first layer of the 784-512-512-10 MLP: 37% fewer).

The identity holds only if nothing else wrote into the gradient: an L2 term in the loss, a second call of the layer,
gradient accumulation, an all-reduce, a gradient hook. So it is checked, each time, with random probes (Freivalds):
for random ``u``, ``v`` (two of each), ``uᵀ L (G - ΔᵀH̄) R v`` estimates the preconditioned residual, and unless it is
below ``TOLERANCE`` of ``uᵀ L G R v`` the plain product is taken. The check reuses the factored form's own
intermediates ``L·Δᵀ`` and ``H̄·R`` and the probes' images ``Lᵀu``, ``R v`` (drawn again at each refresh), so it costs
one read of ``G``; the probes come from a generator of their own, so the user's random stream is untouched.

The check is read on the host, which is free on the CPU only (``linalg.host_decides``); on an accelerator it would
add a synchronisation per layer, so there the plain products run (they are also where an accelerator is fastest).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_soo.preconditioners.base import Preconditioner

#: the preconditioned residual, relative to the preconditioned gradient, below which ``G = ΔᵀH̄`` is taken as exact
TOLERANCE = 1e-4
#: the factored form must save at least this share of the plain form's multiply-adds (the probes and the less
#: regular shapes of its products cost something)
MARGIN = 0.8


def worth(rows: int, d_out: int, d_in: int) -> bool:
    """The factored form is cheaper than the plain one for a ``d_out x d_in`` layer and ``rows`` rows."""
    return rows * (d_out * d_out + d_in * d_in + d_out * d_in) < MARGIN * d_out * d_in * (d_out + d_in)


@dataclass
class Kept:
    """A layer's captured calls since its last product, and the rows of the first (when it pays)."""

    calls: int = 0
    rows: tuple[Tensor, Tensor] | None = None

    def keep(self, shape: tuple[int, int], h: Tensor, d: Tensor) -> None:
        """Hold one call's rows (input rows ``h``, raw output gradients ``d``) of a ``d_out x d_in`` layer, when it
        is the step's first call and the factored form pays; a second call drops them."""
        self.calls += 1
        d_out, d_in = shape
        first = self.calls == 1 and h.shape[1] == d_in and d.shape[1] == d_out
        self.rows = (h, d) if first and worth(h.shape[0], d_out, d_in) else None

    def another_use(self) -> None:
        """A call whose rows are not kept (a transposed use of a tied weight, one-hot rows, a row block, the
        accelerator's path) also wrote into the gradient: ``G = ΔᵀH̄`` of the kept rows no longer holds."""
        self.calls += 1
        self.rows = None

    def forget(self) -> None:
        self.calls, self.rows = 0, None


class Probes:
    """Random probes ``u``, ``v`` (two columns each) and their images ``Lᵀu``, ``R v`` per layer, drawn again when
    the layer's operands change (a refresh, a load), from a generator of their own seeded for reproducible runs."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}
        self._sides: dict[str, tuple[tuple[Any, int, Any, int], tuple[Tensor, Tensor, Tensor, Tensor]]] = {}

    def _randn(self, rows: int, like: Tensor) -> Tensor:
        gen = self._generators.get(like.device)
        if gen is None:
            gen = self._generators[like.device] = torch.Generator(like.device).manual_seed(0)
        return torch.randn(rows, 2, generator=gen, dtype=like.dtype, device=like.device)

    def sides(self, name: str, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(u, v, Lᵀu, R v)`` for the layer ``name`` and these operands (weak references and version counters
        tell a replaced or modified operand)."""
        cached = self._sides.get(name)
        if cached is not None:
            (lref, lver, rref, rver), found = cached
            if lref() is left and rref() is right and lver == left._version and rver == right._version:
                return found
        u, v = self._randn(left.shape[0], left), self._randn(right.shape[0], right)
        found = (u, v, left.mT @ u, right @ v)
        self._sides[name] = ((weakref.ref(left), left._version, weakref.ref(right), right._version), found)
        return found


def precondition(kept: Kept, name: str, pre: Preconditioner, g: Tensor, probes: Probes) -> Tensor:
    """``P·G`` for the layer ``name``: factored through the step's rows where they make ``G`` (checked) and that
    pays, the preconditioner's own product otherwise. The rows are released either way."""
    rows = kept.rows if kept.calls == 1 else None
    kept.forget()
    operands = pre.kronecker_operands() if rows is not None else None
    if operands is None or rows is None:
        return pre.precondition(g)
    left, right = operands
    h, d = rows
    u, v, lu, rv = probes.sides(name, left, right)
    ld, hr = left @ d.mT, h @ right  # L·Δᵀ, H̄·R
    direct = lu.mT @ (g.to(left.dtype) @ rv)  # uᵀ L G R v
    through = (u.mT @ ld) @ (hr @ v)  # uᵀ (L Δᵀ)(H̄ R) v
    return ld @ hr if agree(direct, through) else pre.precondition(g)


def agree(direct: Tensor, through: Tensor) -> bool:
    """The probes of ``L G R`` and of ``(L Δᵀ)(H̄ R)`` agree to ``TOLERANCE`` (read on the host)."""
    return bool(torch.linalg.vector_norm(direct - through) <= TOLERANCE * torch.linalg.vector_norm(direct))
