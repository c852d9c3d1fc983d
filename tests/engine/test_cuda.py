"""The accelerator's path on a GPU (skipped without one; ``benchmarks/cuda_check.sh`` runs it where there is one).

``tests/engine/test_sync.py`` counts host reads on the CPU, where the accelerator's path runs with
``HOST_DECIDES_ON_CPU`` off; it cannot see a synchronisation made inside PyTorch (a boolean index, ``nonzero``, a
copy to the host). Here ``torch.cuda.set_sync_debug_mode`` reports every one of them: at most one per optimizer
step on steps that do not refresh, for every method, collecting or frozen, with every option on or off. The same
steps on the GPU (banks, stacks, device-side decisions) and on the CPU (the host's decisions, layer by layer) write
the same gradients in float64; the phase timings are CUDA events, read only when asked for; a bf16 autocast run
keeps its weights finite."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager
from lightning_soo.preconditioners.psgd import PSGD

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

METHODS = ["kfac", "shampoo", "gauss_newton", "psgd"]
SETTINGS = [
    {},
    {"kl_clip": 1e-3, "grafting": "sgd", "max_update_norm": 1.0},
    {"kl_clip": None, "grafting": None, "max_update_norm": None},
]


def _mlp(depth: int, width: int, d_in: int = 8) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _syncs(fn: Any) -> int:
    """Synchronising CUDA operations made by ``fn()`` (``set_sync_debug_mode`` warns once per operation)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("frozen", [False, True], ids=["collecting", "frozen"])
@pytest.mark.parametrize("options", SETTINGS, ids=["defaults", "all-on", "all-off"])
def test_at_most_one_device_sync_per_step(method: str, frozen: bool, options: dict) -> None:
    torch.manual_seed(0)
    model = _mlp(17, 64).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    manager = PreconditionerManager(model, method, preconditioner_interval=None if frozen else 1000, **options)
    x, y = torch.randn(128, 8, device="cuda"), torch.randint(0, 10, (128,), device="cuda")

    def step() -> None:
        manager.begin_step()
        nn.functional.cross_entropy(model(x), y).backward()
        manager.step(opt)

    counts = []
    for i in range(6):
        opt.zero_grad(set_to_none=True)
        if i >= 3:  # past the refresh of step 0 and, frozen, the freeze of step 1
            counts.append(_syncs(step))
        else:
            step()
        opt.step()
    assert max(counts) <= 1, counts


@pytest.fixture
def shared_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """PSGD's probes drawn from a CPU generator seeded as the layer's own, so that both devices draw the same."""

    def probe(self: PSGD) -> torch.Tensor:
        gen = self.__dict__.setdefault("_cpu_gen", torch.Generator().manual_seed(self.generator.initial_seed()))
        return torch.randn((self.d_out, self.d_in), generator=gen, dtype=self.dtype).to(self.device)

    monkeypatch.setattr(PSGD, "probe", probe)


def _gradients(method: str, device: str, steps: int = 7) -> list[list[torch.Tensor]]:
    torch.manual_seed(0)
    model = _mlp(6, 16).double().to(device)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    manager = PreconditionerManager(model, method, preconditioner_interval=3, kl_clip=1e-3, grafting="sgd")
    written = []
    for step in range(steps):
        x = torch.randn(32, 8, dtype=torch.float64, generator=gen)
        y = torch.arange(32) % 10
        if step == 2:
            y[::4] = -100  # padding: a quarter of the rows ignored
        opt.zero_grad(set_to_none=True)
        manager.begin_step()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        manager.step(opt)
        written.append([p.grad.detach().cpu().clone() for p in model.parameters()])
        opt.step()
    return written


@pytest.mark.parametrize("method", METHODS)
def test_the_gpu_writes_the_cpus_gradients(method: str, shared_probes: None) -> None:
    cpu, gpu = _gradients(method, "cpu"), _gradients(method, "cuda")
    for step, (a, b) in enumerate(zip(cpu, gpu, strict=True)):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-9, msg=f"{method}, step {step}")


def test_phase_timings_are_events_read_when_asked() -> None:
    torch.manual_seed(0)
    model = _mlp(5, 64).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=2)
    x, y = torch.randn(64, 8, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        manager.begin_step()
        nn.functional.cross_entropy(model(x), y).backward()
        manager.step(opt)
        opt.step()
    timings = manager.timings
    assert all(timings[k] > 0 for k in ("statistics", "refresh", "precondition")), timings


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_keeps_the_weights_finite(method: str) -> None:
    torch.manual_seed(0)
    model = _mlp(6, 64).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    manager = PreconditionerManager(model, method, preconditioner_interval=2)
    x, y = torch.randn(64, 8, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        manager.begin_step()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        manager.step(opt)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert manager.counters["refreshes"] > 0 and manager.counters["preconditioned_steps"] >= 4, manager.counters
