"""DDP cost of the preconditioners: bytes communicated per step and step time under 2-process DDP (gloo, CPU) against
one process on the whole batch, for plain SGD, K-FAC in both inverse-sharing modes, and Shampoo, Gauss-Newton and
PSGD with their defaults (inverse broadcast).

MLP 784-512-512-10, global batch 512 (256 per rank), statistics every step, inverses every 10 steps.

    python benchmarks/ddp.py [--steps 40] [--out benchmarks/results/ddp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, mlp
from lightning_soo import PreconditionerManager

GLOBAL_BATCH = 512
# label -> (method, grad_worker_fraction, method options, manager options); None: plain SGD
MODES: dict[str, tuple[str, float, dict, dict] | None] = {
    "sgd": None,
    "kfac (inverse broadcast)": ("kfac", 1.0, {}, {"kl_clip": 1e-3}),
    "kfac (gradient broadcast)": ("kfac", 0.5, {}, {"kl_clip": 1e-3}),
    "shampoo": ("shampoo", 1.0, {}, {"damping": 1e-4, "grafting": "sgd"}),
    "gauss_newton": ("gauss_newton", 1.0, {"damping_mode": "relative"}, {"damping": 0.3, "grafting": "sgd"}),
    "psgd": ("psgd", 1.0, {}, {"grafting": "sgd"}),
}


def _run(rank: int, world: int, mode: str, steps: int, result_file: str) -> None:
    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = mlp()
    ddp = DistributedDataParallel(model) if world > 1 else model
    spec = MODES[mode]
    manager = None
    if spec is not None:
        method, fraction, options, kwargs = spec
        manager = PreconditionerManager(model, method, options, grad_worker_fraction=fraction, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    x, y = (
        torch.randn(GLOBAL_BATCH // world, 784, generator=g),
        torch.randint(0, 10, (GLOBAL_BATCH // world,), generator=g),
    )
    times = []
    for step in range(steps + 10):
        t0 = time.perf_counter()
        opt.zero_grad()
        if manager is not None:
            manager.begin_step()
        nn.functional.cross_entropy(ddp(x), y).backward()
        if manager is not None:
            manager.step(opt)
        opt.step()
        if step >= 10:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        counters = manager.counters if manager is not None else {}
        grads_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) if world > 1 else 0
        result = {
            "ms": 1e3 * statistics.median(times),
            "bytes_per_step_statistics": counters.get("bytes_reduced", 0) / (steps + 10),
            "bytes_per_step_preconditioner": counters.get("bytes_broadcast", 0) / (steps + 10),
            "bytes_per_step_gradients_ddp": grads_bytes,
        }
        Path(result_file).write_text(json.dumps(result))
    if world > 1:
        dist.barrier()  # nobody tears gloo down while a peer is still sending
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(mode: str, world: int, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())  # a fresh rendezvous per run
        # the single-process run is spawned too, so both sides start from the same fresh process state
        mp.spawn(_run, args=(world, mode, steps, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="alternating single/DDP rounds (median)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp.json")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args(argv)
    rows = []
    for mode in args.modes:
        singles, ddps = [], []
        for _ in range(args.rounds):  # alternate, so load on the shared machine hits both alike
            singles.append(measure(mode, 1, args.steps))
            ddps.append(measure(mode, 2, args.steps))
        single = {"ms": statistics.median(r["ms"] for r in singles)}
        ddp = {**ddps[-1], "ms": statistics.median(r["ms"] for r in ddps)}
        row = {"mode": mode, "single_ms": round(single["ms"], 2), "ddp2_ms": round(ddp["ms"], 2)}
        row["ddp2_over_single"] = round(ddp["ms"] / single["ms"], 3)
        row.update({k: round(v) for k, v in ddp.items() if k.startswith("bytes")})
        rows.append(row)
        print(
            f"{mode:<26} single {row['single_ms']:7.2f} ms  2-process DDP {row['ddp2_ms']:7.2f} ms "
            f"(x{row['ddp2_over_single']:.2f})  bytes/step: statistics {row['bytes_per_step_statistics']:>10,}"
            f"  preconditioner {row['bytes_per_step_preconditioner']:>10,}  DDP gradients "
            f"{row['bytes_per_step_gradients_ddp']:>10,}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "ddp", "machine": machine(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
