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
        shape = (dim,) if diagonal else (dim, dim)
        self._sum = torch.zeros(shape, dtype=dtype, device=device)
        self._count = torch.zeros((), dtype=dtype, device=device)  # a tensor so ranks can sum it with the sums
        self.value: Tensor | None = None

    @property
    def pending(self) -> bool:
        return bool(self._count > 0)

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

    def average(self, scale: float = 1.0) -> Tensor | None:
        """This step's mean times ``scale``; None when nothing was added."""
        if not self.pending:
            return None
        return self._sum * (scale / float(self._count))

    def commit(self, batch: Tensor, decay: float) -> None:
        if self.value is None or decay == 0.0:
            self.value = batch
        else:
            self.value.mul_(decay).add_(batch, alpha=1.0 - decay)
        self.reset()

    def fold(self, decay: float, scale: float = 1.0) -> None:
        """Fold this step's mean times ``scale`` into the running average in place (no temporary)."""
        weight = scale / float(self._count)
        if self.value is None or decay == 0.0:
            self.value = self._sum * weight
        else:
            self.value.mul_(decay).add_(self._sum, alpha=(1.0 - decay) * weight)
        self.reset()

    @property
    def step_sum(self) -> Tensor:
        """This step's unnormalised sum (for finiteness checks)."""
        return self._sum

    def reset(self) -> None:
        self._sum.zero_()
        self._count.zero_()
