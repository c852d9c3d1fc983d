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
    assert {p.parent.relative_to(tmp_path / "tensorboard").as_posix() for p in events} == {
        "sgd/version_0",
        "kfac/version_0",
    }
    rows = [line.split() for line in printed.splitlines() if line.startswith(("sgd", "kfac"))]
    assert len(rows) == 2 and all(math.isfinite(float(r[4])) for r in rows)
    # the report names the run and the method, and says it skipped the SGD baseline
    main(["report", str(tmp_path / "tensorboard"), "--out", str(tmp_path / "png")])
    printed = capsys.readouterr().out
    assert "kfac/version_0:" in printed and "skipped" in printed and "sgd/version_0" in printed
    assert [p.name for p in (tmp_path / "png").iterdir()] == ["report_kfac_version_0.png"]


def test_runs_into_the_same_folder_get_new_versions(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    from lightning_soo.app.data import digits
    from lightning_soo.app.train import train

    train_set, test_set = digits()
    data = (TensorDataset(*train_set[:256]), test_set)
    for _ in range(2):
        train("kfac", batch_size=128, epochs=1, lr=0.1, log_dir=tmp_path, data=data, hidden=8)
    assert sorted(p.name for p in (tmp_path / "kfac").iterdir()) == ["version_0", "version_1"]
