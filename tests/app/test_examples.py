"""The examples run (quick mode) and learn."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_pytorch_example() -> None:
    losses = _load("plain_pytorch").main(["--quick"])
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_existing_project_example() -> None:
    metrics = _load("existing_project").main(["--quick"])
    assert metrics["val_acc"] > 0.5 and math.isfinite(metrics["train_loss_epoch"])


def test_dashboard_example(tmp_path: Path) -> None:
    pngs = _load("dashboard").main(["--quick", "--out", str(tmp_path)])
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
