"""Every drop-in config in callbacks/ works with an unmodified LightningCLI project, next to the user's callbacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "tests" / "cli_project"
CONFIGS = sorted((ROOT / "callbacks").glob("*.yaml"))


def _class_names(config: Path) -> list[str]:
    entries = yaml.safe_load(config.read_text())["trainer"]["callbacks+"]
    return [entry["class_path"].rsplit(".", 1)[-1] for entry in entries]


PRECONDITIONERS = [p for p in CONFIGS if p.stem != "curvature"]


def _with_preconditioner(config: Path) -> list[Path]:
    """The curvature config schedules a preconditioner callback: pair it with K-FAC's."""
    return [ROOT / "callbacks" / "kfac.yaml", config] if config.stem == "curvature" else [config]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_appends_active_callback(config: Path, tmp_path: Path) -> None:
    configs = [arg for c in _with_preconditioner(config) for arg in ("--config", str(c))]
    cmd = [
        sys.executable, str(PROJECT / "train.py"), "fit",
        "--config", str(PROJECT / "user.yaml"), *configs,
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=True)["callbacks"]
    assert state["CountSteps"] == {"steps": 8}  # the user's own callback is still there
    for name in [n for c in _with_preconditioner(config) for n in _class_names(c)]:
        if "counters" in state.get(name, {}):  # preconditioner callbacks: the gradients were rewritten every step
            assert state[name]["counters"]["preconditioned_steps"] == 8
        else:
            assert name in state


def test_every_method_has_a_config() -> None:
    assert {p.stem for p in CONFIGS} >= {"kfac", "shampoo", "gauss_newton", "psgd", "curvature"}


@pytest.mark.parametrize(
    "name", ["KFACCallback", "ShampooCallback", "GaussNewtonCallback", "PSGDCallback", "CurvatureScheduler"]
)
def test_cli_help_shows_every_argument(name: str) -> None:
    import inspect

    import lightning_soo

    cls = getattr(lightning_soo, name)
    cmd = [sys.executable, str(PROJECT / "train.py"), "fit", "--trainer.callbacks.help", f"lightning_soo.{name}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from lightning_soo.callbacks import StepArguments

    for arg, param in inspect.signature(cls.__init__).parameters.items():
        if param.kind is param.VAR_KEYWORD:  # the arguments every method shares
            for shared in StepArguments.__annotations__:
                assert f"--trainer.callbacks.{shared}" in proc.stdout
        elif arg != "self":
            assert f"--trainer.callbacks.{arg}" in proc.stdout
