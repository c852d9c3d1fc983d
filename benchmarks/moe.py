"""Step time of second-order methods on a mixture-of-experts language model, per experts implementation: a small
transformers Mixtral (2 layers, hidden 64, 8 experts, 2 per token) on random tokens, its experts run eagerly (a
loop of ``F.linear(x, p[e])``) or grouped (transformers' default ``grouped_mm``), each timed against plain SGD with
momentum on the same implementation, in one process, interleaved, as medians over blocks after warm-up.
Statistics every step, refresh every 10. The grouped form reads its offsets on the host once per experts module on
statistics steps (free on the CPU; one synchronisation per mixture-of-experts layer on an accelerator).

    python benchmarks/moe.py [--quick] [--device cpu|cuda|auto] [--out benchmarks/results/moe.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import StepFn, interleaved_many, machine, pick_device
from lightning_soo import PreconditionerManager

METHODS = ("kfac", "shampoo", "psgd")


def mixtral(hidden: int, experts: int, device: torch.device) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=128,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config).to(device)


def step_fn(model: nn.Module, method: str | None, tokens: torch.Tensor) -> tuple[StepFn, PreconditionerManager | None]:
    manager = None
    if method is not None:
        manager = PreconditionerManager(model, method, preconditioner_interval=10, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if manager is not None:
            manager.begin_step(batch_size=tokens.shape[0])
        model(input_ids=tokens, labels=tokens).loss.backward()
        if manager is not None:
            manager.step(opt)
        opt.step()

    return step, manager


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="hidden 16, 4 experts, 1 block of 2 steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe.json")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    hidden, experts, batch, length, block, blocks = (16, 4, 4, 16, 2, 1) if args.quick else (64, 8, 16, 64, 10, 4)
    tokens = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    base = mixtral(hidden, experts, device)
    t0 = time.perf_counter()
    rows = []
    for implementation in ("grouped_mm", "eager"):
        steps: dict[str, StepFn] = {}
        managers: dict[str, PreconditionerManager | None] = {}
        for method in (None, *METHODS):
            model = copy.deepcopy(base)
            model.set_experts_implementation(implementation)
            name = method or "sgd"
            steps[name], managers[name] = step_fn(model, method, tokens)
        ms = interleaved_many(steps, block, blocks, device=device)
        total = sum(p.numel() for p in base.parameters())
        for method in METHODS:
            manager = managers[method]
            assert manager is not None
            parts = [part for layer in manager.layers.values() for part in layer.adapter.parts]
            managed = sum(part.of(part.param).numel() for part in parts)  # an expert: its slice
            rows.append({
                "experts": implementation, "method": method, "sgd_ms": round(ms["sgd"], 2),
                "method_ms": round(ms[method], 2), "ratio": round(ms[method] / ms["sgd"], 3),
                "layers": len(manager.layers), "managed_share": round(managed / total, 3),
            })  # fmt: skip
    print(f"{'experts':<11} {'method':<8} {'SGD ms':>8} {'method ms':>10} {'ratio':>6} {'layers':>7} {'managed':>8}")
    for r in rows:
        print(
            f"{r['experts']:<11} {r['method']:<8} {r['sgd_ms']:>8.2f} {r['method_ms']:>10.2f} {r['ratio']:>6.2f}"
            f" {r['layers']:>7} {r['managed_share']:>8.3f}",
            flush=True,
        )
    result = {"benchmark": "moe", "machine": machine(device), "seconds": round(time.perf_counter() - t0, 1)}
    setting = {"hidden": hidden, "experts": experts, "batch": batch, "length": length, "block": block, "blocks": blocks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, **setting, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
