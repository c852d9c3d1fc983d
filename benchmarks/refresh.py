"""Refresh time of a 12-block transformer-like stack of Linear layers: one decomposition call per factor (the
layer-by-layer path) against one batched call per factor shape (``refresh_many``), in one process, interleaved.

Each block has the Linear layers of a width-256 transformer block (q, k, v and output projections 256→256, MLP
256→1024→256), so every factor shape occurs 12 to 48 times. Statistics come from one step on random data.

    python benchmarks/refresh.py [--quick] [--device cpu|cuda|auto] [--out benchmarks/results/refresh.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import Clock, machine, pick_device
from lightning_soo import PreconditionerManager, linalg

METHODS = {
    "kfac": ("kfac", {"inverse": "cholesky"}),
    "kfac-eigen": ("kfac", {"inverse": "eigen"}),
    "shampoo": ("shampoo", {}),
    "gauss_newton": ("gauss_newton", {}),
}


def stack(blocks: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width) for _ in range(4)]  # q, k, v, out
        layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
    return nn.Sequential(*layers)


def measure(name: str, blocks: int, width: int, repeats: int, device: torch.device) -> dict[str, object]:
    method, options = METHODS[name]
    torch.manual_seed(0)
    model = stack(blocks, width).to(device)
    manager = PreconditionerManager(model, method, options, preconditioner_interval=1)
    manager.begin_step()
    model(torch.randn(64, width, device=device)).square().mean().backward()
    manager.step()
    pres = [layer.preconditioner for layer in manager.layers.values()]
    cls = type(pres[0])

    def batched() -> None:
        linalg.BATCH_ON_CPU = True  # the library batches on accelerators only; measure the batched path here
        try:
            cls.refresh_many(pres, 0.01)
        finally:
            linalg.BATCH_ON_CPU = False

    runs = {"per_layer": lambda: [p.refresh(0.01) for p in pres], "batched": batched}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(repeats):
        for k, run in runs.items():
            clock = Clock(device)
            clock.mark()
            run()
            clock.mark()
            times[k].append(clock.intervals()[0])
    per_layer, batched = (1e3 * statistics.median(times[k]) for k in runs)
    return {
        "method": name,
        "layers": len(pres),
        "per_layer_ms": round(per_layer, 2),
        "batched_ms": round(batched, 2),
        "speed_up": round(per_layer / batched, 2),
        "per_step_at_interval_10_ms": {"per_layer": round(per_layer / 10, 2), "batched": round(batched / 10, 2)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 blocks of width 32, 2 repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "refresh.json")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    blocks, width, repeats = (2, 32, 2) if args.quick else (12, 256, 3)
    t0 = time.perf_counter()
    rows = [measure(name, blocks, width, repeats, device) for name in METHODS]
    for r in rows:
        print(
            f"{r['method']:<11} {r['layers']:>3} layers  per layer {r['per_layer_ms']:9.2f} ms"
            f"  batched {r['batched_ms']:9.2f} ms  x{r['speed_up']}",
            flush=True,
        )
    result = {"benchmark": "refresh", "machine": machine(device), "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "blocks": blocks, "width": width, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
