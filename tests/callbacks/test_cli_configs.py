"""Every drop-in config (lightning_soo/configs, copied to callbacks/) works with an unmodified LightningCLI
project, next to the user's callbacks; the command-line forms the README shows work as it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "tests" / "cli_project"
CONFIGS = sorted((ROOT / "lightning_soo" / "configs").glob("*.yaml"))  # callbacks/ holds equal copies


def _class_names(config: Path) -> list[str]:
    entries = yaml.safe_load(config.read_text())["trainer"]["callbacks+"]
    return [entry["class_path"].rsplit(".", 1)[-1] for entry in entries]


PRECONDITIONERS = [p for p in CONFIGS if p.stem != "curvature"]


def _with_preconditioner(config: Path) -> list[Path]:
    """The curvature config schedules a preconditioner callback: pair it with K-FAC's."""
    return [ROOT / "lightning_soo" / "configs" / "kfac.yaml", config] if config.stem == "curvature" else [config]


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


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(PROJECT / "train.py"), "fit", "--config", str(PROJECT / "user.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def _callbacks(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)["trainer"]["callbacks"]


def test_command_line_form_without_a_file(tmp_path: Path) -> None:
    """README: `--trainer.callbacks+=lightning_soo.KFACCallback --trainer.callbacks.damping=0.03` trains."""
    proc = _cli(
        "--trainer.callbacks+=lightning_soo.KFACCallback",
        "--trainer.callbacks.damping=0.03",
        "--trainer.default_root_dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = tmp_path.rglob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    assert state["CountSteps"] == {"steps": 8} and state["KFACCallback"]["counters"]["preconditioned_steps"] == 8


def test_config_order_matters(tmp_path: Path) -> None:
    """README: a user config that sets `trainer.callbacks`, given after ours, replaces the list."""
    kfac = str(ROOT / "lightning_soo" / "configs" / "kfac.yaml")
    after = _callbacks(_cli("--config", kfac, "--print_config", cwd=tmp_path))
    assert [c["class_path"] for c in after] == ["__main__.CountSteps", "lightning_soo.KFACCallback"]
    cmd = [sys.executable, str(PROJECT / "train.py"), "fit", "--config", kfac, "--config", str(PROJECT / "user.yaml")]
    before = _callbacks(subprocess.run([*cmd, "--print_config"], capture_output=True, text=True, cwd=tmp_path))
    assert [c["class_path"] for c in before] == ["__main__.CountSteps"]


def test_arguments_of_two_appended_callbacks(tmp_path: Path) -> None:
    """README: `--trainer.callbacks.ARG` sets the last appended callback; a JSON value sets an earlier one."""
    kfac_forms = [
        ['--trainer.callbacks+={"class_path": "lightning_soo.KFACCallback", "init_args": {"damping": 0.03}}'],
        ["--trainer.callbacks+=lightning_soo.KFACCallback", "--trainer.callbacks.damping=0.03"],
    ]
    for kfac_args in kfac_forms:
        scheduler_args = [
            "--trainer.callbacks+=lightning_soo.CurvatureScheduler",
            "--trainer.callbacks.frequent_fraction=0.2",
        ]
        proc = _cli(*kfac_args, *scheduler_args, "--print_config", cwd=tmp_path)
        kfac, scheduler = _callbacks(proc)[1:]
        assert kfac["init_args"]["damping"] == 0.03 and scheduler["init_args"]["frequent_fraction"] == 0.2


def test_curvature_config_alone_says_which_config_to_add(tmp_path: Path) -> None:
    proc = _cli("--config", str(ROOT / "lightning_soo" / "configs" / "curvature.yaml"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "found none" in proc.stderr and "lightning-soo config kfac > kfac.yaml" in proc.stderr


@pytest.mark.parametrize(
    "name", ["KFACCallback", "ShampooCallback", "GaussNewtonCallback", "PSGDCallback", "CurvatureScheduler"]
)
def test_first_docstring_line_is_a_sentence(name: str) -> None:
    """LightningCLI's help shows the first docstring line as the callback's title: a whole sentence."""
    import lightning_soo

    first = (getattr(lightning_soo, name).__doc__ or "").strip().splitlines()[0]
    assert first.endswith(".") and first.count(". ") == 0 and len(first) <= 110, first
