"""The benchmarks run in their quick form (tiny settings) and write their JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _quick(script: str, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_overhead_quick(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = _quick("overhead.py", out)
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} >= {"kfac", "kfac-eigen", "kfac-frozen", "shampoo", "gauss_newton", "psgd"}
    assert all(r["ratio"] > 0 and r["flop_floor"] >= 1 for r in rows)
    assert "ratio" in proc.stdout
    # every method is timed beside its bare reference, the measured floor
    bare = {r["method"] for r in rows if r.get("bare_ratio", 0) > 0 and r.get("ratio_over_bare", 0) > 0}
    assert bare == {r["method"] for r in rows}


def test_peers_quick(tmp_path: Path) -> None:
    """Runs with whatever peers are installed (the ``bench`` extra); the library's own contenders always run."""
    out = tmp_path / "peers.json"
    _quick("peers.py", out)
    result = json.loads(out.read_text())
    ours = {r["contender"] for r in result["rows"]}
    assert {"sgd", "psgd whitening (ours)", "psgd newton (ours)", "shampoo, gradient stats (ours)"} <= ours
    assert all(r["ratio"] > 0 for r in result["rows"])
    assert all(why for why in result["unavailable"].values())  # a peer that cannot run says why, never crashes
    assert not ours & set(result["unavailable"])


def test_refresh_quick(tmp_path: Path) -> None:
    """Layer by layer against batched refreshes."""
    out = tmp_path / "refresh.json"
    _quick("refresh.py", out)
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"kfac", "kfac-eigen", "shampoo", "gauss_newton"}
    assert all(r["per_layer_ms"] > 0 and r["batched_ms"] > 0 for r in rows)


def test_launches_quick(tmp_path: Path) -> None:
    """Operations per step, layer by layer and stacked: stacking never adds any, and frozen steps take fewer."""
    out = tmp_path / "launches.json"
    _quick("launches.py", out)
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"kfac", "shampoo", "gauss_newton", "psgd"}
    assert all(r["sgd_ops"] > 0 and r["stacked_ops"] <= r["alone_ops"] for r in rows)
    deep = {(r["method"], r["steps"]): r["stacked_ops"] for r in rows if r["setting"] == "deep"}
    assert all(deep[(m, "frozen")] < deep[(m, "collecting")] for m in ("kfac", "shampoo", "gauss_newton", "psgd"))


def test_gram_flops_count_the_blocks_gram_multiplies() -> None:
    """The FLOP floor counts a statistic's Gram as ``linalg.gram_`` takes it: one product below two column blocks,
    the blocks on and above the diagonal above (785 columns: four blocks, 62% of the full product)."""
    from benchmarks.overhead import gram_flops

    assert gram_flops(10, 100, "cpu") == 2 * 10 * 100 * 100
    assert 0.6 < gram_flops(10, 785, "cpu") / (2 * 10 * 785**2) < 0.65
    assert gram_flops(10, 785, "cuda") == 2 * 10 * 785 * 785  # accelerators split only from 1024 columns


def test_host_quick(tmp_path: Path) -> None:
    """Host time per layer on the accelerator's path, and the library's lines per layer (a deterministic count)."""
    out = tmp_path / "host.json"
    _quick("host.py", out)
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"kfac", "shampoo", "gauss_newton", "psgd"}
    assert all(100 < r["lines_per_layer"] < 1000 for r in rows)
    assert all("host_us_one_more_layer" in r for r in rows)


def test_moe_quick(tmp_path: Path) -> None:
    """A mixture-of-experts model, experts grouped and eager: every method preconditions almost all of it."""
    import pytest

    pytest.importorskip("transformers")
    out = tmp_path / "moe.json"
    _quick("moe.py", out)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["experts"], r["method"]) for r in rows} == {
        (e, m) for e in ("grouped_mm", "eager") for m in ("kfac", "shampoo", "psgd")
    }
    assert all(r["ratio"] > 0 and r["managed_share"] > 0.95 for r in rows)


def test_options_cost_quick(tmp_path: Path) -> None:
    """Each coverage option manages more of its model, and costs layers and operations."""
    out = tmp_path / "options_cost.json"
    proc = _quick("options_cost.py", out)
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"regnet_y_400mf", "gpt2"} and "operations" in proc.stdout
    for off, on in zip(rows[::2], rows[1::2], strict=True):
        assert on["managed_share"] > off["managed_share"] and on["layers"] > off["layers"]
        assert on["operations"] > off["operations"] > on["sgd_operations"] and on["ratio"] > 0
    assert [r["managed_share"] for r in rows[1::2]] == [pytest.approx(0.993, abs=1e-3), 1.0]
