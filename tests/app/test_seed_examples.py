"""The seed-figure scripts run in --quick mode (smoke test): a verdict line, a JSON and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("seed_*.py"))
SCRIPTS = [s for s in SCRIPTS if s.name != "seed_common.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_seed_script_quick(script: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(script), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VERDICT [" in proc.stdout
    results = list(tmp_path.glob("*_quick.json"))
    assert len(results) == 1 and "verdict" in json.loads(results[0].read_text())
    assert list(tmp_path.glob("*.png"))


def test_quick_runs_leave_the_committed_results_alone(tmp_path: Path) -> None:
    """A ``--quick`` run into the default results folder writes ``*_quick.*`` beside the committed results and
    changes none of them."""
    import hashlib
    import shutil

    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns("__pycache__"))
    committed = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (copy / "results").iterdir()}
    proc = subprocess.run(
        [sys.executable, str(copy / "seed_damping.py"), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (copy / "results").iterdir()}
    assert {name: after[name] for name in committed} == committed
    new = set(after) - set(committed)
    assert {"damping_quick.json", "damping_digits_quick.png", "damping_mnist1d_quick.png"} <= new
    assert all(name.endswith(("_quick.json", "_quick.png")) for name in new)
