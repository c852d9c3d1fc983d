"""Step time of lightning-soo's methods against installable peers on the same model, data and settings, each as a
ratio over plain SGD measured in one process, interleaved (median of blocks after warm-up).

MLP 784-512-512-10, cross-entropy, random data; batch 256 by default. Pairs at the same settings:

* Shampoo, statistics every step, roots every 10, blocks of 1024, SGD grafting — ours from the gradient
  (``statistics="gradient"``, what the peers compute) and per example (the seed's) — against pytorch-optimizer's
  ``Shampoo`` (roots every 10) and ``ScalableShampoo`` (the same intervals, block size and grafting);
* PSGD Kron, whitening form, an update every step — ours against pytorch-optimizer's ``Kron`` (probability 1);
* PSGD Kron, Newton form (exact Hessian-vector products), an update every step — ours (``fit_hessian``) against
  psgd-torch's ``Kron`` (triangular factors on every side, as ours);
* torch.optim.AdamW for scale.

Peers not installed (``pip install -e .[bench]``) are reported as missing.

    python benchmarks/peers.py [--quick] [--batch 256] [--out benchmarks/results/peers.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import StepFn, interleaved_many, machine, make_step, mlp
from lightning_soo import PreconditionerManager
from lightning_soo.diagnostics import fit_hessian

INTERVAL = 10  # roots / inverses every 10 steps, statistics every step
BLOCK = 1024


def _ours(method: str, options: dict, **kwargs: object) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], StepFn]:
    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
        manager = PreconditionerManager(model, method, options, **kwargs)  # type: ignore[arg-type]
        return make_step(model, manager, x, y)

    return build


def _ours_psgd_newton(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    options = {"fit": "hessian", "min_update_probability": 1.0}
    manager = PreconditionerManager(model, "psgd", options, preconditioner_interval=1, grafting="sgd")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        manager.begin_step(batch_size=x.shape[0])
        loss().backward()
        fit_hessian(manager, loss, model)
        manager.step(opt)
        opt.step()

    return step


def _torch_opt(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Callable[..., StepFn]:
    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
        opt = make(list(model.parameters()))

        def step() -> None:
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    return build


def _psgd_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    from psgd_torch import Kron

    opt = Kron(
        list(model.parameters()),
        preconditioner_max_skew=float("inf"),
        preconditioner_init_scale=1.0,
        lr_params=0.01,
        momentum=0.9,
        preconditioner_update_probability=1.0,
        exact_hessian_vector_product=True,
        preconditioner_type="Newton",
    )

    def step() -> None:
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))

    return step


def _po(name: str, **kwargs: object) -> Callable[..., StepFn]:
    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        import pytorch_optimizer

        return getattr(pytorch_optimizer, name)(params, **kwargs)

    return _torch_opt(make)


# (label, our method or None, builder, package needed)
CONTENDERS: list[tuple[str, str, Callable[..., StepFn], str | None]] = [
    ("sgd", "-", _torch_opt(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)), None),
    ("adamw (torch)", "-", _torch_opt(lambda p: torch.optim.AdamW(p, lr=1e-3)), None),
    (
        "shampoo, gradient stats (ours)",
        "shampoo",
        _ours(
            "shampoo",
            {"statistics": "gradient", "max_factor_dim": BLOCK},
            preconditioner_interval=INTERVAL,
            damping=1e-4,
            grafting="sgd",
        ),
        None,
    ),
    (
        "shampoo, per-example stats (ours)",
        "shampoo",
        _ours("shampoo", {"max_factor_dim": BLOCK}, preconditioner_interval=INTERVAL, damping=1e-4, grafting="sgd"),
        None,
    ),
    (
        "Shampoo (pytorch-optimizer)",
        "shampoo",
        _po("Shampoo", lr=0.01, preconditioning_compute_steps=INTERVAL),
        "pytorch_optimizer",
    ),
    (
        "ScalableShampoo (pytorch-optimizer)",
        "shampoo",
        _po(
            "ScalableShampoo",
            lr=0.01,
            start_preconditioning_step=1,
            preconditioning_compute_steps=INTERVAL,
            statistics_compute_steps=1,
            block_size=BLOCK,
        ),
        "pytorch_optimizer",
    ),
    (
        "psgd whitening (ours)",
        "psgd",
        _ours("psgd", {"min_update_probability": 1.0}, preconditioner_interval=1, grafting="sgd"),
        None,
    ),
    (
        "Kron (pytorch-optimizer)",
        "psgd",
        _po("Kron", lr=0.01, pre_conditioner_update_probability=1.0),
        "pytorch_optimizer",
    ),
    ("psgd newton (ours)", "psgd-newton", _ours_psgd_newton, None),
    ("Kron newton (psgd-torch)", "psgd-newton", _psgd_torch, "psgd_torch"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks of 10 steps per contender")
    parser.add_argument("--quick", action="store_true", help="tiny run for a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peers.json")
    args = parser.parse_args(argv)
    batch, blocks = (32, 2) if args.quick else (args.batch, args.blocks)
    torch.manual_seed(0)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    steps: dict[str, StepFn] = {}
    missing = []
    for label, _, build, package in CONTENDERS:
        if package is not None and importlib.util.find_spec(package) is None:
            missing.append(label)
            continue
        steps[label] = build(mlp(), x, y)
    t0 = time.perf_counter()
    ms = interleaved_many(steps, INTERVAL, blocks, warmup_blocks=1 if args.quick else 2)
    rows = []
    for label, group, _, _package in CONTENDERS:
        if label not in ms:
            continue
        rows.append(
            {"contender": label, "group": group, "ms": round(ms[label], 3), "ratio": round(ms[label] / ms["sgd"], 3)}
        )
        print(f"{label:<38} {group:<12} {ms[label]:8.2f} ms   {rows[-1]['ratio']:6.2f}x SGD", flush=True)
    for label in missing:
        print(f"{label:<38} not installed (pip install -e .[bench])")
    result = {
        "benchmark": "peers",
        "batch": batch,
        "interval": INTERVAL,
        "block_size": BLOCK,
        "steps_per_contender": blocks * INTERVAL,
        "machine": machine(),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "missing": missing,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
