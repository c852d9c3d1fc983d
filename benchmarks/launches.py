"""Kernel launches per optimizer step on the accelerator's path, counted on the CPU.

On a GPU every tensor operation of the hot path is a kernel launch of a few microseconds, and a narrow layer's
kernels are shorter than that: there a step's time follows its number of operations, not its FLOPs. This counts the
ATen operations of one steady-state step (forward, backward, the manager's work and the optimizer's, statistics
collected but no refresh; or frozen) of the same models as ``overhead.py``, for every method, against plain SGD's
step, with the accelerator's decisions (``linalg.HOST_DECIDES_ON_CPU`` off) and each layer on its own ("alone", as
under ``torch.distributed``) or equal layers stacked ("stacked", one accelerator: ``engine.batched``,
``preconditioners.banks``, ``psgd_math.fit_stacked``). SGD runs with ``foreach=True``, as it does on a GPU.

The ratio ``method / SGD`` is what a launch-bound GPU would see if every operation cost the same; it is a count,
not a timing (nothing here ran on a GPU). Views, host reads and the host-side wrapping of numbers are not counted.

    python benchmarks/launches.py [--quick] [--out ...json]   # prints a table, writes results/launches.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import machine, mlp
from benchmarks.overhead import SETTINGS
from lightning_soo import PreconditionerManager, linalg
from lightning_soo.preconditioners.gauss_newton import GaussNewton

NOT_KERNELS = {"_local_scalar_dense", "scalar_tensor", "detach", "lift_fresh"}
METHODS = ("kfac", "shampoo", "gauss_newton", "psgd")


class OperationCount(TorchDispatchMode):
    """The ATen operations run inside it, by name (views and host reads left out): kernel launches on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NOT_KERNELS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(method: str | None, key: str, frozen: bool, stacked: bool, quick: bool = False, steps: int = 4) -> int:
    """Operations of the last of ``steps`` steps (past the refresh of step 0 and, frozen, the freeze of step 1);
    ``quick``: at most 6 layers of width 32 and a batch of 32 (a smoke run)."""
    s = SETTINGS[key]
    if quick:
        s = dataclasses.replace(s, batch=32, sizes=tuple(min(d, 32) for d in s.sizes[:-1][:6]) + s.sizes[-1:])
    model = mlp(s.sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    manager = None
    if method is not None:
        manager = PreconditionerManager(model, method, statistics_interval=1, preconditioner_interval=1000)
    x, y = torch.randn(s.batch, s.sizes[0]), torch.randint(0, 10, (s.batch,))
    saved = linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU
    linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU = False, stacked
    # Gauss-Newton collects only on steps a refresh reads (``running_statistics``): counted here as a collecting
    # step that does not refresh, as it is under ``statistics_interval > 1``
    running, GaussNewton.running_statistics = GaussNewton.running_statistics, True
    try:
        for step in range(steps):
            if manager is not None and frozen and step == 1:
                manager.freeze()
            opt.zero_grad(set_to_none=True)
            with OperationCount() as counted:
                if manager is not None:
                    manager.begin_step(batch_size=s.batch)
                nn.functional.cross_entropy(model(x), y).backward()
                if manager is not None:
                    manager.step(opt)
                opt.step()
    finally:
        linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU = saved
        GaussNewton.running_statistics = running
    return sum(counted.ops.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["deep", "256"], choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "launches.json")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    rows = []
    print(f"{'setting':<8} {'method':<13} {'steps':<10} {'SGD':>5} {'alone':>7} {'stacked':>8}  ratio alone / stacked")
    for key in args.settings:
        for frozen in (False, True):
            sgd = count(None, key, frozen, False, args.quick)
            for method in args.methods:
                alone = count(method, key, frozen, False, args.quick)
                stacked = count(method, key, frozen, True, args.quick)
                kind = "frozen" if frozen else "collecting"
                rows.append(
                    {
                        "setting": key,
                        "layers": 6 if args.quick else len(SETTINGS[key].sizes) - 1,
                        "method": method,
                        "steps": kind,
                        "sgd_ops": sgd,
                        "alone_ops": alone,
                        "stacked_ops": stacked,
                        "ratio_alone": round(alone / sgd, 2),
                        "ratio_stacked": round(stacked / sgd, 2),
                    }
                )
                print(
                    f"{key:<8} {method:<13} {kind:<10} {sgd:>5} {alone:>7} {stacked:>8}"
                    f"  {alone / sgd:5.2f}x / {stacked / sgd:5.2f}x",
                    flush=True,
                )
    result = {"benchmark": "launches", "machine": machine(torch.device("cpu")), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
