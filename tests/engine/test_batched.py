"""Equally shaped layers preconditioned as one stack (``engine.batched``; on by default on accelerators only, forced
on the CPU here): the gradients written are those of the layer-by-layer path, with the KL clip, grafting and the
norm cap, a non-finite layer keeps its plain gradient in either path, and a step still reads the device once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager, linalg
from tests.engine.test_sync import _syncs_per_step


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 8), nn.Tanh()]
    for i in range(4):
        layers += [nn.Linear(8, 8, bias=i % 2 == 0), nn.Tanh()]  # two stacks: with and without bias
    return nn.Sequential(*layers, nn.Linear(8, 3))


def _written(
    stacked: bool,
    monkeypatch: pytest.MonkeyPatch,
    poison: bool = False,
    host: bool = True,
    method: str = "kfac",
    **options,
) -> list[torch.Tensor]:
    monkeypatch.setattr(linalg, "BATCH_ON_CPU", stacked)
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
    model = _model().double()
    x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(32) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    interval = 10 if poison else 1
    manager = PreconditionerManager(model, method, warn=lambda m: None, preconditioner_interval=interval, **options)
    for step in range(3):
        opt.zero_grad()
        manager.begin_step()
        nn.functional.cross_entropy(model(x), y).backward()
        if poison and step == 2:  # a non-finite preconditioner in one stacked layer (new tensors, as a refresh)
            pre = manager.layers["4"].preconditioner
            pre.a_inv = pre.a_inv.clone()
            pre.a_inv[0, 0] = float("nan")
        manager.step(opt)
        if step < 2:
            opt.step()
    if stacked:
        stacks, _ = manager._stacks.split(list(manager.layers.values()))
        assert sorted(len(s.layers) for s in stacks) == [2, 2]
    if poison:
        assert manager.counters["nonfinite_updates"] == 1
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "options",
    [{}, {"kl_clip": 1e-3, "grafting": "sgd", "max_update_norm": 0.05}, {"kl_clip": None}],
    ids=["defaults", "all-on", "no-clip"],
)
@pytest.mark.parametrize("method", ["kfac", "shampoo", "psgd", "gauss_newton"])
def test_stacked_layers_write_the_layer_by_layer_gradients(
    method: str, options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_by_one = _written(False, monkeypatch, method=method, **options)
    stacked = _written(True, monkeypatch, method=method, **options)
    for a, b in zip(stacked, one_by_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_non_finite_member_keeps_its_plain_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    one_by_one = _written(False, monkeypatch, poison=True)
    stacked = _written(True, monkeypatch, poison=True)
    assert all(torch.isfinite(g).all() for g in stacked)
    for a, b in zip(stacked, one_by_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_stacks_follow_a_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stacked inverses are rebuilt when a member's inverses are replaced (here: every step refreshes)."""
    monkeypatch.setattr(linalg, "BATCH_ON_CPU", True)
    model = _model()
    manager = PreconditionerManager(model, "kfac", warn=lambda m: None, preconditioner_interval=1)
    y = torch.arange(16) % 3
    lefts = []
    for _ in range(2):
        x = torch.randn(16, 6)  # another batch: other factors, other inverses
        manager.begin_step()
        nn.functional.cross_entropy(model(x), y).backward()
        manager.step()
        stacks, _ = manager._stacks.split(list(manager.layers.values()))
        lefts.append(stacks[0].left.clone())
        layer = stacks[0].layers[0]
        torch.testing.assert_close(stacks[0].left[0], layer.preconditioner.b_inv)
    assert not torch.equal(lefts[0], lefts[1])


@pytest.mark.parametrize("method", ["kfac", "shampoo", "psgd", "gauss_newton"])
def test_one_sync_per_step_with_stacks(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacked products, banked statistics and PSGD's stacked fit read the device once a step."""
    monkeypatch.setattr(linalg, "BATCH_ON_CPU", True)
    counts = _syncs_per_step(method, 17, False, kl_clip=1e-3, grafting="sgd", max_update_norm=1.0)
    assert max(counts) <= 1, counts
