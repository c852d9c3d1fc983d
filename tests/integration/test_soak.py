"""Soak test with injected faults (not in the default run): ``python -m pytest -m soak -q tests/test_soak.py``.

2,000 optimizer steps of K-FAC on a small MLP with faults injected at random steps: NaN in the captured output
gradients (what an fp16 overflow does to the statistics), forced failures of the inverse computation, and a
checkpoint/resume (state saved, loaded with ``weights_only=True`` into a fresh manager) in the middle. Training must
finish with a finite loss, nothing non-finite may reach the weights, and every injected fault must be counted as
exactly one skipped statistics step or one failed refresh.
"""

from __future__ import annotations

import io
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_soo import PreconditionerManager
from lightning_soo.preconditioners.kfac import KFAC

STEPS = 2000


def _manager(model: nn.Module) -> PreconditionerManager:
    return PreconditionerManager(model, damping=1e-2, preconditioner_interval=5, kl_clip=1e-3)


@pytest.mark.soak
def test_soak_with_injected_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    x = torch.randn(2048, 20)
    y = (x @ torch.randn(20, 5)).argmax(1)
    nan_steps = set(rng.sample(range(STEPS), 40))
    fail_refreshes = set(rng.sample(range(0, STEPS, 5), 15))  # refresh steps whose inverse computation fails
    injected = {"nan": 0, "fail": 0}
    step_now = {"step": 0}

    original_observe, original_refresh = KFAC.observe_output_grads, KFAC.refresh

    def observe(self: KFAC, rows: torch.Tensor, n: int, ctx: object, scale: float = 1.0) -> None:
        if step_now["step"] in nan_steps and self.d_out == 5:  # the output layer's statistics become NaN
            rows = rows.clone()
            rows[0, 0] = float("nan")
            injected["nan"] += 1
        original_observe(self, rows, n, ctx, scale)

    def refresh(self: KFAC, damping: float) -> bool | None:
        if step_now["step"] in fail_refreshes and self.d_out == 64 and self.d_in == 65:
            injected["fail"] += 1
            return False
        return original_refresh(self, damping)

    monkeypatch.setattr(KFAC, "observe_output_grads", observe)
    monkeypatch.setattr(KFAC, "refresh", refresh)
    manager = _manager(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(STEPS):
        step_now["step"] = step
        if step == STEPS // 2:  # checkpoint and resume into a fresh manager
            buffer = io.BytesIO()
            torch.save({"manager": manager.state_dict(), "model": model.state_dict()}, buffer)
            buffer.seek(0)
            state = torch.load(buffer, weights_only=True)
            manager.remove_hooks()
            manager = _manager(model)
            manager.load_state_dict(state["manager"])
        idx = torch.randint(0, 2048, (128,))
        opt.zero_grad()
        manager.begin_step()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        manager.step(opt)
        opt.step()
        losses.append(float(loss))
        assert all(torch.isfinite(p).all() for p in model.parameters()), f"non-finite weights at step {step}"
    counters = manager.counters
    assert torch.isfinite(torch.tensor(losses[-50:])).all()
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    assert counters["skipped_statistics"] == injected["nan"] == len(nan_steps)
    assert counters["failed_refreshes"] == injected["fail"] == len(fail_refreshes)
    assert counters["nonfinite_updates"] == 0
    print(f"\nsoak: {STEPS} steps, final loss {sum(losses[-50:]) / 50:.4f}, counters {counters}, injected {injected}")
