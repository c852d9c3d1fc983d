"""Running second-moment statistic ``E[x xᵀ]`` of rows, dense or diagonal."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_soo.capture.rows import Count, IndexRows, RowCount, Rows, count_tensor
from lightning_soo.linalg import gram_, gram_cuts, host_decides, mirror_


def step_mean_(sums: Tensor, divisor: Tensor, scale: float | Tensor, squared: bool) -> Tensor:
    """A step's sums (one matrix, or a stack with ``divisor`` shaped to broadcast) turned into its mean times
    ``scale``, in place; ``squared``: the sums still owe the count's square (``Factor.add``), and
    ``Σ n²xxᵀ / n = n Σ xxᵀ``. In as few operations as a device launches."""
    unit = isinstance(scale, float) and scale == 1.0
    if squared:
        return sums.mul_(divisor) if unit else sums.mul_(divisor * scale)
    return sums.div_(divisor) if unit else sums.mul_(scale / divisor)


def fold_where_(value: Tensor, mean: Tensor, flag: Tensor, decay: float | None) -> None:
    """``value ← decay·value + (1 − decay)·mean`` (``decay`` None: ``value + mean``, AdaGrad-style) where the
    device flag holds; elsewhere ``value`` stays. ``mean`` is overwritten."""
    if decay is None:  # a rejected step adds zero
        value.add_(torch.where(flag, mean, mean.new_zeros(()), out=mean))
    elif decay == 0.0:
        torch.where(flag, mean, value, out=value)
    else:  # a rejected step folds the old value into itself: unchanged
        value.lerp_(torch.where(flag, mean, value, out=mean), 1.0 - decay)


class Factor:
    """Sums of ``x xᵀ`` (or of ``x²`` when diagonal) over one step, folded into a running average.

    ``decay`` is the weight of the old average: 0 keeps only the latest step. The step sum is not zeroed when a step
    closes: the first product of the next step overwrites it (``beta=0``), which saves a pass over the matrix.

    A Gram wide enough for ``linalg.gram_``'s blocks is multiplied on and above the diagonal only, and the step sum's
    lower blocks are left as they were: the fold carries them into the running value as they are, and the value's
    lower blocks are mirrored from the upper ones when it is read (``value``: every refresh, save or check), once per
    read instead of once per statistics step (785 columns: three block copies a step).
    """

    def __init__(self, dim: int, *, diagonal: bool, dtype: torch.dtype, device: torch.device) -> None:
        self.dim, self.diagonal = dim, diagonal
        self.dtype, self.device = dtype, device
        self._shape = (dim,) if diagonal else (dim, dim)
        self._sum_t: Tensor | None = None  # allocated at the first rows (``_sum``): a layer the census drops never has
        self._count = torch.zeros((), dtype=dtype, device=device)  # a tensor so ranks can sum it with the sums
        self._tally: Tensor | RowCount | None = None  # the step's count (the padding rule's): the first as it is
        self._squared = False  # the step sum still owes a factor of the count squared (``add``'s ``squared``)
        self._value: Tensor | None = None
        self._halves = not diagonal and gram_cuts(dim, device) is not None  # step sums hold their upper blocks only
        self._mirror_due = False  # the running value's lower blocks are stale (mirrored when read)
        self._pending = False  # rows were added this step (kept on the host: no device sync to know it)
        self._stale = False  # ``_sum`` still holds a closed step's values (zero before reading)
        self._normalised = False  # ``_sum`` holds the step's mean so far (on the host, which reads the counts)
        self._n = 0.0  # the step's count as a number (where the host decides: all of it)
        self._moved = False  # the step's count was moved into ``_count`` (to be summed across ranks)
        self.bank: Any = None  # the ``banks.FactorBank`` whose stacked tensors hold this factor's, if any

    @property
    def _sum(self) -> Tensor:
        """The step sum, allocated when first needed: layers built at set-up and left plain by the census at the first
        step (a mixture-of-experts model's 3-d experts under ``grouped_mm``) cost no memory."""
        s = self._sum_t
        if s is None:
            s = self._sum_t = torch.zeros(self._shape, dtype=self.dtype, device=self.device)
        return s

    @_sum.setter
    def _sum(self, t: Tensor) -> None:
        self._sum_t = t

    @property
    def value(self) -> Tensor | None:
        """The running average (None before the first statistics), symmetric."""
        if self._mirror_due and self._value is not None:
            mirror_(self._value)
        self._mirror_due = False
        return self._value

    @value.setter
    def value(self, value: Tensor | None) -> None:
        self._value, self._mirror_due = value, False

    @property
    def pending(self) -> bool:
        return self._pending

    @property
    def count(self) -> float:
        """The step's count so far (reads the device where the count lives there)."""
        return self._n if host_decides(self._sum) and not self._moved else float(self._counted())

    def _counted(self) -> Tensor:
        """The step's count as a tensor: the count tensor the rows came with (no copy; a sum when there were
        several), or ``_count`` filled with the numbers, or ``_count`` summed across ranks."""
        tally = self._tally
        if self._moved or tally is None:
            return self._count if self._moved else self._count.fill_(self._n)
        tally = count_tensor(tally)
        return tally if self._n == 0.0 else tally + self._n

    def tally(self) -> Tensor | RowCount:
        """The step's count as its rows came with it (a ``RowCount`` not reduced yet), for a bank to count its
        members at once; else ``_counted``."""
        tally = self._tally
        return tally if isinstance(tally, RowCount) and self._n == 0.0 and not self._moved else self._counted()

    def _zeroed(self) -> Tensor:
        if self._stale:
            self._sum.zero_()
            self._stale = False
        return self._sum

    def _as_sum(self) -> Tensor:
        """The step's statistic as a sum (a mean kept on the host turns back into one)."""
        if self._normalised:
            self._sum.mul_(self.count)
            self._normalised = False
        return self._zeroed()

    def statistics_tensors(self) -> list[Tensor]:
        """This step's sums and count, to be summed in place across ranks."""
        if self._squared:  # each rank's own count: applied before the ranks' sums are added
            self._sum.mul_(self._counted().square())
            self._squared = False
        if not self._moved:
            if host_decides(self._sum):
                self._count.fill_(self._n)
            else:
                self._count.copy_(self._counted())
            self._moved = True
        return [self._as_sum(), self._count]

    def count_examples(self, count: Count) -> None:
        """Add ``count`` to the divisor without rows (their rows are zero): under data parallelism, the examples of a
        rank on which the layer saw no call, which the other ranks' rows are averaged over too; of the backward
        passes a layer was not called in (``engine.layer.count_missed_passes``). Rows already added keep their own
        weight: a mean kept on the host turns back into a sum, and rows owed their count's square get it now."""
        if self._squared:
            self._sum.mul_(self._counted().square())
            self._squared = False
        self._as_sum()
        if host_decides(self._sum) and not self._moved:
            self._n += float(count)
        else:
            self._add_count(count)

    def rows_elsewhere(self) -> None:
        """Another rank had rows for this factor in this step, summed into it: it folds like a factor with rows."""
        self._pending = True

    def add(
        self,
        rows: Rows,
        count: Count,
        scale: float = 1.0,
        weights: Tensor | None = None,
        squared: Tensor | RowCount | None = None,
    ) -> None:
        """Add ``Σ x xᵀ`` over ``rows`` (times ``scale``) and ``count`` to the divisor (a tensor when it depends on
        the data); for one-hot rows, ``weights`` (default: the rows' own) gives each row's weight. ``squared``: the
        rows stand for ``squared · rows`` (a mean loss's count, undone): where it is the count itself, and this the
        step's first dense rows on the device, the sum is multiplied by it squared when the step closes (``fold``),
        not the rows now: a pass over the rows fewer."""
        if self._squared:  # a second call this step: the first call's rows take their weight now
            self._sum.mul_(self._counted().square())
            self._squared = False
        if squared is not None:
            first = not (self._pending or self.diagonal or isinstance(rows, IndexRows) or host_decides(self._sum))
            if squared is count and first:
                self._squared = True
            elif isinstance(rows, IndexRows):  # one-hot rows: their weights take the square
                weights = weights if weights is not None else rows.weights
                sq = count_tensor(squared).square()
                weights = sq if weights is None else weights * sq
            else:
                rows = rows * count_tensor(squared)
        if isinstance(rows, IndexRows):
            weights = weights if weights is not None else rows.weights
            if weights is not None:
                ones = (weights * scale).to(self._sum.dtype)
            else:
                ones = torch.full(rows.index.shape, scale, dtype=self._sum.dtype, device=self._sum.device)
            target = self._as_sum() if self.diagonal else self._as_sum().diagonal()
            target.index_add_(0, rows.index, ones)
        elif self.diagonal:
            self._as_sum().add_(rows.square().sum(0), alpha=scale)
        elif host_decides(self._sum) and (self._normalised or not self._pending):
            self._add_mean(rows, float(count), scale)
        else:  # the first product of a step overwrites the stale sum (beta=0 ignores it, NaN included)
            gram_(self._sum, rows, beta=0.0 if self._stale else 1.0, alpha=scale, mirror=False)
            self._stale = False
        if host_decides(self._sum) and not self._moved:
            self._n += float(count)  # free on the CPU: no tensor to update and zero per step
        else:
            self._add_count(count)
        self._pending = True

    def takes_first(self) -> bool:
        """``add_first`` applies: a dense factor with no rows yet this step."""
        return not (self._pending or self.diagonal or self._moved or self._squared)

    def add_first(self, rows: Tensor, count: int | RowCount, squared: bool = False) -> None:
        """``add(rows, count)``, or with ``squared`` ``add(rows, count, count²)`` (a number) or ``add(rows, count,
        squared=count)`` (a count for the close), for the step's first rows where ``takes_first`` (``count > 0``):
        in the few lines the usual call needs (``Preconditioner.observe_dense``)."""
        if isinstance(count, int):  # the host's path: the step's mean in the product itself (``_add_mean``)
            gram_(self._sum, rows, beta=0.0, alpha=count if squared else 1.0 / count, mirror=False)
            self._n, self._normalised = float(count), True
        else:  # counted when the statistics close, which owe the count's square (``add``'s ``squared``)
            gram_(self._sum, rows, beta=0.0, alpha=1.0, mirror=False)
            self._tally, self._squared = count, squared
        self._pending, self._stale = True, False

    def _add_count(self, count: Count) -> None:
        """Count rows on the device: a count tensor is kept as it is (no operation; the adapter made it and does not
        change it), a second one added to it, numbers on the host."""
        if self._moved:  # after the counts were summed across ranks (not in a normal step)
            self._count.add_(count_tensor(count) if isinstance(count, RowCount) else count)
        elif isinstance(count, Tensor | RowCount):
            self._tally = count if self._tally is None else count_tensor(self._tally) + count_tensor(count)
        else:
            self._n += count

    def _add_mean(self, rows: Tensor, count: float, scale: float) -> None:
        """Keep the step's mean instead of its sum, in the product itself (``beta``/``alpha``), so the fold needs
        no division pass: the host reads the counts, free on the CPU."""
        seen = self.count if self._pending else 0.0
        total = seen + count
        if total > 0:
            gram_(self._sum, rows, beta=seen / total, alpha=scale / total, mirror=False)
            self._normalised = True
        else:  # no example yet (padding only): an ordinary sum
            gram_(self._sum, rows, beta=0.0 if not self._pending else 1.0, alpha=scale, mirror=False)
        self._stale = False

    def fold(self, decay: float | None, scale: float | Tensor = 1.0, keep: Tensor | bool | None = None) -> bool:
        """Fold this step's mean times ``scale`` into the running average (weight ``decay`` on the old value;
        None adds it instead, AdaGrad-style); where the flag ``keep`` is False the old value stays. Returns False
        (and folds nothing) when a first value would not be finite: on an accelerator that one check reads the
        device, once per factor and run (``linalg.host_decides``: the CPU reads every flag, and skips passes). A
        step whose count is zero (every row was padding) folds nothing."""
        if host_decides(self._sum):
            return self._fold_on_host(decay, scale, self.count > 0 and (keep is None or bool(keep)))
        self._as_sum()
        count = self._counted()
        counted = count > 0
        flag = counted if keep is None else torch.as_tensor(keep, device=counted.device) & counted
        divisor = torch.where(counted, count, 1.0)
        mean = step_mean_(self._sum, divisor, scale, self._squared)
        value = self._value
        if value is None:
            ok = bool(flag)
            self._value = mean.clone() if ok else None
            self._mirror_due = ok and self._halves
            self.reset()
            return ok
        fold_where_(value, mean, flag, decay)
        self._mirror_due |= self._halves
        self.reset()
        return True

    def _fold_on_host(self, decay: float | None, scale: float | Tensor, keep: bool) -> bool:
        """``fold`` with the flag read: a rejected step touches nothing, a kept one takes two passes at most."""
        value = self._value
        if keep:
            c = float(scale) if self._normalised else float(scale) / self.count
            if value is None:
                self._value = self._sum.mul(c)
            elif decay is None:
                value.add_(self._sum, alpha=c)
            elif decay == 0.0:
                torch.mul(self._sum, c, out=value)
            elif c == 1.0:  # the usual case: one pass
                value.lerp_(self._sum, 1.0 - decay)
            else:
                value.mul_(decay).add_(self._sum, alpha=(1.0 - decay) * c)
            self._mirror_due |= self._halves
        self.reset()
        return keep or value is not None

    @property
    def step_sum(self) -> Tensor:
        """This step's statistic: its sum, or on the host its mean so far."""
        return self._zeroed()

    @property
    def finite_probe(self) -> Tensor:
        """What decides whether all of this step's statistic is finite: the trace of a dense one (0-d), the entries
        of a diagonal one. It is a sum of Grams ``Σ c·xxᵀ`` (``c ≥ 0``): a NaN or Inf in a row's entry ``j`` reaches
        ``S_jj``, and ``|S_jk| ≤ √(S_jj S_kk)`` keeps the rest finite when the diagonal is; the diagonal entries are
        not negative, so their sum cannot cancel an Inf. One operation over ``d`` entries instead of ``d²``."""
        total = self._zeroed()
        return total if self.diagonal else torch.trace(total)

    def reset(self) -> None:
        self._tally, self._squared = None, False
        self._n, self._moved = 0.0, False
        self._pending = self._normalised = False
        self._stale = True
