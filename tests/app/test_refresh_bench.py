"""The refresh benchmark (layer by layer against batched) runs in its quick form and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_refresh_quick(tmp_path: Path) -> None:
    out = tmp_path / "refresh.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "refresh.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"kfac", "kfac-eigen", "shampoo"}
    assert all(r["per_layer_ms"] > 0 and r["batched_ms"] > 0 for r in rows)
