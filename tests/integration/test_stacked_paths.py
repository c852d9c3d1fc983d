"""The accelerator's stacked paths on model code people train: equal layers preconditioned as one stack
(``engine.batched``), K-FAC's and Shampoo's statistics closed as one bank (``preconditioners.banks``) and PSGD's
factors fitted as one stack (``psgd_math.fit_stacked``) write the same gradients as the same path layer by layer,
on transformers' Llama (tied), a nanoGPT-style tied model and transformers' ViT, in float64, and the same as the
CPU's own path (flags read on the host). These paths run only on accelerators by default, so the CPU suite forces
them on (``HOST_DECIDES_ON_CPU`` off, ``BATCH_ON_CPU`` on)."""

from __future__ import annotations

import pytest
import torch

from lightning_soo import PreconditionerManager, linalg
from tests.integration.real_models import CASES

pytest.importorskip("transformers")
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore")]


def _run(
    name: str, method: str, stacked: bool, monkeypatch: pytest.MonkeyPatch, host: bool = False
) -> tuple[list, int, int]:
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
    monkeypatch.setattr(linalg, "BATCH_ON_CPU", stacked)
    torch.manual_seed(0)
    model, batch, loss_fn = CASES[name]()
    model = model.double()
    batch = batch.double() if batch.is_floating_point() else batch
    manager = PreconditionerManager(model, method, warn=lambda m: None, preconditioner_interval=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    written = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        manager.begin_step()
        loss_fn(model, batch).backward()
        manager.step(opt)
        written.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        opt.step()
    stacks, _ = manager._stacks.split(list(manager.layers.values()))
    return (
        written,
        sum(len(s.layers) for s in stacks),
        sum(_closed_together(layer.preconditioner) for layer in manager.layers.values()),
    )


def _closed_together(pre: object) -> int:
    """How many of a layer's statistics live in a stack: banked factors (K-FAC, Shampoo), stacked Q (PSGD)."""
    if hasattr(pre, "q_l"):
        return int(getattr(pre, "q_l", None) is not None and pre.q_l._base is not None)  # type: ignore[attr-defined]
    factors = getattr(pre, "_factors", None) or [f for side in getattr(pre, "sides", ()) for f in side.factors]
    return sum(f.bank is not None for f in factors)


@pytest.mark.parametrize("method", ["kfac", "shampoo", "psgd", "gauss_newton"])
@pytest.mark.parametrize("name", ["llama tied", "nanogpt tied", "vit (transformers)"])
def test_stacked_paths_write_the_layer_by_layer_gradients(
    name: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_by_one, _, _ = _run(name, method, False, monkeypatch)
    stacked, members, banked = _run(name, method, True, monkeypatch)
    assert members >= 4, "equal blocks should form stacks"
    if method != "gauss_newton":
        assert banked >= 4, "equal layers' statistics should close as one stack"
    for step_a, step_b in zip(stacked, one_by_one, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("method", ["kfac", "shampoo", "psgd", "gauss_newton"])
@pytest.mark.parametrize("name", ["nanogpt tied", "vit (transformers)"])
def test_the_accelerators_path_writes_the_hosts_gradients(
    name: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU's path (flags read on the host, layer by layer, factored products) and an accelerator's (decisions
    on the device, banks and stacks, counts reduced per bank) write the same gradients on real models. (Not on the
    tied Llama: its query projections' rows of rounding noise meet the padding rule differently in two runs that
    differ by rounding; README, Limitations.)"""
    host, _, _ = _run(name, method, False, monkeypatch, host=True)
    device, _, _ = _run(name, method, True, monkeypatch)
    for step_a, step_b in zip(device, host, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
