"""Equally shaped factors of many layers closed as one stack: a statistics step's finiteness probes, count
normalisation and fold into the running averages in a handful of operations per stack instead of per layer.

Per layer, a K-FAC step closes with about eighteen device operations (the probes, ``count > 0``, the divisor, the
division, the kept-or-old choice and the ``lerp_``, for each factor). On an accelerator each is a kernel launch of a
few microseconds that a narrow layer's short kernels cannot hide, so a deep stack of equal blocks pays them 48 times
a step. A ``FactorBank`` keeps the step sums and running values of its members' factors as views of stacked tensors
(``sums[i]`` is member ``i``'s ``Factor._sum``), so the hooks' products write into the stack as they always did; the
step's counts (the tensors the rows came with) are stacked when it closes, and the close is the same arithmetic as
``Factor.fold`` on the stacked tensors (``close``).

A bank is built the first time a group of layers closes together with a value each (a first value is checked on the
host, once per factor and run: ``Factor.fold``) and copies their tensors in; it is kept while its members' tensors
are still its views (a checkpoint load or a dropped first value replaces them: the next close rebuilds the bank).
A member that closes without the others (it saw no rows this step) folds alone, through the same views. Used where
the device decides (``linalg.host_decides`` is False) and stacks are built (not on the CPU unless
``linalg.BATCH_ON_CPU``). On the CPU each fold is already one pass, decided on the host, and a host-decided bank (one
``lerp_`` per stack) measured the same as the layer-by-layer folds on the deep MLP of ``benchmarks/overhead.py``
(K-FAC 1.002, Shampoo 0.994, interleaved in one process): there the time goes into the passes, not their launches.

On the accelerator's path one more equal layer adds 6 operations to a K-FAC statistics step (28 before banks) and
8 to Shampoo's (32): ``tests/engine/test_launches.py``; the members' counts are reduced here, in one reduction
(``capture.rows.count_many``). Under data parallelism the ranks sum the step sums in place
through the bank's views (``statistics_tensors``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_soo import linalg
from lightning_soo.capture.rows import count_many
from lightning_soo.preconditioners.statistics import Factor, fold_where_, step_mean_

#: smallest number of layers worth a bank
MIN_MEMBERS = 2

Sides = list[tuple[Factor, "float | Tensor"]]  # a layer's factors to fold, each with the scale of its step mean


class FactorBank:
    """The factors of ``rows`` (one list of factors per member, equal dimensions position by position) as views
    of stacked sums and values."""

    def __init__(self, rows: list[list[Factor]]) -> None:
        self.rows = rows
        self.sums: list[Tensor] = []
        self.values: list[Tensor] = []
        for j in range(len(rows[0])):
            column = [row[j] for row in rows]
            self.sums.append(torch.stack([f._sum for f in column]))
            self.values.append(torch.stack([f._value for f in column]))  # type: ignore[misc]
            for i, f in enumerate(column):
                f._sum, f._value = self.sums[j][i], self.values[j][i]
                f.bank = self
        self._views = [[(f._sum, f._value) for f in row] for row in rows]

    def valid(self) -> bool:
        """Every member's tensors are still this bank's views (a load or a dropped first value replaces them)."""
        for row, views in zip(self.rows, self._views, strict=True):
            for f, (s, v) in zip(row, views, strict=True):
                if f._sum is not s or f._value is not v:
                    return False
        return True

    def uniform(self) -> bool:
        """Each factor position owes its count's square (``Factor.add``'s ``squared``) in every member or in none."""
        return all(len({row[j]._squared for row in self.rows}) == 1 for j in range(len(self.rows[0])))

    def has(self, rows: list[list[Factor]]) -> bool:
        """``rows`` are this bank's members, in its order."""
        return len(rows) == len(self.rows) and all(a[0] is b[0] for a, b in zip(rows, self.rows, strict=True))

    def close(self, scales: Sequence[float | Tensor], decay: float | None) -> Tensor:
        """Fold every member's step into its running averages, as ``Factor.fold`` does one by one (``scales``:
        one per factor position); returns the members' flags (True: the step's statistics were finite, kept)."""
        probe = self.sums[0].diagonal(dim1=1, dim2=2).sum(1)  # ``Factor.finite_probe``: the traces
        for sums in self.sums[1:]:
            probe = probe + sums.diagonal(dim1=1, dim2=2).sum(1)
        keep = linalg.is_finite(probe)
        last: tuple[list[Tensor], Tensor] | None = None  # K-FAC's two factors count the same tensors: stacked once
        for j, (sums, values, scale) in enumerate(zip(self.sums, self.values, scales, strict=True)):
            tallies = [row[j].tally() for row in self.rows]
            if last is None or any(a is not b for a, b in zip(tallies, last[0], strict=True)):
                last = (tallies, count_many(tallies))
            counted = last[1] > 0
            flag = (keep & counted).reshape(-1, 1, 1)
            divisor = torch.where(counted, last[1], 1.0).reshape(-1, 1, 1)
            fold_where_(values, step_mean_(sums, divisor, scale, self.rows[0][j]._squared), flag, decay)
        self._reset()
        return keep

    def _reset(self) -> None:
        for row in self.rows:
            for f in row:
                f._mirror_due |= f._halves
                f.reset()


def _bankable(sides: Sides | None) -> bool:
    """Every factor dense, decided on the device, with rows this step and a running value (not a first fold)."""
    if not sides or not linalg.stacks_on(sides[0][0].device):
        return False
    return all(not f.diagonal and f.pending and f._value is not None for f, _ in sides)


def _bank_for(rows: list[list[Factor]]) -> FactorBank | None:
    """The bank these members close in: theirs, or a new one when members joined or none is banked yet; None
    when some of a bank's members saw no rows this step, or when a member called twice this step took its count's
    square early (they fold alone, through the bank's views)."""
    known = {id(b): b for row in rows if (b := row[0].bank) is not None}  # each bank checked once, not per member
    banks = {key: b for key, b in known.items() if b.valid()}
    if len(banks) == 1 and (bank := next(iter(banks.values()))).has(rows):
        return bank if bank.uniform() else None
    if all(len(b.rows) < len(rows) for b in banks.values()):
        bank = FactorBank(rows)
        return bank if bank.uniform() else None
    return None


def close_banked(
    pres: Sequence[Any],
    sides_of: Callable[[Any], Sides | None],
    decay_of: Callable[[Any], float | None],
    close_alone: Callable[[Any], Tensor | bool | None],
) -> list[Tensor | bool | None]:
    """Close the statistics of ``pres``: those whose factors (``sides_of``; None: not bankable) match in shape and
    decay, as banks; the others with ``close_alone``. Returns each one's ``close_statistics`` flag."""
    if not any(linalg.stacks_on(p.device) for p in pres):  # the CPU: every layer alone, with no grouping work
        return [close_alone(p) for p in pres]
    groups: dict[tuple, list[tuple[int, Sides]]] = {}
    results: list[Tensor | bool | None] = [None] * len(pres)
    alone = []
    for i, pre in enumerate(pres):
        sides = sides_of(pre)
        if sides is None or not _bankable(sides):
            alone.append(i)
            continue
        f0 = sides[0][0]
        scales = tuple(id(s) if isinstance(s, Tensor) else s for _, s in sides)
        key = (tuple(f.dim for f, _ in sides), scales, f0.dtype, f0.device, decay_of(pre))
        groups.setdefault(key, []).append((i, sides))
    for key, members in groups.items():
        bank = _bank_for([[f for f, _ in sides] for _, sides in members]) if len(members) >= MIN_MEMBERS else None
        if bank is None:
            alone += [i for i, _ in members]
            continue
        keep = bank.close([scale for _, scale in members[0][1]], key[-1])
        for k, (i, _) in enumerate(members):
            results[i] = keep[k]
    for i in sorted(alone):
        results[i] = close_alone(pres[i])
    return results
