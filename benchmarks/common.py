"""Shared benchmark helpers: interleaved timing of a method against plain SGD in one process, FLOP counting,
machine information."""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_soo import PreconditionerManager


def mlp(sizes: tuple[int, ...] = (784, 512, 512, 10), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(d_out, d_in incl. bias column) of every Linear layer."""
    return [
        (m.out_features, m.in_features + int(m.bias is not None)) for m in model.modules() if isinstance(m, nn.Linear)
    ]


def forward_backward_flops(model: nn.Module, batch: int) -> float:
    """Matrix-product FLOPs of one forward and backward pass of an MLP: forward 2·N·d_in·d_out per layer;
    backward the weight gradient (same) plus the input gradient for every layer but the first."""
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)]
    fwd = sum(2 * batch * i * o for o, i in shapes)
    return fwd + fwd + sum(2 * batch * i * o for o, i in shapes[1:])


@dataclass
class Timing:
    sgd_ms: float
    method_ms: float

    @property
    def ratio(self) -> float:
        return self.method_ms / self.sgd_ms


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "python": platform.python_version(),
    }


StepFn = Callable[[], None]


def make_step(
    model: nn.Module, manager: PreconditionerManager | None, x: torch.Tensor, y: torch.Tensor, lr: float = 0.01
) -> StepFn:
    """One full optimizer step: zero_grad, begin_step, forward, backward, manager.step, SGD(momentum) step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        if manager is not None:
            manager.begin_step(batch_size=x.shape[0])
        nn.functional.cross_entropy(model(x), y).backward()
        if manager is not None:
            manager.step(opt)
        opt.step()

    return step


def interleaved(sgd: StepFn, method: StepFn, block: int, blocks: int, warmup_blocks: int = 2) -> Timing:
    """Median per-step time of alternating blocks of ``block`` steps (a whole refresh period, so amortised inverses
    are included): noise on a shared machine hits both sides alike."""
    for _ in range(warmup_blocks):
        for _ in range(block):
            sgd()
            method()
    t_sgd, t_method = [], []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(block):
            sgd()
        t1 = time.perf_counter()
        for _ in range(block):
            method()
        t2 = time.perf_counter()
        t_sgd.append((t1 - t0) / block)
        t_method.append((t2 - t1) / block)
    return Timing(1e3 * statistics.median(t_sgd), 1e3 * statistics.median(t_method))


def interleaved_many(steps: dict[str, StepFn], block: int, blocks: int, warmup_blocks: int = 2) -> dict[str, float]:
    """Median per-step milliseconds of each step function, timed in alternating blocks of ``block`` steps (the order
    rotates every block), so machine noise falls on every contender alike."""
    names = list(steps)
    for _ in range(warmup_blocks):
        for name in names:
            for _ in range(block):
                steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for b in range(blocks):
        order = names[b % len(names) :] + names[: b % len(names)]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(block):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / block)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}
