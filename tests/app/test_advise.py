"""``advise``: its ratios come from the arms' own measurements, every arm starts from the same weights and sees the
same batches (dropout included), and it runs zero-code on a LightningCLI project and in-process on a module."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_soo
from lightning_soo.app.advise.arms import damping_grid, parse_methods
from lightning_soo.app.advise.output import config_text, freeze_fraction, verdict_line
from lightning_soo.app.advise.verdict import SPEEDUP, freeze_step, summarize

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "tests" / "cli_project"


def _record(name: str, losses: list[float], step: float, gap: float = 0.0, method: str | None = None) -> dict:
    n = len(losses)
    return {
        "name": name,
        "method": method,
        "damping": None if method is None else 1e-2,
        "losses": losses,
        "step_seconds": [step] * n,
        "gap_seconds": [gap] * (n - 1),
        "batch_checksums": list(range(n)),
        "init_checksum": 1.0,
        "quality": [],
        "batch_size": 64,
        "dataset_size": 256,
        "lr": 0.1,
        "full_steps": 4 * n,
    }


def test_ratios_are_computed_from_the_arms_steps_and_seconds() -> None:
    n = 40
    base = _record("baseline", [1.0 - 0.01 * i for i in range(n)], step=0.010, gap=0.002)
    fast = _record("kfac@0.01", [1.0 - 0.03 * i for i in range(n)], step=0.020, gap=0.002, method="kfac")
    summary = summarize(base, [fast])
    w, warm = summary["window"], summary["warmup"]
    assert (w, warm) == (3, 4)
    # the target: the baseline's mean over its last `window` steps
    assert summary["target_loss"] == pytest.approx(statistics.fmean(base["losses"][-w:]))
    b, a = summary["baseline"], summary["arms"][0]
    assert b["seconds_per_step"] == pytest.approx(0.012) and a["seconds_per_step"] == pytest.approx(0.022)
    # the first step whose trailing mean reaches the target, and the seconds up to it
    expected_arm = next(
        i for i in range(n) if statistics.fmean(fast["losses"][max(0, i - w + 1) : i + 1]) <= summary["target_loss"]
    )
    assert a["steps_to_target"] == expected_arm + 1
    assert b["steps_to_target"] == n
    assert a["seconds_to_target"] == pytest.approx(0.022 * (expected_arm + 1))
    assert b["seconds_to_target"] == pytest.approx(0.012 * n)
    assert a["cost_ratio"] == pytest.approx(0.022 / 0.012)
    assert a["step_ratio"] == pytest.approx(n / (expected_arm + 1))
    assert a["time_ratio"] == pytest.approx((0.012 * n) / (0.022 * (expected_arm + 1)))
    assert summary["batch_ratio"] == 0.25
    assert summary["decision"] == {"verdict": "recommend", "method": "kfac", "reason": "faster beyond the noise"}
    line = verdict_line(summary)
    assert line.startswith("K-FAC: ") and f"expected {a['time_ratio']:.3g}x faster" in line
    assert "ScaledDamping(0.01, reference_lr=0.1, reference_batch_size=64)" in line


def test_warmup_steps_count_at_the_steady_rate() -> None:
    base = _record("baseline", [1.0 - 0.01 * i for i in range(30)], step=0.01)
    base["step_seconds"][:3] = [5.0, 5.0, 5.0]  # start-up: not the method's cost
    summary = summarize(base, [])
    assert summary["baseline"]["seconds_per_step"] == pytest.approx(0.01)
    assert summary["baseline"]["seconds"][-1] == pytest.approx(0.3)


def test_cpu_clock_uses_the_process_cpu_times() -> None:
    base = _record("baseline", [1.0 - 0.01 * i for i in range(30)], step=0.5, gap=0.5)  # wall: contended
    base["step_cpu_seconds"], base["gap_cpu_seconds"] = [0.01] * 30, [0.002] * 29
    assert summarize(base, [], clock="cpu")["baseline"]["seconds_per_step"] == pytest.approx(0.012)
    assert summarize(base, [])["baseline"]["seconds_per_step"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="`clock` must be one of wall, cpu"):
        summarize(base, [], clock="gpu")


def test_slower_method_is_not_recommended_and_short_probes_say_so() -> None:
    base = _record("baseline", [1.0 - 0.01 * i for i in range(40)], step=0.01)
    slow = _record("kfac@0.01", [1.0 - 0.002 * i for i in range(40)], step=0.03, method="kfac")
    summary = summarize(base, [slow])
    assert summary["arms"][0]["steps_to_target"] is None and summary["arms"][0]["time_ratio"] is None
    assert summary["decision"]["verdict"] == "keep"
    assert verdict_line(summary).startswith("not worth it here: batch/dataset 0.25")
    assert "NOT recommended" in (config_text(summary) or "")
    short = summarize(_record("baseline", [1.0, 0.9, 0.8], 0.01), [_record("k", [1.0, 0.5, 0.2], 0.01, method="kfac")])
    assert short["decision"]["verdict"] == "inconclusive" and "--steps 6" in verdict_line(short)
    assert SPEEDUP > 1


def test_even_and_noisy_probes_are_not_recommendations() -> None:
    base = _record("baseline", [1.0 - 0.01 * i for i in range(40)], step=0.01)
    even = summarize(base, [_record("kfac@0.01", [1.0 - 0.02 * i for i in range(40)], step=0.02, method="kfac")])
    assert even["arms"][0]["time_ratio"] == pytest.approx(1.0, abs=0.1) and even["arms"][0]["decisive"]
    assert even["decision"]["verdict"] == "marginal"
    assert verdict_line(even).startswith("about even here: K-FAC") and "--steps 80" in verdict_line(even)
    wiggle = [1.0 - 0.01 * i + (0.05 if i % 2 else -0.05) for i in range(40)]
    noisy = summarize(
        _record("baseline", wiggle, 0.01), [_record("k", [*wiggle[:-1], wiggle[-1] - 0.01], 0.01, method="kfac")]
    )
    assert noisy["decision"] == {"verdict": "inconclusive", "method": "kfac", "reason": "final losses within the noise"}


def test_freeze_point_from_the_quality_series() -> None:
    assert freeze_step([[10, 0.9], [20, 0.6], [30, 0.59], [40, 0.6]]) == 20
    assert freeze_step([[10, 0.9], [20, 0.6], [30, 0.4]]) is None  # still improving
    assert freeze_step([]) is None
    assert freeze_fraction({"freeze_step": 20}, 1000, 100) == 0.02
    assert freeze_fraction({"freeze_step": 7}, 1000, 100) == 0.01  # at least 0.01
    assert freeze_fraction({"freeze_step": None}, 1000, 100) is None


def test_damping_grid_follows_learning_rate_and_batch_size() -> None:
    small, large = damping_grid("kfac", 3, 0.2, 2048), damping_grid("kfac", 3, 0.4, 2048)
    assert small[1] == pytest.approx(0.04) and large[1] == pytest.approx(0.08)
    assert min(damping_grid("kfac", 3, 0.01, 8)) >= 2e-3  # kept above the default kl_clip
    assert damping_grid("psgd", 3, 0.1, 64) == [None]
    assert len(damping_grid("shampoo", 1, 0.1, 64)) == 1


class DropoutMLP(L.LightningModule):
    """A plain module with dropout: the same masks in every arm need the same RNG stream."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=16, shuffle=True)


def test_python_advise_same_weights_same_batches_and_reported_numbers(tmp_path: Path) -> None:
    model = DropoutMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = lightning_soo.advise(
        model,
        _loader(),
        {"max_epochs": 10, "accelerator": "cpu"},
        methods="kfac,shampoo",
        steps=24,
        damping_grid=1,
        out=tmp_path,
    )
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "arms").glob("*.json")}
    assert set(records) == {"baseline", *(a["name"] for a in summary["arms"])} and len(records) == 3
    base = records["baseline"]
    for record in records.values():
        assert record["init_checksum"] == base["init_checksum"]  # same initial weights
        assert record["batch_checksums"] == base["batch_checksums"]  # same batches, same order
        assert record["losses"][0] == base["losses"][0]  # same weights, batch and dropout mask at step 1
        assert len(record["losses"]) == 24
    assert summary["checks"]["same_batches"] and len(set(summary["checks"]["init_checksums"])) == 1
    assert summary["full_steps"] == 60 and summary["batch_ratio"] == pytest.approx(16 / 96)
    # every reported figure is the arm's own measurement
    warm = summary["warmup"]
    for arm in [summary["baseline"], *summary["arms"]]:
        record = records[arm["name"]]
        gap = statistics.median(record["gap_seconds"])
        steady = [s + gap for s in record["step_seconds"][warm:]]
        assert arm["seconds_per_step"] == pytest.approx(statistics.fmean(steady))
        assert arm["steps"] == len(record["losses"])
        if arm["steps_to_target"] is not None:
            k = arm["steps_to_target"]
            assert arm["seconds_to_target"] == pytest.approx(
                statistics.fmean(steady) * min(k, warm) + sum(steady[: max(0, k - warm)])
            )
    for arm in summary["arms"]:
        assert arm["cost_ratio"] == pytest.approx(arm["seconds_per_step"] / summary["baseline"]["seconds_per_step"])
        if arm["time_ratio"] is not None:
            assert arm["time_ratio"] == pytest.approx(
                summary["baseline"]["seconds_to_target"] / arm["seconds_to_target"]
            )
        assert arm["quality"], "the curvature quality was measured during the probe"
    assert {"advise.json", "advise.png", "advise.yaml"} <= {p.name for p in tmp_path.iterdir()}
    assert not math.isnan(json.loads((tmp_path / "advise.json").read_text())["target_loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is not trained


def test_python_advise_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`methods` must be a comma-separated list of kfac, shampoo"):
        lightning_soo.advise(DropoutMLP(), _loader(), methods="adam")
    with pytest.raises(ValueError, match="steps"):
        lightning_soo.advise(DropoutMLP(), _loader(), steps=0)
    with pytest.raises(ValueError, match="`model` must be a LightningModule"):
        lightning_soo.advise(nn.Linear(2, 2), _loader())
    with pytest.raises(ValueError, match="`datamodule`"):
        lightning_soo.advise(DropoutMLP(), None)
    assert parse_methods("kfac, psgd,kfac") == ["kfac", "psgd"]


def test_cli_advise_on_a_lightningcli_project(tmp_path: Path) -> None:
    out = tmp_path / "advice"
    cmd = [
        sys.executable, "-m", "lightning_soo", "advise", str(PROJECT / "train.py"),
        "--config", str(PROJECT / "user.yaml"), "--methods", "kfac", "--steps", "6", "--damping-grid", "1",
        "--out", str(out), "--", "--model.hidden", "24",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verdict: too close to call" in proc.stderr + proc.stdout  # 6 steps cannot decide, and it says so
    summary = json.loads((out / "advise.json").read_text())
    assert summary["checks"]["same_batches"] and len(set(summary["checks"]["init_checksums"])) == 1
    assert summary["batch_size"] == 32 and summary["dataset_size"] == 256 and summary["steps"] == 6
    assert (out / "advise.png").stat().st_size > 0
    # the written config runs as it is, appended to the user's own
    config = yaml.safe_load((out / "advise.yaml").read_text())
    assert config["trainer"]["callbacks+"][0]["class_path"] == "lightning_soo.KFACCallback"
    run = [sys.executable, str(PROJECT / "train.py"), "fit", "--config", str(PROJECT / "user.yaml")]
    run += ["--config", str(out / "advise.yaml"), f"--trainer.default_root_dir={tmp_path}"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cli_advise_rejects_bad_arguments(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "lightning_soo", "advise"]
    proc = subprocess.run([*base, str(tmp_path / "nope.py")], capture_output=True, text=True)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = subprocess.run([*base, str(PROJECT / "train.py"), "--methods", "adam"], capture_output=True, text=True)
    assert proc.returncode != 0 and "`methods` must be a comma-separated list" in proc.stderr
    proc = subprocess.run([*base, str(PROJECT / "train.py"), "--steps", "0"], capture_output=True, text=True)
    assert proc.returncode != 0 and "expected a positive integer" in proc.stderr
