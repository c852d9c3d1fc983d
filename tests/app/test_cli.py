"""``lightning-soo compare --quick`` and ``lightning-soo report`` (smoke tests with their outputs checked)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_soo
from lightning_soo import CurvatureScheduler, KFACCallback
from lightning_soo.app.report import read_method, read_scalars, title
from lightning_soo.cli import CONFIGS, build_parser, main
from tests.cases import MLP

ROOT = Path(__file__).resolve().parents[2]


def test_help_is_complete() -> None:
    text = build_parser().format_help()
    assert all(cmd in text for cmd in ("demo", "compare", "report", "config", "advise", "--version"))


def test_help_version_and_config_import_neither_torch_nor_lightning() -> None:
    code = (
        "import sys\n"
        "from lightning_soo.cli import build_parser, config_text\n"
        "build_parser().format_help(); config_text('kfac')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'numpy', 'yaml'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    out = subprocess.run([sys.executable, "-m", "lightning_soo", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"lightning-soo {lightning_soo.__version__}"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_prints_the_packaged_file(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    main(["config", name])
    printed = capsys.readouterr().out
    assert printed == (ROOT / "lightning_soo" / "configs" / f"{name}.yaml").read_text()
    assert yaml.safe_load(printed)["trainer"]["callbacks+"]


def test_config_list(capsys: pytest.CaptureFixture[str]) -> None:
    main(["config", "--list"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(CONFIGS)


def test_root_configs_are_the_packaged_ones() -> None:
    """callbacks/*.yaml (for readers of the repository) are byte-equal copies of the package data."""
    packaged = {p.name: p.read_bytes() for p in (ROOT / "lightning_soo" / "configs").glob("*.yaml")}
    root = {p.name: p.read_bytes() for p in (ROOT / "callbacks").glob("*.yaml")}
    assert packaged == root, "copy lightning_soo/configs/*.yaml to callbacks/ (the package data is the source)"
    assert set(packaged) == {f"{name}.yaml" for name in CONFIGS}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--batch-sizes", "0"], "positive integer"),
        (["compare", "--epochs", "-1"], "positive integer"),
        (["demo", "--batch-size", "x"], "positive integer"),
        (["config", "nope"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused_by_the_parser(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_report_on_a_missing_folder_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    with pytest.raises(SystemExit, match="does not exist"):
        main(["report", str(missing)])
    assert not missing.exists()


def test_compare_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.perf_counter()
    main(["compare", "--quick", "--methods", "sgd", "kfac", "--batch-sizes", "64", "512", "--out", str(tmp_path)])
    assert time.perf_counter() - t0 < 60  # a smoke run: seconds, not minutes
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
    run = tmp_path / "logs" / "run" / "0"
    assert read_method(run) == "kfac" and title("kfac", "run/0") == "K-FAC — run run/0"
    _, refreshes = read_scalars(run)["soo/refreshes"]
    assert refreshes[-1] == 3  # refreshes at steps 0, 2, 4, then frozen: counted per refresh, not per layer


def test_report_without_logs_fails(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
