"""What the coverage options cost: ``max_conv_groups`` (K-FAC on torchvision's ``regnet_y_400mf``: each group of its
16 grouped convolutions a layer) and ``precondition_vectors`` (PSGD on a tiny transformers GPT-2: its 50 norm vectors
layers too). For each model and option: the share of trainable elements managed, the step time over plain SGD's
(SGD with momentum, in one process, interleaved, medians over blocks after warm-up), and the operations of one
step on the accelerator's path over SGD's (counted on the CPU as ``launches.py`` counts them: what a launch-bound
GPU would see). The timings are the CPU's unless ``--device cuda``.

    python benchmarks/options_cost.py [--quick] [--device cpu|cuda|auto] [--out benchmarks/results/options_cost.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import StepFn, interleaved_many, machine, pick_device
from benchmarks.launches import OperationCount
from lightning_soo import PreconditionerManager, linalg

Loss = Callable[[nn.Module], Tensor]


def regnet(quick: bool, device: torch.device) -> tuple[nn.Module, Loss, int]:
    """torchvision's ``regnet_y_400mf`` (from ``.thirdparty``), 10 classes, random images."""
    from tests.integration.thirdparty import load

    torch.manual_seed(0)
    model = load("torchvision").models.regnet_y_400mf(num_classes=10).to(device)
    batch, size = (4, 32) if quick else (16, 64)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, size, size, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g)
    return model, lambda m: nn.functional.cross_entropy(m(x), y.to(device)), batch


def gpt2(quick: bool, device: torch.device) -> tuple[nn.Module, Loss, int]:
    """transformers' GPT-2, 12 blocks of width 64 (4 of 32 quick), random tokens."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    width, layers = (32, 4) if quick else (64, 12)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=512, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).to(device)
    tokens = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0)).to(device)
    return model, lambda m: m(input_ids=tokens, labels=tokens).loss, tokens.shape[0]


# model -> (builder, method, option, its value when on)
CASES: dict[str, tuple[Callable[[bool, torch.device], tuple[nn.Module, Loss, int]], str, str, object]] = {
    "regnet_y_400mf": (regnet, "kfac", "max_conv_groups", 64),
    "gpt2": (gpt2, "psgd", "precondition_vectors", True),
}


def step_fn(model: nn.Module, loss: Loss, batch: int, manager: PreconditionerManager | None) -> StepFn:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if manager is not None:
            manager.begin_step(batch_size=batch)
        loss(model).backward()
        if manager is not None:
            manager.step(opt)
        opt.step()

    return step


def managed_share(model: nn.Module, manager: PreconditionerManager) -> float:
    """Trainable elements in a managed layer (a parameter split over several layers counted once)."""
    params = {id(p): p for layer in manager.layers.values() for p in layer.adapter.params}
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in params.values()) / total


def operations(model: nn.Module, loss: Loss, batch: int, method: str | None, options: dict[str, object]) -> int:
    """Operations of the third step on the accelerator's path (flags on the device, equal layers stacked)."""
    model = copy.deepcopy(model).cpu()
    saved = linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU
    linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU = False, True
    try:
        manager = None
        if method is not None:
            kw: dict = {"statistics_interval": 1, "preconditioner_interval": 1000, "warn": lambda m: None}
            manager = PreconditionerManager(model, method, **options, **kw)
        step = step_fn(model, loss, batch, manager)
        for _ in range(2):
            step()
        with OperationCount() as counted:
            step()
    finally:
        linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU = saved
    return sum(counted.ops.values())


def measure(name: str, quick: bool, device: torch.device, block: int, blocks: int) -> list[dict[str, object]]:
    build, method, option, value = CASES[name]
    base, loss, batch = build(quick, device)
    steps: dict[str, StepFn] = {}
    managers: dict[str, PreconditionerManager] = {}
    settings = {"off": {}, "on": {option: value}}
    for key in ("sgd", "off", "on"):
        model = copy.deepcopy(base)
        manager = None
        if key != "sgd":
            manager = PreconditionerManager(model, method, warn=lambda m: None, **settings[key])  # type: ignore[arg-type]
            managers[key] = manager
        steps[key] = step_fn(model, loss, batch, manager)
    ms = interleaved_many(steps, block, blocks, device=device)
    ops = {"sgd": operations(base, loss, batch, None, {})}
    ops.update({key: operations(base, loss, batch, method, settings[key]) for key in ("off", "on")})
    rows = []
    for key in ("off", "on"):
        manager = managers[key]
        rows.append({
            "model": name, "method": method, "option": f"{option}={settings[key].get(option, 'default')}",
            "layers": len(manager.layers), "managed_share": round(managed_share(base, manager), 4),
            "sgd_ms": round(ms["sgd"], 2), "method_ms": round(ms[key], 2), "ratio": round(ms[key] / ms["sgd"], 3),
            "operations": ops[key], "sgd_operations": ops["sgd"], "operations_ratio": round(ops[key] / ops["sgd"], 2),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small inputs, 1 block of 2 steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "options_cost.json")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    block, blocks = (2, 1) if args.quick else (10, 4)
    t0 = time.perf_counter()
    rows = [row for name in CASES for row in measure(name, args.quick, device, block, blocks)]
    print(f"{'model':<15} {'method':<6} {'option':<30} {'layers':>6} {'managed':>8} {'ratio':>6} {'operations':>10}")
    for r in rows:
        print(
            f"{r['model']:<15} {r['method']:<6} {r['option']:<30} {r['layers']:>6} {r['managed_share']:>8.3f}"
            f" {r['ratio']:>6.2f} {r['operations_ratio']:>9.2f}x",
            flush=True,
        )
    result = {"benchmark": "options_cost", "machine": machine(device), "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "block": block, "blocks": blocks, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
