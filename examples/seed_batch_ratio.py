"""Seed Fig. 4 at CPU scale: the ratio of batch size to dataset size decides how much second order helps.

Subsets of N = 180 ... 1,438 digits training examples (batch sizes 32 ... 512) and of N = 1,000 ... 8,000 MNIST-1D
training examples (batch sizes 32 ... 2,000), SGD (momentum 0.9, lr best of a 2-point grid) against
SGD + KFACCallback (defaults). Gain = SGD's final training loss / K-FAC's. Two arms: fixed epochs (the usual
comparison, where a larger ratio also means fewer steps) and fixed steps (the same number of optimizer steps
everywhere), which separates the ratio from the number of steps.

Criterion (stated before running), per dataset: in both arms the gain's Spearman rank correlation with batch / N
is > 0.3.

    OMP_NUM_THREADS=1 python examples/seed_batch_ratio.py [--quick] [--dataset digits|mnist1d|both]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from seed_common import (
    Clock,
    add_dataset,
    base_parser,
    command,
    load_datasets,
    pyplot,
    quiet,
    result_path,
    save,
    spearman,
    verdict,
)

from lightning_soo.app.train import train

SIZES = {"digits": [180, 360, 720, 1438], "mnist1d": [1000, 2000, 4000, 8000]}
BATCHES = {"digits": [32, 128, 512], "mnist1d": [32, 128, 512, 2000]}
CRITERION = __doc__.split("Criterion")[1].split("\n\n")[0]


def subset(data: tuple[TensorDataset, TensorDataset], n: int) -> tuple[TensorDataset, TensorDataset]:
    x, y = data[0].tensors
    return TensorDataset(x[:n], y[:n]), data[1]


def best_loss(method: str, grid: list[dict], **kwargs: object) -> float:
    losses = [train(method, **kwargs, **options).final_train_loss for options in grid]  # type: ignore[arg-type]
    finite = [v for v in losses if math.isfinite(v)]
    return min(finite) if finite else math.inf


def run_dataset(name: str, full: tuple, quick: bool, epochs: int, steps: int) -> dict:
    """Both arms over the (N, batch) grid of one dataset; the rank correlations and the verdict."""
    sizes = [len(full[0]) // 4, len(full[0])] if quick else SIZES[name]
    batches = [32, 256] if quick else BATCHES[name]
    sgd_grid = [{"lr": 0.2}] if quick else [{"lr": 0.1}, {"lr": 0.3}]
    cells = []
    for n in sizes:
        data = subset(full, n)
        for batch in batches:
            if batch > n:
                continue
            row = {"n": n, "batch": batch, "ratio": batch / n}
            for arm, arm_epochs in (("fixed_epochs", epochs), ("fixed_steps", max(1, round(steps * batch / n)))):
                kw = {"batch_size": batch, "epochs": arm_epochs, "data": data}
                sgd = best_loss("sgd", sgd_grid, **kw)
                kfac = best_loss("kfac", [{"lr": 0.2}], **kw)
                row[arm] = {"sgd": sgd, "kfac": kfac, "gain": sgd / kfac if kfac > 0 else math.inf}
            cells.append(row)
            print(
                f"[{name}] N {n:>5} batch {batch:>4} (ratio {batch / n:.3f}): gain fixed epochs "
                f"{row['fixed_epochs']['gain']:.2f}, fixed steps {row['fixed_steps']['gain']:.2f}",
                flush=True,
            )
    rho = {
        arm: spearman([c["ratio"] for c in cells], [math.log(c[arm]["gain"]) for c in cells])
        for arm in ("fixed_epochs", "fixed_steps")
    }
    claim = f"the gain of second order grows with batch / dataset size [{name}]"
    claim += " (quick smoke run)" if quick else ""
    line = verdict(
        claim,
        all(r > 0.3 for r in rho.values()),
        f"Spearman(gain, batch/N): fixed epochs {rho['fixed_epochs']:.2f}, fixed steps {rho['fixed_steps']:.2f}",
    )
    return {"sizes": sizes, "batches": batches, "cells": cells, "spearman": rho, "verdict": line}


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "2 x 2 grid, tiny budgets, a small MNIST-1D")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    add_dataset(parser)
    args = parser.parse_args(argv)
    quiet()
    print("Criterion" + CRITERION, flush=True)
    clock = Clock()
    epochs, steps = (2, 10) if args.quick else (args.epochs, args.steps)
    results = {}
    for name, full in load_datasets(args.dataset, args.quick).items():
        results[name] = run_dataset(name, full, args.quick, epochs, steps)
        res = results[name]
        plot(name, res["cells"], res["sizes"], res["batches"], result_path(f"batch_ratio_{name}", "png",
             args.quick, args.out))  # fmt: skip
    payload = {
        "claim": "Fig. 4",
        "quick": args.quick,
        "command": command("seed_batch_ratio.py", argv),
        "epochs": epochs,
        "steps": steps,
        "datasets": results,
        "verdict": [r["verdict"] for r in results.values()],
        "seconds": clock.seconds,
    }
    save("batch_ratio_quick" if args.quick else "batch_ratio", payload, args.out)
    return payload


def plot(name: str, cells: list[dict], sizes: list[int], batches: list[int], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, arm in zip(axes, ("fixed_epochs", "fixed_steps"), strict=True):
        grid = [[math.nan] * len(batches) for _ in sizes]
        for c in cells:
            grid[sizes.index(c["n"])][batches.index(c["batch"])] = math.log10(c[arm]["gain"])
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-2, vmax=2, origin="lower")
        ax.set_xticks(range(len(batches)), batches)
        ax.set_yticks(range(len(sizes)), sizes)
        ax.set_xlabel("batch size")
        ax.set_ylabel("training examples N")
        ax.set_title(f"{name}: log10(SGD loss / K-FAC loss), {arm.replace('_', ' ')}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:+.1f}", ha="center", va="center")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
