"""Warnings that say what happened: damping the KL clip cannot protect, non-finite statistics without fp16."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager


def _one_step(manager: PreconditionerManager, model: nn.Module, x: torch.Tensor) -> None:
    manager.begin_step()
    model(x).square().mean().backward()
    manager.step()


@pytest.mark.parametrize(("damping", "warned"), [(1e-8, True), (1e-3, True), (1e-2, False)])
def test_damping_at_or_below_the_kl_clip_is_named(damping: float, warned: bool) -> None:
    messages: list[str] = []
    model = nn.Linear(3, 2)
    manager = PreconditionerManager(
        model, damping=damping, kl_clip=1e-3, preconditioner_interval=1, warn=messages.append
    )
    for _ in range(3):
        _one_step(manager, model, torch.randn(4, 3))
    clip = [m for m in messages if "kl_clip" in m]
    assert len(clip) == (1 if warned else 0)
    if warned:
        assert f"√(kl_clip/damping) = {math.sqrt(1e-3 / damping):.3g}" in clip[0]


def test_relative_damping_is_not_compared_with_the_clip() -> None:
    messages: list[str] = []
    model = nn.Linear(3, 2)
    manager = PreconditionerManager(model, "shampoo", damping=1e-6, kl_clip=1e-3, warn=messages.append)
    _one_step(manager, model, torch.randn(4, 3))
    assert not [m for m in messages if "kl_clip" in m]


def test_non_finite_statistics_without_a_scaler_do_not_blame_fp16() -> None:
    messages: list[str] = []
    model = nn.Linear(3, 2)
    manager = PreconditionerManager(model, warn=messages.append)
    x = torch.randn(4, 3)
    x[0, 0] = math.nan
    _one_step(manager, model, x)
    (stats,) = [m for m in messages if "non-finite statistics" in m]
    assert "fp16" not in stats and "NaN or Inf" in stats


class _DeadAndUnused(nn.Module):
    """``dead``'s output is multiplied by zero (every output-gradient row exactly zero: no example to count);
    ``unused`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.dead, self.unused = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.live(x) + 0.0 * self.dead(x)


def test_plain_layers_say_whether_their_forward_ran() -> None:
    """A layer whose output gradients were all zero is not reported as never run (it ran: its rows were dropped)."""
    messages: list[str] = []
    model = _DeadAndUnused()
    manager = PreconditionerManager(model, preconditioner_interval=1, warn=messages.append)
    for _ in range(2):
        _one_step(manager, model, torch.randn(4, 3))
    (report,) = [m for m in messages if "keep their plain gradient" in m]
    lines = {line.split(":")[0].strip(): line for line in report.splitlines()[1:]}
    assert "exactly zero" in lines["dead.weight"] and "never ran" not in lines["dead.weight"]
    assert "never ran" in lines["unused.weight"]
    assert "live.weight" not in lines


@pytest.mark.parametrize(("bias_lr", "warned"), [(1.0, True), (0.1, False)])
def test_a_bias_at_another_learning_rate_than_its_weight_is_named_under_a_kl_clip(bias_lr: float, warned: bool) -> None:
    """The KL clip prices a layer's update at its weight's learning rate: said once when a layer's weight and bias
    sit in param groups with different rates (the usual no-decay split at one rate is not)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    messages: list[str] = []
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=1, warn=messages.append)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": weights, "lr": 0.1}, {"params": biases, "lr": bias_lr, "weight_decay": 0.0}])
    for _ in range(2):
        opt.zero_grad()
        manager.begin_step()
        model(torch.randn(8, 4)).square().mean().backward()
        manager.step(opt)
        opt.step()
    found = [m for m in messages if "different learning rates" in m]
    assert len(found) == (1 if warned else 0)
    if warned:
        assert "2 layer(s) (0, 2)" in found[0]
