"""The running statistic ``Factor``: the finiteness probe (the diagonal of a sum of Grams) catches every non-finite
entry of the rows, whichever path (sum, host-kept mean, one-hot, diagonal) accumulated them."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_soo.capture.adapters import IndexRows
from lightning_soo.linalg import all_finite
from lightning_soo.preconditioners.statistics import Factor


def _factor(dim: int, diagonal: bool = False) -> Factor:
    return Factor(dim, diagonal=diagonal, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("calls", [1, 2])  # the second call takes the host's running-mean path
def test_probe_catches_every_non_finite_entry(bad: float, diagonal: bool, calls: int) -> None:
    torch.manual_seed(0)
    rows = torch.randn(6, 5)
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            f = _factor(5, diagonal)
            poisoned = rows.clone()
            poisoned[i, j] = bad
            for _ in range(calls - 1):
                f.add(torch.randn(3, 5), 3)
            f.add(poisoned, 6, scale=0.5)
            assert not all_finite(f.finite_probe), (i, j)
            assert not all_finite(f.step_sum)  # the probe agrees with the whole statistic
    f = _factor(5, diagonal)
    f.add(rows, 6)
    assert all_finite(f.finite_probe)
    assert f.finite_probe.numel() == 5  # d entries, not d²


def test_probe_of_finite_rows_whose_off_diagonal_is_large() -> None:
    """Finite rows give a finite statistic: the off-diagonal is bounded by the diagonal (Cauchy-Schwarz)."""
    f = _factor(3)
    f.add(torch.tensor([[1e18, 1e18, -1e18]]), 1)
    assert all_finite(f.finite_probe) and all_finite(f.step_sum)


def test_probe_of_one_hot_rows() -> None:
    f = _factor(7)
    f.add(IndexRows(torch.tensor([1, 3, 3]), 7, torch.tensor([1.0, math.nan, 1.0])), 3)
    assert not all_finite(f.finite_probe)
