"""Seed Fig. 4 at CPU scale: the ratio of batch size to dataset size decides how much second order helps.

Digits subsets of N = 180 ... 1,438 training examples, batch sizes 32 ... 512, SGD (momentum 0.9, lr best of a
2-point grid) against SGD + KFACCallback (defaults). Gain = SGD's final training loss / K-FAC's. Two arms:
fixed epochs (the usual comparison, where a larger ratio also means fewer steps) and fixed steps (the same number
of optimizer steps everywhere), which separates the ratio from the number of steps.

Criterion (stated before running): in both arms the gain's Spearman rank correlation with batch / N is > 0.3.

    python examples/seed_batch_ratio.py [--quick]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from seed_common import Clock, base_parser, pyplot, quiet, result_path, save, spearman, verdict

from lightning_soo.app.data import digits
from lightning_soo.app.train import train


def subset(data: tuple[TensorDataset, TensorDataset], n: int) -> tuple[TensorDataset, TensorDataset]:
    x, y = data[0].tensors
    return TensorDataset(x[:n], y[:n]), data[1]


def best_loss(method: str, grid: list[dict], **kwargs: object) -> float:
    losses = [train(method, **kwargs, **options).final_train_loss for options in grid]  # type: ignore[arg-type]
    finite = [v for v in losses if math.isfinite(v)]
    return min(finite) if finite else math.inf


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "2 x 2 grid, tiny budgets")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    quiet()
    clock = Clock()
    full = digits()
    sizes = [360, 1438] if args.quick else [180, 360, 720, 1438]
    batches = [32, 256] if args.quick else [32, 128, 512]
    epochs, steps = (2, 10) if args.quick else (args.epochs, args.steps)
    sgd_grid = [{"lr": 0.2}] if args.quick else [{"lr": 0.1}, {"lr": 0.3}]
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
                f"N {n:>5} batch {batch:>4} (ratio {batch / n:.3f}): gain fixed epochs "
                f"{row['fixed_epochs']['gain']:.2f}, fixed steps {row['fixed_steps']['gain']:.2f}",
                flush=True,
            )
    rho = {
        arm: spearman([c["ratio"] for c in cells], [math.log(c[arm]["gain"]) for c in cells])
        for arm in ("fixed_epochs", "fixed_steps")
    }
    held = all(r > 0.3 for r in rho.values())
    claim = "the gain of second order grows with batch / dataset size"
    claim += " (quick smoke run)" if args.quick else ""
    line = verdict(
        claim,
        held,
        f"Spearman(gain, batch/N): fixed epochs {rho['fixed_epochs']:.2f}, fixed steps {rho['fixed_steps']:.2f}",
    )
    payload = {
        "claim": "Fig. 4",
        "quick": args.quick,
        "cells": cells,
        "spearman": rho,
        "verdict": line,
        "seconds": clock.seconds,
    }
    save("batch_ratio_quick" if args.quick else "batch_ratio", payload, args.out)
    plot(cells, sizes, batches, result_path("batch_ratio", "png", args.quick, args.out))
    return payload


def plot(cells: list[dict], sizes: list[int], batches: list[int], path: Path) -> None:
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
        ax.set_title(f"log10(SGD loss / K-FAC loss), {arm.replace('_', ' ')}")
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
