"""Data parallelism: 2-process DDP (gloo, CPU) with half the batch per rank equals one process on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_run.py")


def _run(tmp_path: Path, devices: int, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--devices", str(devices), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    ckpt = str(tmp / "ddp.ckpt")
    return {
        "single": _run(tmp, 1, "single", "--steps", "5"),
        "ddp": _run(tmp, 2, "ddp", "--ckpt-out", ckpt, "--steps", "5"),
        "resume1": _run(tmp, 1, "resume1", "--ckpt-in", ckpt, "--steps", "8"),
        "resume2": _run(tmp, 2, "resume2", "--ckpt-in", ckpt, "--steps", "8"),
        "straight": _run(tmp, 1, "straight", "--steps", "8"),
    }


def test_ddp_equals_single_process(runs: dict[str, dict]) -> None:
    for a, b in zip(runs["single"]["params"], runs["ddp"]["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    single, ddp = runs["single"]["state"]["layers"], runs["ddp"]["state"]["layers"]
    for name in single:
        torch.testing.assert_close(single[name]["a"], ddp[name]["a"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(single[name]["b"], ddp[name]["b"], rtol=1e-10, atol=1e-12)
    assert runs["ddp"]["state"]["counters"]["bytes_reduced"] > 0


def test_ddp_checkpoint_resumes_on_one_and_two_processes(runs: dict[str, dict]) -> None:
    for key in ("resume1", "resume2"):
        for a, b in zip(runs["straight"]["params"], runs[key]["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
