"""The overhead benchmark runs (tiny settings) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_overhead_quick(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} >= {"kfac", "kfac-eigen", "kfac-frozen", "shampoo", "gauss_newton", "psgd"}
    assert all(r["ratio"] > 0 and r["flop_floor"] >= 1 for r in rows)
    assert "ratio" in proc.stdout


def test_peers_quick(tmp_path: Path) -> None:
    """Runs with whatever peers are installed (the ``bench`` extra); the library's own contenders always run."""
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    ours = {r["contender"] for r in result["rows"]}
    assert {"sgd", "psgd whitening (ours)", "psgd newton (ours)", "shampoo, gradient stats (ours)"} <= ours
    assert all(r["ratio"] > 0 for r in result["rows"])
    assert all(why for why in result["unavailable"].values())  # a peer that cannot run says why, never crashes
    assert not ours & set(result["unavailable"])
