"""Running second-moment statistic ``E[x xᵀ]`` of rows, dense or diagonal."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_soo.capture.adapters import IndexRows, Rows


class Factor:
    """Sums of ``x xᵀ`` (or of ``x²`` when diagonal) over one step, folded into a running average.

    ``decay`` is the weight of the old average: 0 keeps only the latest step.
    """

    def __init__(self, dim: int, *, diagonal: bool, dtype: torch.dtype, device: torch.device) -> None:
        self.dim, self.diagonal = dim, diagonal
        self.dtype, self.device = dtype, device
        shape = (dim,) if diagonal else (dim, dim)
        self._sum = torch.zeros(shape, dtype=dtype, device=device)
        self._count = torch.zeros((), dtype=dtype, device=device)  # a tensor so ranks can sum it with the sums
        self.value: Tensor | None = None
        self._pending = False  # rows were added this step (kept on the host: no device sync to know it)

    @property
    def pending(self) -> bool:
        return self._pending

    def statistics_tensors(self) -> list[Tensor]:
        """This step's sums and count, to be summed in place across ranks."""
        return [self._sum, self._count]

    def add(self, rows: Rows, count: int | Tensor, scale: float = 1.0, weights: Tensor | None = None) -> None:
        """Add ``Σ x xᵀ`` over ``rows`` (times ``scale``) and ``count`` to the divisor (a tensor when it depends on
        the data); for one-hot rows, ``weights`` (default: the rows' own) gives each row's weight."""
        if isinstance(rows, IndexRows):
            weights = weights if weights is not None else rows.weights
            if weights is not None:
                ones = (weights * scale).to(self._sum.dtype)
            else:
                ones = torch.full(rows.index.shape, scale, dtype=self._sum.dtype, device=self._sum.device)
            if self.diagonal:
                self._sum.index_add_(0, rows.index, ones)
            else:
                self._sum.diagonal().index_add_(0, rows.index, ones)
        elif self.diagonal:
            self._sum.add_(rows.square().sum(0), alpha=scale)
        else:
            self._sum.addmm_(rows.mT, rows, alpha=scale)
        self._count.add_(count)
        self._pending = True

    def fold(self, decay: float | None, scale: float | Tensor = 1.0, keep: Tensor | None = None) -> bool:
        """Fold this step's mean times ``scale`` into the running average (weight ``decay`` on the old value;
        None adds it instead, AdaGrad-style); where the device flag ``keep`` is False the old value stays. Returns
        False (and folds nothing) when a first value would not be finite: that one check reads the device, once
        per factor and run. A step whose count is zero (every row was padding) folds nothing."""
        counted = self._count > 0
        keep = counted if keep is None else keep & counted
        mean = self._sum.mul_(scale / torch.where(counted, self._count, torch.ones_like(self._count)))  # in place
        if self.value is None:
            ok = bool(keep)
            self.value = mean.clone() if ok else None
            self.reset()
            return ok
        if decay is None:  # a rejected step adds zero
            self.value.add_(torch.where(keep, mean, mean.new_zeros(()), out=mean))
        elif decay == 0.0:
            torch.where(keep, mean, self.value, out=self.value)
        else:  # a rejected step folds the old value into itself: unchanged
            self.value.lerp_(torch.where(keep, mean, self.value, out=mean), 1.0 - decay)
        self.reset()
        return True

    @property
    def step_sum(self) -> Tensor:
        """This step's unnormalised sum (for finiteness checks)."""
        return self._sum

    def reset(self) -> None:
        self._sum.zero_()
        self._count.zero_()
        self._pending = False
