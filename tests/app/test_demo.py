"""The ``lightning-soo`` command: ``--help`` and a quick demo run."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_soo.cli import build_parser, main


def test_help_lists_subcommands() -> None:
    text = build_parser().format_help()
    assert "demo" in text
    out = subprocess.run([sys.executable, "-m", "lightning_soo.cli", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--batch-size" in out.stdout


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["demo", "--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "kfac" in printed and "sgd" in printed and "test acc" in printed
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert {p.parent.name for p in events} == {"sgd", "kfac"}
    rows = [line.split() for line in printed.splitlines() if line.startswith(("sgd", "kfac"))]
    assert len(rows) == 2 and all(math.isfinite(float(r[4])) for r in rows)
