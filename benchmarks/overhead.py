"""Step-time overhead of the preconditioners over plain SGD, beside the FLOP floor computed from the layer shapes.

MLP 784-512-512-10 on random data, SGD with momentum 0.9, two settings: batch 256 with statistics every step and
inverses every 10 steps; batch 2048 with statistics every 10 and inverses every 100. A third, ``deep``, is a
48-layer width-128 MLP at batch 256 (statistics every step, refresh every 10): short kernels, where the per-layer
Python work of a method shows. Ratios are measured in one process, interleaved, as medians over blocks of a whole
refresh period after warm-up; on CUDA the blocks are timed with events. Every method is timed beside a bare
reference of the same kernels (``benchmarks/bare.py``) in the same interleave: a measured floor, at the rates the
machine gives each kernel (LAPACK's decompositions and triangular solves run several times slower per FLOP than
products at these sizes on a CPU, which the FLOP floor does not see).

    python benchmarks/overhead.py [--quick] [--device cpu|cuda|auto] [--profile] [--out ...json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bare import Bare, BareGaussNewton, BareKFAC, BarePSGD, BareShampoo
from benchmarks.common import (
    forward_backward_flops,
    interleaved_blocks,
    linear_shapes,
    machine,
    make_step,
    mlp,
    pick_device,
)
from lightning_soo import PreconditionerManager, linalg
from lightning_soo.engine.factored import worth as factored_worth


@dataclass
class Setting:
    batch: int
    statistics_interval: int
    preconditioner_interval: int
    sizes: tuple[int, ...] = (784, 512, 512, 10)
    device: str = "cpu"  # where it runs: the statistics' Grams are multiplied by blocks as there (``gram_flops``)


SETTINGS = {
    "256": Setting(256, 1, 10),
    "2048": Setting(2048, 10, 100),
    "deep": Setting(256, 1, 10, (128,) * 48 + (10,)),
}
TARGETS = {("kfac", "256"): 4.0, ("kfac", "2048"): 1.5, ("kfac-frozen", "2048"): 1.3, ("shampoo", "2048"): 1.5}


# -- FLOP models of the extra work (matrix products only) --------------------------------------------------------
def gram_flops(rows: int, d: int, device: str) -> float:
    """FLOPs of a ``d``-column statistic Gram as ``linalg.gram_`` takes it: the column blocks on and above the
    diagonal only, where it splits one (62% of 2·N·d² at four blocks)."""
    cuts = linalg.gram_cuts(d, torch.device(device))
    if cuts is None:
        return 2 * rows * d * d
    return sum(2 * rows * (b - a) * (d - a) for a, b in itertools.pairwise(cuts))


def kfac_flops(shapes: list[tuple[int, int]], s: Setting, products: int = 2, inverse_cost: float = 1.0) -> float:
    """Statistics 2·N·d² per factor per statistics step (less where ``gram_flops`` multiplies by blocks);
    ``products`` (2 Cholesky, 4 eigen) preconditioning products per step, on statistics steps the factored form
    ``(L·Δᵀ)(H̄·R)`` where the library takes it (``engine.factored``: two products with dense operands);
    ``inverse_cost``·n³ per factor per refresh."""
    stats = sum(gram_flops(s.batch, i, s.device) + gram_flops(s.batch, o, s.device) for o, i in shapes)
    stats /= s.statistics_interval
    plain = [(o * o * i + o * i * i) * products for o, i in shapes]
    cheaper = [
        2 * s.batch * (o * o + i * i + o * i) if products == 2 and factored_worth(s.batch, o, i) else p
        for (o, i), p in zip(shapes, plain, strict=True)
    ]
    pre = (sum(cheaper) + (s.statistics_interval - 1) * sum(plain)) / s.statistics_interval
    inv = sum(inverse_cost * (i**3 + o**3) for o, i in shapes) / s.preconditioner_interval
    return stats + pre + inv


def frozen_flops(shapes: list[tuple[int, int]], s: Setting) -> float:
    return sum(2 * (o * o * i + o * i * i) for o, i in shapes)


ManagerFactory = Callable[[nn.Module, Setting], PreconditionerManager]
BareFactory = Callable[[nn.Module, Setting], Bare]
FlopModel = Callable[[list[tuple[int, int]], Setting], float]


def _kfac(inverse: str) -> ManagerFactory:
    def build(model: nn.Module, s: Setting) -> PreconditionerManager:
        return PreconditionerManager(
            model,
            "kfac",
            {"inverse": inverse},
            statistics_interval=s.statistics_interval,
            preconditioner_interval=s.preconditioner_interval,
            kl_clip=1e-3,  # KFACCallback's default; keeps the run finite so the timings are of real numbers
        )

    return build


def _shampoo(model: nn.Module, s: Setting) -> PreconditionerManager:
    return PreconditionerManager(
        model,
        "shampoo",
        statistics_interval=s.statistics_interval,
        preconditioner_interval=s.preconditioner_interval,
        damping=1e-4,
        grafting="sgd",  # ShampooCallback's default
    )


def shampoo_flops(shapes: list[tuple[int, int]], s: Setting) -> float:
    """Per-example statistics 2·N·d² per factor (plus the row scaling), two products per step, eigh ~9n³."""
    return kfac_flops(shapes, s, products=2, inverse_cost=9.0)


def _gauss_newton(model: nn.Module, s: Setting) -> PreconditionerManager:
    return PreconditionerManager(
        model,
        "gauss_newton",
        {"damping_mode": "relative"},
        statistics_interval=s.statistics_interval,
        preconditioner_interval=s.preconditioner_interval,
        damping=0.3,  # GaussNewtonCallback's defaults (damping, grafting, KL clip)
        kl_clip=1e-2,
        grafting="sgd",
    )


def gauss_newton_flops(shapes: list[tuple[int, int]], s: Setting) -> float:
    """Per step ``Uᵀ vec(G)`` and ``U w``: 4·N·d_out·d_in; per refresh the Gram 2·N²·(d_in + d_out) and the
    Cholesky N³/3."""
    n = s.batch
    pre = sum(4 * n * o * i for o, i in shapes)
    inv = sum(2 * n * n * (o + i) + n**3 / 3 for o, i in shapes) / s.preconditioner_interval
    return pre + inv


def _psgd(model: nn.Module, s: Setting) -> PreconditionerManager:
    return PreconditionerManager(
        model,
        "psgd",
        statistics_interval=s.statistics_interval,
        preconditioner_interval=s.preconditioner_interval,
        grafting="sgd",
    )


def psgd_flops(shapes: list[tuple[int, int]], s: Setting) -> float:
    """Per fitting step (every statistics step: probability 1 in the first 500 steps): ``A = Q_l G Q_rᵀ`` and
    ``B = Q_l⁻ᵀ V Q_r⁻¹`` (2 products each, triangular solves at half cost), the four Gram terms, and the two
    triangular updates ``triu(·) Q``; per refresh ``Q_lᵀQ_l``, ``Q_rᵀQ_r``; per step two preconditioning products."""
    fit = sum(2 * (o * o * i + o * i * i) * 1.5 + 4 * (o * o * i + o * i * i) + 2 * (o**3 + i**3) for o, i in shapes)
    refresh = sum(2 * (o**3 + i**3) for o, i in shapes)
    pre = sum(2 * (o * o * i + o * i * i) for o, i in shapes)
    return fit / s.statistics_interval + refresh / max(s.preconditioner_interval, s.statistics_interval) + pre


def _kfac_frozen(model: nn.Module, s: Setting) -> PreconditionerManager:
    """K-FAC after one refresh on a batch like the benchmark's, then frozen: only the products remain."""
    manager = _kfac("cholesky")(model, s)
    device = next(model.parameters()).device
    x, y = torch.randn(s.batch, s.sizes[0], device=device), torch.randint(0, 10, (s.batch,), device=device)
    manager.begin_step()
    nn.functional.cross_entropy(model(x), y).backward()
    manager.step()
    model.zero_grad()
    manager.freeze()
    return manager


def _bare(kind: type[Bare], **kw: object) -> BareFactory:
    return lambda model, s: kind(model, s.statistics_interval, s.preconditioner_interval, **kw)  # type: ignore[arg-type]


# name -> (manager factory, FLOP model of the extra work, bare reference timed in the same interleave: the measured
# floor, ``benchmarks/bare.py``); add a row per method here
METHODS: dict[str, tuple[ManagerFactory, FlopModel, BareFactory]] = {
    "kfac": (_kfac("cholesky"), kfac_flops, _bare(BareKFAC)),
    "kfac-eigen": (
        _kfac("eigen"),
        lambda sh, s: kfac_flops(sh, s, products=4, inverse_cost=9.0),
        _bare(BareKFAC, inverse="eigen"),
    ),
    # the bare reference's statistics and inverses at step 0 only
    "kfac-frozen": (_kfac_frozen, frozen_flops, lambda model, s: BareKFAC(model, 10**9, 10**9)),
    "shampoo": (_shampoo, shampoo_flops, _bare(BareShampoo)),
    "gauss_newton": (_gauss_newton, gauss_newton_flops, _bare(BareGaussNewton)),
    "psgd": (_psgd, psgd_flops, _bare(BarePSGD)),
}


def measure(name: str, key: str, blocks: int, quick: bool, device: torch.device) -> dict[str, object]:
    s = SETTINGS[key]
    if quick:  # a smoke run: narrow and at most 6 layers deep
        sizes = tuple(min(d, 64) for d in s.sizes[:-1][:6]) + s.sizes[-1:]
        s = Setting(min(s.batch, 64), s.statistics_interval, min(s.preconditioner_interval, 10), sizes)
    s = dataclasses.replace(s, device=device.type)
    factory, flops, bare_factory = METHODS[name]
    torch.manual_seed(0)
    x, y = torch.randn(s.batch, s.sizes[0], device=device), torch.randint(0, 10, (s.batch,), device=device)
    sgd_model, model, bare_model = (mlp(s.sizes, device=device) for _ in range(3))
    manager = factory(model, s)
    steps = {  # in rotating order, so machine noise falls on all three alike
        "sgd": make_step(sgd_model, None, x, y),
        "method": make_step(model, manager, x, y),
        "bare": make_step(bare_model, bare_factory(bare_model, s), x, y),
    }
    times = interleaved_blocks(steps, s.preconditioner_interval, blocks, device=device)
    ratio = _median_ratio(times, "method", "sgd")
    shapes = linear_shapes(model)
    floor = 1 + flops(shapes, s) / forward_backward_flops(model, s.batch)
    return {
        "method": name,
        "setting": key,
        "device": device.type,
        "layers": len(s.sizes) - 1,
        "batch": s.batch,
        "statistics_interval": s.statistics_interval,
        "preconditioner_interval": s.preconditioner_interval,
        "sgd_ms": round(1e3 * statistics.median(times["sgd"]), 3),
        "method_ms": round(1e3 * statistics.median(times["method"]), 3),
        "ratio": round(ratio, 3),
        "flop_floor": round(floor, 3),
        "ratio_over_floor": round(ratio / floor, 3),
        "bare_ratio": round(_median_ratio(times, "bare", "sgd"), 3),
        "ratio_over_bare": round(_median_ratio(times, "method", "bare"), 3),
        "target": TARGETS.get((name, key)),
        "manager_seconds": {k: round(v, 4) for k, v in manager.timings.items()},  # events on CUDA
        "steps": manager.steps,
    }


def _median_ratio(times: dict[str, list[float]], name: str, over: str) -> float:
    """Median over rounds of ``name``'s per-step time over ``over``'s in the same round (not the ratio of medians)."""
    return statistics.median([m / g for g, m in zip(times[over], times[name], strict=True)])


def profile(key: str) -> None:
    """Where the time of a K-FAC step goes (torch.profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    s = SETTINGS[key]
    model = mlp(s.sizes)
    manager = _kfac("cholesky")(model, s)
    x, y = torch.randn(s.batch, s.sizes[0]), torch.randint(0, 10, (s.batch,))
    step = make_step(model, manager, x, y)
    for _ in range(s.preconditioner_interval):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(s.preconditioner_interval * 2):
            step()
    print(f"\nprofile, batch {s.batch} ({2 * s.preconditioner_interval} steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(manager.timings.values())
    print("manager sections (s):", {k: round(v, 3) for k, v in manager.timings.items()}, f"total {total:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--blocks", type=int, default=None, help="timed blocks per row (default: >= 30 steps)")
    parser.add_argument("--quick", action="store_true", help="tiny run for a smoke test")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to run (default cpu)")
    parser.add_argument("--profile", action="store_true", help="print where the time of a K-FAC step goes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":  # a random batch fitted to ~0 loss fills the factors with denormals: slow on CPU
        torch.set_flush_denormal(True)
    rows = []
    t0 = time.perf_counter()
    for key in args.settings:
        for name in args.methods:
            s = SETTINGS[key]
            blocks = args.blocks or (2 if args.quick else max(5, -(-30 // s.preconditioner_interval) + 2))
            rows.append(measure(name, key, blocks, args.quick, device))
            r = rows[-1]
            print(
                f"{r['method']:<12} {r['layers']:>2} layers batch {r['batch']:>5}  stats/{r['statistics_interval']:<3}"
                f" inv/{r['preconditioner_interval']:<4}  SGD {r['sgd_ms']:8.2f} ms"
                f"  method {r['method_ms']:8.2f} ms  ratio {r['ratio']:5.2f}x"
                f"  floor {r['flop_floor']:5.2f}x  bare {r['bare_ratio']:5.2f}x (over it {r['ratio_over_bare']:4.2f})"
                f"  target {r['target'] or '-'}",
                flush=True,
            )
    result = {
        "benchmark": "overhead",
        "machine": machine(device),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if args.profile:
        for key in args.settings:
            profile(key)


if __name__ == "__main__":
    main()
