"""Host time per layer on the accelerator's path, measured on the CPU with kernels too small to matter.

A GPU step of a deep, narrow model is bound by the host: the Python a step runs per layer and the launches it
makes, while the kernels themselves take microseconds. This times that host work where nothing else hides it: a residual
MLP of width 16 (batch 64) at two depths, the accelerator's decisions (``linalg.HOST_DECIDES_ON_CPU`` off) with equal
layers stacked (``linalg.BATCH_ON_CPU``, as on one GPU), statistics every step, no refresh in the timed blocks, each
method interleaved with plain SGD in one process. Reported: ``(method − SGD) / layers`` in microseconds at both depths
(the tiny kernels' CPU time included, so an upper bound of the host's share), what one more layer adds (the
difference between the depths, per layer: the fixed cost of a step left out), and the lines of the library's own
Python one more layer runs a step (``sys.settrace``, deterministic). Launch counts are ``launches.py``'s.

With ``--device cuda`` the same models run on a GPU, timed by CUDA events: there the figures are the GPU's own
per-layer cost of a step whose kernels are microseconds long (host, launches and kernels together).

    python benchmarks/host.py [--quick] [--device cpu|cuda|auto] [--out ...json]   # writes results/host.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import lightning_soo
from benchmarks.common import interleaved_blocks, machine, make_step, mlp, pick_device
from benchmarks.overhead import METHODS, Setting
from lightning_soo import PreconditionerManager, linalg
from lightning_soo.preconditioners.gauss_newton import GaussNewton

WIDTH, BATCH = 16, 64
NAMES = ("kfac", "shampoo", "gauss_newton", "psgd")  # overhead.py's rows of the four methods, default options
ROOT = lightning_soo.__path__[0]


def library_lines(method: str, depth: int, frozen: bool, stacked: bool, refresh: bool = False, **options: Any) -> int:
    """Lines of the library's own code (files under ``lightning_soo/``) that the fourth step of an MLP of ``depth``
    layers of width 16 runs (past the refresh and, frozen, the freeze), on the accelerator's path, equal layers
    ``stacked`` or each alone, with the manager's ``options``; ``refresh``: a step that refreshes (every step does).
    Loops count per iteration. Deterministic, unlike a timing."""
    torch.manual_seed(0)
    model = mlp((8,) + (16,) * (depth - 1) + (10,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    interval = None if frozen else 1 if refresh else 1000
    manager = PreconditionerManager(model, method, preconditioner_interval=interval, **options)
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    count = [0]

    def lines(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            count[0] += 1
        return lines

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return lines if frame.f_code.co_filename.startswith(ROOT) else None

    host, linalg.HOST_DECIDES_ON_CPU = linalg.HOST_DECIDES_ON_CPU, False
    batch, linalg.BATCH_ON_CPU = linalg.BATCH_ON_CPU, stacked
    running, GaussNewton.running_statistics = GaussNewton.running_statistics, True  # collecting steps' cost
    try:
        for step in range(4):
            opt.zero_grad(set_to_none=True)
            if step == 3:
                count[0] = 0
                sys.settrace(calls)
            try:
                manager.begin_step()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                manager.step(opt)
            finally:
                sys.settrace(None)
            opt.step()
    finally:
        linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU = host, batch
        GaussNewton.running_statistics = running
    return count[0]


class Residual(nn.Module):
    """``x + tanh(W x + b)``: a deep stack of these keeps its gradients (a plain ReLU MLP 192 layers deep dies, and
    a layer with zero output gradients would be timed doing nothing)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


def residual_mlp(depth: int, width: int = WIDTH) -> nn.Sequential:
    """``depth - 1`` residual blocks of ``width`` and a 10-way head: ``depth`` Linear layers."""
    torch.manual_seed(0)
    return nn.Sequential(*(Residual(width) for _ in range(depth - 1)), nn.Linear(width, 10))


def host_us(methods: list[str], depth: int, blocks: int, device: torch.device) -> dict[str, float]:
    """Each method's microseconds per step beyond SGD's, at ``depth`` layers (on CUDA: by events, the GPU's own
    path)."""
    # statistics every step, the one refresh at step 0
    s = Setting(BATCH, 1, 1_000_000, (WIDTH,) * depth + (10,), device=device.type)
    torch.manual_seed(0)
    x = torch.randn(s.batch, WIDTH, device=device)
    y = torch.randint(0, 10, (s.batch,), device=device)
    steps = {"sgd": make_step(residual_mlp(depth).to(device), None, x, y)}
    for name in methods:
        model = residual_mlp(depth).to(device)
        steps[name] = make_step(model, METHODS[name][0](model, s), x, y)
    times = interleaved_blocks(steps, 10, blocks, device=device)
    sgd = statistics.median(times["sgd"])
    return {name: 1e6 * (statistics.median(times[name]) - sgd) for name in methods}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--depths", nargs=2, type=int, default=[48, 192])
    parser.add_argument("--blocks", type=int, default=10, help="timed blocks of 10 steps per contender")
    parser.add_argument("--quick", action="store_true", help="depths 4 and 8, two blocks (a smoke run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="cuda: the GPU's own path")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "host.json")
    args = parser.parse_args(argv)
    depths, blocks = ([4, 8], 2) if args.quick else (args.depths, args.blocks)
    device = pick_device(args.device)
    torch.set_flush_denormal(True)
    saved = linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU
    linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU = False, True  # the accelerator's path (a GPU takes it anyway)
    try:
        timed = {d: host_us(args.methods, d, blocks, device) for d in depths}
    finally:
        linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU = saved
    rows = []
    low, high = depths
    print(f"{'method':<13} {f'us/layer at {low}':>16} {f'us/layer at {high}':>17}", end="")
    print(f" {'one more layer':>15} {'lines/layer':>12}")
    for name in args.methods:
        lines = [library_lines(name, d, False, True) for d in (5, 17)]
        per_layer = (lines[1] - lines[0]) / 12
        marginal = (timed[high][name] - timed[low][name]) / (high - low)
        rows.append(
            {
                "method": name,
                "device": device.type,
                "width": WIDTH,
                "batch": BATCH,
                f"host_us_per_layer_{low}": round(timed[low][name] / low, 1),
                f"host_us_per_layer_{high}": round(timed[high][name] / high, 1),
                "host_us_one_more_layer": round(marginal, 1),
                "lines_per_layer": per_layer,
            }
        )
        print(
            f"{name:<13} {timed[low][name] / low:>16.0f} {timed[high][name] / high:>17.0f} {marginal:>15.0f}"
            f" {per_layer:>12.0f}"
        )
    result = {"benchmark": "host", "machine": machine(device), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
