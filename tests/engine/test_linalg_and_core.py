"""Numerical helpers and their fallbacks; the numerical core's independence from Lightning; adapter shape fuzzing."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_soo
from lightning_soo import linalg
from lightning_soo.capture.adapters import ConvAdapter, LinearAdapter
from tests.reference import explicit_patches, with_ones


def _spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return x @ x.T


def test_damped_inverse_matches_dense() -> None:
    m = _spd(6, 0)
    torch.testing.assert_close(linalg.damped_inverse(m, 0.1), torch.linalg.inv(m + 0.1 * torch.eye(6, dtype=m.dtype)))


def test_damped_inverses_are_row_major(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alone and batched (forced on the CPU), the inverse is stored row-major (the faster operand of the products)
    and equals the dense inverse."""
    m = _spd(6, 0)
    expected = torch.linalg.inv(m + 0.1 * torch.eye(6, dtype=m.dtype))
    monkeypatch.setattr(linalg, "BATCH_ON_CPU", True)
    for inv in [linalg.damped_inverse(m, 0.1), *linalg.damped_inverse_many([m, m.clone()], [0.1, 0.1])]:
        assert inv is not None and inv.is_contiguous()
        torch.testing.assert_close(inv, expected)


def test_damped_inverse_of_singular_and_slightly_indefinite() -> None:
    m = _spd(6, 1, rank=2)  # singular
    torch.testing.assert_close(linalg.damped_inverse(m, 1e-3), torch.linalg.inv(m + 1e-3 * torch.eye(6, dtype=m.dtype)))
    lam, q = torch.linalg.eigh(m)
    lam[0] = -1e-2  # indefinite beyond the damping: Cholesky fails, the eigen fallback clamps at 0
    bad = (q * lam) @ q.T
    inv = linalg.damped_inverse(bad, 1e-3)
    expected = (q / (lam.clamp(min=0) + 1e-3)) @ q.T
    torch.testing.assert_close(inv, expected)


def test_non_finite_inputs_return_none() -> None:
    m = _spd(4, 2)
    m[1, 2] = float("nan")
    assert linalg.damped_inverse(m, 0.1) is None
    assert linalg.eigh(m) is None
    assert linalg.inverse_root_eig(m, 0.1, 0.25) is None
    assert not linalg.all_finite(torch.tensor([1.0, float("inf")]))


def test_eigh_and_inverse_root() -> None:
    m = _spd(5, 3)
    lam, q = linalg.eigh(m)
    torch.testing.assert_close((q * lam) @ q.T, m)
    root = linalg.inverse_root_eig(m, 0.2, 0.25)[0]
    damped = m + 0.2 * torch.eye(5, dtype=m.dtype)
    torch.testing.assert_close(torch.linalg.matrix_power(root, 4) @ damped, torch.eye(5, dtype=m.dtype))


def test_numerical_core_imports_no_lightning() -> None:
    names = [
        m.name
        for m in pkgutil.walk_packages(lightning_soo.__path__, "lightning_soo.")
        if not m.name.startswith(("lightning_soo.callbacks", "lightning_soo.app", "lightning_soo.cli"))
    ]
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=25, deadline=None)
@given(
    nd=st.integers(1, 3),
    k=st.integers(1, 3),
    s=st.integers(1, 3),
    p=st.integers(0, 2),
    d=st.integers(1, 2),
    size=st.integers(5, 8),
    bias=st.booleans(),
)
def test_conv_patches_fuzz(nd: int, k: int, s: int, p: int, d: int, size: int, bias: bool) -> None:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1](2, 3, k, stride=s, padding=p, dilation=d, bias=bias)
    x = torch.randn(2, 2, *([size] * nd))
    adapter = ConvAdapter(conv)
    rows, n = adapter.input_rows(x)
    ref = explicit_patches(conv, x)
    ref = with_ones(ref) if bias else ref
    assert n == 2
    torch.testing.assert_close(rows, ref.reshape(-1, ref.shape[-1]))
    assert rows.shape[0] == conv(x)[0, 0].numel() * 2


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), bias=st.booleans())
def test_linear_rows_fuzz(lead: list[int], bias: bool) -> None:
    lin = nn.Linear(3, 2, bias=bias)
    x = torch.randn(*lead, 3)
    rows, n = LinearAdapter(lin).input_rows(x)
    expected = x.reshape(-1, 3)
    torch.testing.assert_close(rows, with_ones(expected) if bias else expected)
    assert n == expected.shape[0]
    d, m = LinearAdapter(lin).output_rows(torch.randn(*lead, 2))
    assert d.shape == (n, 2) and m == n


def test_eigh_retries_in_float64_then_with_a_shift(monkeypatch) -> None:
    m = _spd(5, 4).float()
    calls: list[tuple[torch.dtype, bool]] = []
    original = linalg._eigh

    def flaky(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shifted = len(calls) == 2
        calls.append((a.dtype, shifted))
        if len(calls) < 3:
            raise torch.linalg.LinAlgError("forced failure")
        return original(a)

    monkeypatch.setattr(linalg, "_eigh", flaky)
    lam, q = linalg.eigh(m)
    assert [c[0] for c in calls] == [torch.float32, torch.float64, torch.float64]
    torch.testing.assert_close((q * lam) @ q.T, m, rtol=1e-4, atol=1e-3)


def test_eigh_gives_up_with_none(monkeypatch) -> None:
    def broken(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(linalg, "_eigh", broken)
    assert linalg.eigh(_spd(4, 5)) is None
    assert linalg.inverse_root_eig(_spd(4, 5), 0.1, 0.25) is None


@pytest.mark.parametrize("width", [100, 384, 700, 1000])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_gram_blocks_equal_the_full_product(width: int, beta: float) -> None:
    """``linalg.gram_`` multiplies only the blocks on and above the diagonal: the same symmetric result as one
    ``addmm_``, symmetric, and ``beta=0`` ignores what ``out`` held (NaN included)."""
    gen = torch.Generator().manual_seed(width)
    rows = torch.randn(50, width, dtype=torch.float64, generator=gen)
    start = torch.randn(width, width, dtype=torch.float64, generator=gen)
    start = start + start.T if beta else torch.full_like(start, float("nan"))
    expected = torch.addmm(start if beta else torch.zeros_like(start), rows.T, rows, beta=beta, alpha=0.3)
    out = linalg.gram_(start.clone(), rows, beta=beta, alpha=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, out.T, rtol=1e-12, atol=1e-12)
