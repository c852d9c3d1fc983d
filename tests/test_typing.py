"""mypy passes on the package and on a user's script that calls every public callback, and catches a wrong
argument type in the public API (the package ships ``py.typed``; the lazily imported names are visible to it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the `test` extra")

ROOT = Path(__file__).resolve().parents[1]

USER_SCRIPT = """
    import lightning as L
    import torch
    from torch import nn

    import lightning_soo
    from lightning_soo import (
        CurvatureScheduler,
        GaussNewtonCallback,
        KFACCallback,
        KFACOptions,
        PreconditionerManager,
        PSGDCallback,
        ScaledDamping,
        ShampooCallback,
    )

    def damping_rule(step: int, lr: float, batch_size: int | None) -> float:
        return 1e-2 * lr

    callbacks: list[L.Callback] = [
        KFACCallback(damping=ScaledDamping(1e-2, reference_lr=0.1, reference_batch_size=128), kl_clip=None),
        KFACCallback(damping=damping_rule, inverse="eigen", exclude=["decoder"], weight_sharing="reduce"),
        ShampooCallback(damping=1e-4, statistics="gradient", grafting=None, statistics_interval=2),
        GaussNewtonCallback(damping=0.3, damping_mode="relative", max_examples=512),
        PSGDCallback(fit="hessian", lr_preconditioner=0.1, preconditioner_interval=None),
        CurvatureScheduler(frequent_fraction=0.03, interval=None, quality_every_n_steps=None),
    ]
    trainer = L.Trainer(max_epochs=1, callbacks=callbacks)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    manager = PreconditionerManager(model, "kfac", options=KFACOptions(damping=1e-3))
    manager.begin_step()
    manager.step(torch.optim.SGD(model.parameters(), lr=0.1))
    version: str = lightning_soo.__version__
    advise = lightning_soo.advise  # its signature is visible through the lazy import
    if False:
        advise(L.LightningModule(), None, {"max_epochs": 1}, methods="kfac", steps=10, clock="cpu")
"""

BAD_SCRIPT = """
    from lightning_soo import KFACCallback, ShampooCallback

    KFACCallback(damping="large")
    ShampooCallback(statistics="per-example")
    KFACCallback(weight_sharing="sum")
"""


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *args]
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # an editable install is invisible to mypy: find the source
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_mypy_passes_on_the_package_and_a_user_script(tmp_path: Path) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    proc = _mypy("lightning_soo", str(script))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_mypy_catches_wrong_argument_types(tmp_path: Path) -> None:
    script = tmp_path / "bad_script.py"
    script.write_text(textwrap.dedent(BAD_SCRIPT))
    proc = _mypy(str(script))
    assert proc.returncode == 1, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert {line.split(":")[1] for line in errors} == {"4", "5", "6"}, proc.stdout
    assert all('"KFACCallback"' in e or '"ShampooCallback"' in e for e in errors), proc.stdout
