"""The refresh schedule, the freeze (fixed and adaptive) and the damping rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager
from lightning_soo.engine.damping import Damping, ScaledDamping
from lightning_soo.engine.schedule import ChangeMonitor, Schedule


def _refresh_steps(schedule: Schedule, steps: int) -> list[int]:
    return [s for s in range(steps) if schedule.refreshes(s)]


@pytest.mark.parametrize(
    ("frequent_steps", "frequent_interval", "interval", "expected"),
    [
        (0, 10, 10, [0, 10, 20, 30]),
        (0, 10, None, [0]),
        (10, 2, None, [0, 2, 4, 6, 8]),
        (10, 2, 15, [0, 2, 4, 6, 8, 15, 30]),
        (12, 5, 20, [0, 5, 10, 20]),
    ],
)
def test_refresh_steps(frequent_steps: int, frequent_interval: int, interval: int | None, expected: list[int]) -> None:
    schedule = Schedule(1, interval, frequent_interval=frequent_interval, frequent_steps=frequent_steps)
    assert _refresh_steps(schedule, 40) == expected
    freeze_at = [s for s in range(40) if schedule.freezes(s)]
    if interval is None:
        assert freeze_at[0] == max(frequent_steps, 1)
    else:
        assert freeze_at == []


def test_statistics_interval_and_frozen_schedule() -> None:
    schedule = Schedule(statistics_interval=3, preconditioner_interval=6)
    assert [s for s in range(13) if schedule.collects(s)] == [0, 3, 6, 9, 12]
    schedule.freeze(7)
    assert not schedule.collects(9) and not schedule.refreshes(12)
    assert schedule.state_dict() == {"frozen": True, "frozen_at": 7}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _steps(manager: PreconditionerManager, model: nn.Module, n: int) -> list[int]:
    """Run n steps; return the steps at which a refresh happened."""
    refreshed = []
    for step in range(n):
        before = manager.counters["refreshes"]
        manager.begin_step(batch_size=16)
        model(torch.randn(16, 6)).square().mean().backward()
        manager.step()
        model.zero_grad()
        if manager.counters["refreshes"] > before:
            refreshed.append(step)
    return refreshed


def test_manager_follows_schedule_and_detaches_hooks_when_frozen() -> None:
    model = _mlp()
    manager = PreconditionerManager(model)
    manager.schedule = Schedule(1, None, frequent_interval=3, frequent_steps=7)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 2
    assert _steps(manager, model, 12) == [0, 3, 6]
    assert manager.frozen and manager.schedule.frozen_at == 7
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    # preconditioning continues after the freeze
    before = manager.counters["preconditioned_steps"]
    _steps(manager, model, 2)
    assert manager.counters["preconditioned_steps"] == before + 2


def test_adaptive_freeze_when_curvature_stops_changing() -> None:
    model = _mlp()
    manager = PreconditionerManager(model, preconditioner_interval=2, freeze_tolerance=0.05, freeze_patience=2)
    x = torch.randn(16, 6)  # the same batch every step: the running factors converge
    for _ in range(200):
        manager.begin_step()
        model(x).square().mean().backward()
        manager.step()
        model.zero_grad()
        if manager.frozen:
            break
    assert manager.frozen
    assert manager.monitor is not None and manager.monitor.last_change is not None
    assert manager.monitor.last_change < 0.05


def test_change_monitor() -> None:
    monitor = ChangeMonitor(tolerance=0.1, patience=2)
    a = torch.ones(3, 3)
    assert not monitor.observe({"l": [a]})  # first snapshot, no change measured
    assert not monitor.observe({"l": [a * 2]})  # change 1.0
    assert monitor.last_change == pytest.approx(1.0)
    assert not monitor.observe({"l": [a * 2.02]})  # 0.01: calm 1
    assert monitor.observe({"l": [a * 2.03]})  # calm 2: freeze


def test_scaled_damping_follows_lr_and_batch() -> None:
    rule = ScaledDamping(1e-3, reference_lr=0.1, reference_batch_size=128)
    assert rule(0, 0.1, 128) == pytest.approx(1e-3)
    assert rule(0, 0.05, 512) == pytest.approx(1e-3 * 0.5 * 4)
    assert rule(0, None, None) == pytest.approx(1e-3)
    assert Damping(lambda step, lr: 0.1 * lr)(3, 0.5) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="damping"):
        Damping(lambda step, lr: float("nan"))(0, 0.1)


def test_damping_rule_follows_lr_scheduler() -> None:
    model = _mlp()
    rule = ScaledDamping(1e-2, reference_lr=0.1, reference_batch_size=16)
    manager = PreconditionerManager(model, damping=rule, preconditioner_interval=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    for _ in range(3):
        manager.begin_step(batch_size=32)
        model(torch.randn(32, 6)).square().mean().backward()
        manager.step(opt)
        opt.step()
        opt.zero_grad()
        sched.step()
        seen.append(manager.last_damping)
    assert seen == pytest.approx([2e-2, 1e-2, 5e-3])
