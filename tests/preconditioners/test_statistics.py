"""The running statistic ``Factor``: the finiteness probe (the trace of a sum of Grams) catches every non-finite
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
    assert f.finite_probe.numel() == (5 if diagonal else 1)  # one number (the trace) for a dense one, not d²


def test_probe_overflows_to_the_safe_side() -> None:
    """Finite rows whose diagonal sums past the largest float are rejected, never accepted as finite."""
    f = _factor(2)
    f.add(torch.tensor([[3e19, 3e19]]), 1)
    assert not all_finite(f.finite_probe)


def test_probe_of_finite_rows_whose_off_diagonal_is_large() -> None:
    """Finite rows give a finite statistic: the off-diagonal is bounded by the diagonal (Cauchy-Schwarz)."""
    f = _factor(3)
    f.add(torch.tensor([[1e18, 1e18, -1e18]]), 1)
    assert all_finite(f.finite_probe) and all_finite(f.step_sum)


def test_probe_of_one_hot_rows() -> None:
    f = _factor(7)
    f.add(IndexRows(torch.tensor([1, 3, 3]), 7, torch.tensor([1.0, math.nan, 1.0])), 3)
    assert not all_finite(f.finite_probe)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device-path"])
@pytest.mark.parametrize("decay", [0.9, 0.0, None])
def test_wide_factor_mirrors_its_value_when_read(host: bool, decay: float | None, monkeypatch) -> None:
    """A Gram wide enough for blocks keeps only its upper blocks per step; the value read is the dense running
    average, also after a rejected step whose rows held NaN."""
    from lightning_soo import linalg

    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
    dim = 2 * linalg.GRAM_BLOCK + 5
    assert linalg.gram_cuts(dim, torch.device("cpu")) is not None
    f = Factor(dim, diagonal=False, dtype=torch.float64, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    expected = None
    for step in range(5):
        calls = [torch.randn(7, dim, generator=gen, dtype=torch.float64) for _ in range(1 + step % 2)]
        if step == 2:
            calls[0][3, 5] = math.nan
        for rows in calls:
            f.add(rows, rows.shape[0])
        keep = step != 2
        assert all_finite(f.finite_probe) == keep
        f.fold(decay, 1.0, keep)
        if not keep:
            continue
        rows = torch.cat(calls)
        mean = rows.T @ rows / rows.shape[0]
        if expected is None:
            expected = mean
        elif decay is None:
            expected = expected + mean
        else:
            expected = decay * expected + (1 - decay) * mean
        if step % 2:  # read every other step: folds in between carry stale lower blocks
            value = f.value
            assert value is not None
            torch.testing.assert_close(value, expected)
    value = f.value
    assert value is not None
    torch.testing.assert_close(value, expected)
