"""Data parallelism: 2-process DDP (gloo, CPU) with half the batch per rank equals one process on the whole batch;
the inverse work is split between the ranks; checkpoints resume on 1 and 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_run.py")


def _run(tmp_path: Path, devices: int, name: str, *extra: str) -> list[dict]:
    """Rank results (rank 0 first)."""
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--devices", str(devices), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [out] + [Path(f"{out}.rank{r}") for r in range(1, devices)]
    return [torch.load(f, weights_only=True) for f in files]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp")
    ckpt = str(tmp / "ddp.ckpt")
    return {
        "single": _run(tmp, 1, "single", "--steps", "5"),
        "ddp": _run(tmp, 2, "ddp", "--ckpt-out", ckpt, "--steps", "5"),
        "ddp_grad": _run(tmp, 2, "ddp_grad", "--steps", "5", "--fraction", "0.5"),
        "resume1": _run(tmp, 1, "resume1", "--ckpt-in", ckpt, "--steps", "8"),
        "resume2": _run(tmp, 2, "resume2", "--ckpt-in", ckpt, "--steps", "8"),
        "straight": _run(tmp, 1, "straight", "--steps", "8"),
        "shampoo_single": _run(tmp, 1, "shampoo_single", "--steps", "5", "--method", "shampoo"),
        "shampoo_ddp": _run(tmp, 2, "shampoo_ddp", "--steps", "5", "--method", "shampoo"),
        "gauss_newton_single": _run(tmp, 1, "gn_single", "--steps", "5", "--method", "gauss_newton"),
        "gauss_newton_ddp": _run(tmp, 2, "gn_ddp", "--steps", "5", "--method", "gauss_newton"),
        "gauss_newton_ddp32": _run(tmp, 2, "gn_ddp32", "--steps", "5", "--method", "gauss_newton", "--float32"),
        "psgd_single": _run(tmp, 1, "psgd_single", "--steps", "5", "--method", "psgd"),
        "psgd_ddp": _run(tmp, 2, "psgd_ddp", "--steps", "5", "--method", "psgd", "--fraction", "0.5"),
        "psgd_vectors_single": _run(tmp, 1, "psgdv_single", "--steps", "5", "--method", "psgd", "--vectors"),
        "psgd_vectors_ddp": _run(
            tmp, 2, "psgdv_ddp", "--steps", "5", "--method", "psgd", "--vectors", "--fraction", "0.5"
        ),
        "psgd_hessian_single": _run(tmp, 1, "psgdh_single", "--steps", "5", "--method", "psgd_hessian"),
        "psgd_hessian_ddp": _run(tmp, 2, "psgdh_ddp", "--steps", "5", "--method", "psgd_hessian"),
        "device_single": _run(tmp, 1, "device_single", "--steps", "5", "--device-path"),
        "device_ddp": _run(tmp, 2, "device_ddp", "--steps", "5", "--device-path"),
    }


@pytest.mark.parametrize("mode", ["ddp", "ddp_grad"])
def test_ddp_equals_single_process(runs: dict[str, list[dict]], mode: str) -> None:
    single = runs["single"][0]
    for rank in runs[mode]:
        for a, b in zip(single["params"], rank["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
        for name, layer in single["state"]["layers"].items():  # every rank has the global-batch factors
            torch.testing.assert_close(layer["a"], rank["state"]["layers"][name]["a"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer["b"], rank["state"]["layers"][name]["b"], rtol=1e-10, atol=1e-12)
        assert rank["state"]["counters"]["bytes_reduced"] > 0 and rank["state"]["counters"]["bytes_broadcast"] > 0


@pytest.mark.parametrize("mode", ["ddp", "ddp_grad"])
def test_inverse_work_is_split_and_gradients_agree(runs: dict[str, list[dict]], mode: str) -> None:
    total = runs["single"][0]["state"]["counters"]["refreshes"]
    per_rank = [r["state"]["counters"]["refreshes"] for r in runs[mode]]
    assert sum(per_rank) == total and all(0 < n < total for n in per_rank)
    rank0, rank1 = runs[mode]
    for g0, g1 in zip(rank0["grads"], rank1["grads"], strict=True):  # the preconditioned gradients of the last step
        assert torch.equal(g0, g1)


def test_ranks_agree_bit_for_bit_in_float32(runs: dict[str, list[dict]]) -> None:
    """Every rank applies the owner's preconditioner itself (``grad_worker_fraction=1``): in float32 the shared
    damping must be the one every rank uses (Gauss-Newton's owner kept ρ in double, the others read it rounded to
    float32: their updates differed by 1e-7 and the replicas drifted apart)."""
    rank0, rank1 = runs["gauss_newton_ddp32"]
    assert all(g.dtype == torch.float32 for g in rank0["grads"])
    for g0, g1 in zip(rank0["grads"], rank1["grads"], strict=True):
        assert torch.equal(g0, g1)
    for p0, p1 in zip(rank0["params"], rank1["params"], strict=True):
        assert torch.equal(p0, p1)


def test_shampoo_ddp_equals_single_process(runs: dict[str, list[dict]]) -> None:
    single = runs["shampoo_single"][0]
    for rank in runs["shampoo_ddp"]:
        for a, b in zip(single["params"], rank["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
        for name, layer in single["state"]["layers"].items():
            for key in ("l.0", "r.0"):
                torch.testing.assert_close(layer[key], rank["state"]["layers"][name][key], rtol=1e-10, atol=1e-12)
    rank0, rank1 = runs["shampoo_ddp"]
    for g0, g1 in zip(rank0["grads"], rank1["grads"], strict=True):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("method", ["gauss_newton", "psgd", "psgd_vectors", "psgd_hessian"])
def test_other_methods_ddp_equal_single_process(runs: dict[str, list[dict]], method: str) -> None:
    """Gauss-Newton gathers the examples of both ranks (its Gram is that of the global batch); PSGD fits its Q from
    the all-reduced gradient with the same probes on every rank (here in gradient-broadcast mode; with the
    LayerNorm's scale and shift as layers of their own, ``precondition_vectors``), or in Newton form from the ranks'
    Hessian-vector products averaged."""
    single = runs[f"{method}_single"][0]
    for rank in runs[f"{method}_ddp"]:
        for a, b in zip(single["params"], rank["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    rank0, rank1 = runs[f"{method}_ddp"]
    for g0, g1 in zip(rank0["grads"], rank1["grads"], strict=True):
        assert torch.equal(g0, g1)
    total = single["state"]["counters"]["refreshes"]
    per_rank = [r["state"]["counters"]["refreshes"] for r in runs[f"{method}_ddp"]]
    assert sum(per_rank) == total and all(0 < n < total for n in per_rank)  # each layer refreshed by its owner
    if method == "psgd_vectors":  # the LayerNorm's two vectors are layers too
        assert total > runs["psgd_single"][0]["state"]["counters"]["refreshes"]


def test_ddp_checkpoint_resumes_on_one_and_two_processes(runs: dict[str, list[dict]]) -> None:
    for key in ("resume1", "resume2"):
        for a, b in zip(runs["straight"][0]["params"], runs[key][0]["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_ddp_on_the_accelerators_path_equals_single_process(runs: dict[str, list[dict]]) -> None:
    """The accelerator's path under DDP (flags on the device; equal layers' statistics banked, summed across ranks
    in place through the bank's views): the same factors and weights as one process on the whole batch."""
    single = runs["device_single"][0]
    for rank in runs["device_ddp"]:
        assert rank["banked"] >= 6  # the three 16 x 16 layers' factors
        for a, b in zip(single["params"], rank["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
        for name, layer in single["state"]["layers"].items():
            for key in ("a", "b"):
                torch.testing.assert_close(layer[key], rank["state"]["layers"][name][key], rtol=1e-10, atol=1e-12)
