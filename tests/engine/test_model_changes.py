"""Models that change during training: layers frozen at the start and unfrozen later (fine-tuning)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_soo import PreconditionerManager


def _train(manager: PreconditionerManager, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        manager.begin_step()
        F.cross_entropy(model(torch.randn(32, 6)), torch.randint(0, 3, (32,))).backward()
        manager.step(opt)
        opt.step()


def test_frozen_layer_is_preconditioned_once_unfrozen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    manager = PreconditionerManager(model, preconditioner_interval=2)
    assert "frozen" in manager.skipped["0.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(manager, model, opt, 3)
    assert not manager.layers["0"].preconditioner.ready  # no statistics while frozen
    assert manager.layers["2"].preconditioner.ready
    assert model[0].weight.grad is None
    model[0].requires_grad_(True)
    before = manager.counters["preconditioned_steps"]
    _train(manager, model, opt, 4)
    pre = manager.layers["0"].preconditioner
    assert pre.ready and pre.a is not None and manager.counters["preconditioned_steps"] == before + 4


def test_modules_added_after_setup_are_named_and_left_plain() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    messages: list[str] = []
    manager = PreconditionerManager(model, warn=messages.append)
    model.append(nn.Linear(3, 3))  # a head added after the manager was built
    stray = nn.Parameter(torch.zeros(2))  # in the optimizer, never in the model
    opt = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    _train(manager, model, opt, 2)
    [warning] = [m for m in messages if "not in the model when the preconditioner was set up" in m]
    assert "3 parameter tensor(s)" in warning and "3.weight, 3.bias, 1 not in the model now" in warning
    assert list(manager.layers) == ["0", "2"]
    before = model[3].weight.grad.clone()
    manager.step(opt)  # written again: the late module's gradient stays plain
    assert torch.equal(model[3].weight.grad, before)


def test_update_norm_cap() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    manager = PreconditionerManager(model, damping=1e-4, max_update_norm=1e-3, preconditioner_interval=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(manager, model, opt, 2)
    for layer in manager.layers.values():
        assert float(layer.adapter.grad_matrix().norm()) <= 1e-3 * (1 + 1e-5)
    assert manager.counters["capped_updates"] > 0
