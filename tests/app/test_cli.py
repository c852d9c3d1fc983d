"""``lightning-soo compare --quick`` and ``lightning-soo report`` (smoke tests with their outputs checked)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_soo import CurvatureScheduler, KFACCallback
from lightning_soo.cli import build_parser, main
from tests.cases import MLP


def test_help_is_complete() -> None:
    text = build_parser().format_help()
    assert all(cmd in text for cmd in ("demo", "compare", "report"))


def test_compare_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["compare", "--quick", "--methods", "sgd", "kfac", "--batch-sizes", "64", "512", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "[4/4]" in printed and "test acc" in printed
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert {(r["method"], r["batch_size"]) for r in rows} == {("sgd", 64), ("kfac", 64), ("sgd", 512), ("kfac", 512)}
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_report_from_logs(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="run", version="0")
    callbacks = [
        KFACCallback(),
        CurvatureScheduler(frequent_fraction=0.5, frequent_interval=2, quality_every_n_steps=2),
    ]
    L.Trainer(
        max_steps=10,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    ).fit(MLP())
    main(["report", str(tmp_path / "logs"), "--out", str(tmp_path / "png")])
    pngs = list((tmp_path / "png").glob("report_*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000


def test_report_without_logs_fails(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
