"""Shared benchmark helpers: interleaved timing of a method against plain SGD in one process, FLOP counting,
machine information."""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.bare import Bare
from lightning_soo import PreconditionerManager


def mlp(
    sizes: tuple[int, ...] = (784, 512, 512, 10), seed: int = 0, device: torch.device | None = None
) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device or torch.device("cpu"))


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


def machine(device: torch.device | None = None) -> dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    return {
        "device": gpu or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "python": platform.python_version(),
    }


StepFn = Callable[[], None]


def make_step(
    model: nn.Module,
    manager: PreconditionerManager | Bare | None,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float = 0.01,
) -> StepFn:
    """One full optimizer step: zero_grad, begin_step, forward, backward, manager.step, SGD(momentum) step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if manager is not None:
            manager.begin_step(batch_size=x.shape[0])
        nn.functional.cross_entropy(model(x), y).backward()
        if manager is not None:
            manager.step(opt)
        opt.step()

    return step


def pick_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto``; ``cuda`` without a GPU falls back to the CPU with a message saying so."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here; measuring on the CPU instead", flush=True)
        name = "cpu"
    return torch.device(name)


class Clock:
    """Elapsed seconds between marks: ``perf_counter`` on the CPU; CUDA events on a GPU (kernels run
    asynchronously, so host time would measure launches), read once after a synchronisation at the end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[object] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]  # type: ignore[attr-defined]
        return [b - a for a, b in itertools.pairwise(self.marks)]  # type: ignore[operator]


def interleaved_many(steps: dict[str, StepFn], block: int, blocks: int, **options: Any) -> dict[str, float]:
    """Median per-step milliseconds of each step function over its blocks (``interleaved_blocks``, which takes the
    ``options``)."""
    times = interleaved_blocks(steps, block, blocks, **options)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def interleaved_blocks(
    steps: dict[str, StepFn],
    block: int,
    blocks: int,
    warmup_blocks: int = 2,
    device: torch.device | None = None,
    rotate: bool = True,
) -> dict[str, list[float]]:
    """Per-step seconds of each step function in each of its ``blocks`` timed blocks, in order: the functions run in
    alternating blocks of ``block`` steps (the order rotates every block unless ``rotate`` is off), so machine noise
    falls on every contender alike."""
    names = list(steps)
    for _ in range(warmup_blocks):
        for name in names:
            for _ in range(block):
                steps[name]()
    clock = Clock(device or torch.device("cpu"))
    order_log: list[str] = []
    for b in range(blocks):
        order = names[b % len(names) :] + names[: b % len(names)] if rotate else names
        for name in order:
            clock.mark()
            for _ in range(block):
                steps[name]()
            clock.mark()
            order_log.append(name)
    spans = clock.intervals()[::2]  # (start, end) pairs: every other interval is a block
    times: dict[str, list[float]] = {name: [] for name in names}
    for name, span in zip(order_log, spans, strict=True):
        times[name].append(span / block)
    return times
