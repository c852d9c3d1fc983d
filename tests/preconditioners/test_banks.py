"""Equally shaped layers closing their statistics as one stack (accelerators only by default, forced on the CPU here
with the device deciding): K-FAC's and Shampoo's factors as one bank (``preconditioners.banks``), PSGD's fitting
step as one stack (``psgd_math.fit_stacked``). The running factors, flags and written gradients are those of the
layer-by-layer close, through non-finite steps, padded steps and steps of padding only, loss scaling, a layer that
skips a step, PSGD's balancing step and a checkpoint round trip, and a checkpoint holds each layer's tensors alone,
not the stack."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager, linalg
from lightning_soo.preconditioners.banks import FactorBank


class _Scaler:
    """A GradScaler stand-in whose scale is a tensor (the manager reads it without a sync)."""

    def __init__(self, scale: float) -> None:
        self.scale = torch.tensor(scale, dtype=torch.float64)

    def is_enabled(self) -> bool:
        return True

    def _get_scale_async(self) -> torch.Tensor:
        return self.scale


class _Net(nn.Module):
    """Five equal hidden layers; the last one can be skipped (no rows that step)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.hidden = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))
        self.out = nn.Linear(8, 3)
        self.skip_last = False
        self.twice = False  # the second hidden layer called twice (its statistics take two calls' rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for i, layer in enumerate(self.hidden):
            if not (self.skip_last and i == 4):
                h = torch.tanh(layer(h))
            if self.twice and i == 1:
                h = torch.tanh(layer(h))
        return self.out(h)


def _factors(manager: PreconditionerManager) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, layer in manager.layers.items():
        pre: Any = layer.preconditioner
        if hasattr(pre, "_a"):
            out[name] = [pre.a.clone(), pre.b.clone()]
        elif hasattr(pre, "q_l"):
            out[name] = [pre.q_l.clone(), pre.q_r.clone()]
        else:
            out[name] = [f.value.clone() for side in pre.sides for f in side.factors]
    return out


def _run(
    banked: bool, method: str, monkeypatch: pytest.MonkeyPatch, resume: bool = False, host: bool = False
) -> dict[str, Any]:
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
    monkeypatch.setattr(linalg, "BATCH_ON_CPU", banked)
    torch.manual_seed(0)
    model = _Net().double()
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    build = lambda: PreconditionerManager(model, method, warn=lambda m: None, preconditioner_interval=3)  # noqa: E731
    manager = build()
    flags, grads = [], []
    for step in range(9):
        x = torch.randn(16, 6, dtype=torch.float64, generator=gen)
        y = torch.arange(16) % 3
        if step == 3:
            x[0, 0] = float("nan")  # every layer's statistics are non-finite this step
        if step == 1:
            y[::4] = -100  # a quarter of the rows ignored: padding, each member's count 12 (``RowCount``, per bank)
        if step == 4:
            y = torch.full((16,), -100)  # every row ignored: a count of zero, nothing folded
        model.skip_last = step == 5  # one bank member sees no rows: it folds nothing, the others alone
        model.twice = step in (2, 8)  # one member's count is applied to its first call's rows at the second
        scaler = _Scaler(8.0) if step == 6 else None
        opt.zero_grad()
        manager.begin_step()
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum" if step == 4 else "mean")
        (loss * 8.0 if scaler else loss).backward()
        if scaler:
            for p in model.parameters():
                p.grad.div_(8.0)
        if step == 3 and method == "psgd":  # PSGD fits on the gradient: one layer's is not finite
            model.hidden[2].weight.grad[0, 0] = float("nan")
        elif step == 3:  # keep the weights finite: the NaN only reaches the statistics
            for p in model.parameters():
                p.grad.nan_to_num_(0.0)
        if step == 7 and method == "psgd":  # PSGD's balancing step (every 100th update)
            for layer in manager.layers.values():
                layer.preconditioner.updates = 99  # type: ignore[attr-defined]
        manager.step(opt, grad_scaler=scaler)
        if step == 3:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0)
        flags.append(dict(manager.counters))
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        opt.step()
        if resume and step == 7:
            state = manager.state_dict()
            for tensors in _walk(state):
                assert tensors._base is None and tensors.untyped_storage().nbytes() == tensors.nbytes
            manager.remove_hooks()
            manager = build()
            manager.load_state_dict(state)
    if banked and method == "psgd":  # the stacked fit leaves its members' factors as views of one stack
        assert manager.layers["hidden.0"].preconditioner.q_l._base is not None  # type: ignore[attr-defined]
    elif banked:
        banks = {id(f.bank) for layer in manager.layers.values() for f in _all_factors(layer.preconditioner)}
        assert any(isinstance(f.bank, FactorBank) for f in _all_factors(manager.layers["hidden.0"].preconditioner))
        assert len(banks) >= 2  # the hidden layers' bank, and the input/output layers alone (None)
    return {"factors": _factors(manager), "counters": flags, "grads": grads}


def _all_factors(pre: Any) -> list[Any]:
    return pre._factors if hasattr(pre, "_factors") else [f for side in pre.sides for f in side.factors]


def _walk(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _walk(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _walk(v)]
    return []


@pytest.mark.parametrize("resume", [False, True], ids=["one-run", "resumed"])
@pytest.mark.parametrize("method", ["kfac", "shampoo", "psgd"])
def test_banked_close_equals_the_layer_by_layer_close(
    method: str, resume: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_by_one = _run(False, method, monkeypatch, resume)
    banked = _run(True, method, monkeypatch, resume)
    assert banked["counters"] == one_by_one["counters"]
    assert banked["counters"][-1]["skipped_statistics"] > 0  # the NaN step was rejected in both
    for name, values in one_by_one["factors"].items():
        for a, b in zip(banked["factors"][name], values, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for step_a, step_b in zip(banked["grads"], one_by_one["grads"], strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
def test_gauss_newton_flags_each_layer_of_a_joint_close(host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gauss-Newton closes its layers with one ``foreach`` norm on the device: each layer keeps its own verdict."""
    from lightning_soo.preconditioners import GaussNewton

    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
    gen = torch.Generator().manual_seed(0)
    pres = [GaussNewton(4, 5, dtype=torch.float64, device=torch.device("cpu")) for _ in range(4)]
    for i, pre in enumerate(pres):
        h, d = (
            torch.randn(6, 5, dtype=torch.float64, generator=gen),
            torch.randn(6, 4, dtype=torch.float64, generator=gen),
        )
        if i == 1:
            d[2, 3] = float("inf")
        if i == 3:
            h[0, 0] = float("nan")
        pre.observe_output_grads(d, 6, pre.observe_inputs(h, 6))
    flags = GaussNewton.close_many(pres, 1.0)  # type: ignore[arg-type]
    assert [bool(f) for f in flags] == [True, False, True, False]


@pytest.mark.parametrize("method", ["kfac", "shampoo", "psgd"])
def test_the_accelerators_close_equals_the_hosts(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run decided on the host (the CPU's path, reading every flag and count): the same factors. This
    covers what the device defers to the close, such as K-FAC's count squared under a loss scale."""
    on_host = _run(False, method, monkeypatch, host=True)
    banked = _run(True, method, monkeypatch)
    assert banked["counters"] == on_host["counters"]
    for name, values in on_host["factors"].items():
        for a, b in zip(banked["factors"][name], values, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
