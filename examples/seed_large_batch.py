"""Seed Fig. 1 at CPU scale: second-order optimization wins at large batch.

Digits (1,438 training examples), an MLP, a fixed number of epochs, a sweep of batch sizes. SGD (momentum 0.9) and
AdamW with their learning rates tuned per batch size on a small grid; K-FAC as SGD + KFACCallback with its damping
tuned on a grid (its step size is set by the KL clip, so its learning rate hardly matters). Metric: the final
training loss (mean over the last epoch) of the best setting of each method.

Criterion (stated before running): at batch ≥ a quarter of the dataset K-FAC's loss is below 0.7x the best
first-order loss; at the smallest batch the methods are within a factor 3 of each other ("about equal").

    python examples/seed_large_batch.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from seed_common import Clock, base_parser, pyplot, quiet, result_path, save, verdict

from lightning_soo.app.data import digits
from lightning_soo.app.train import train

GRIDS = {
    "sgd": [{"lr": lr} for lr in (0.05, 0.1, 0.2, 0.5)],
    "adamw": [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2)],
    "kfac": [{"lr": 0.2, "damping": d} for d in (1e-3, 1e-2, 1e-1)],
}
QUICK_GRIDS = {"sgd": [{"lr": 0.2}], "adamw": [{"lr": 3e-3}], "kfac": [{"lr": 0.2, "damping": 1e-2}]}


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "two batch sizes, one setting each, 3 epochs")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    quiet()
    clock = Clock()
    data = digits()
    n = len(data[0])
    batches = [64, n] if args.quick else [32, 128, 360, 720, n]
    grids = QUICK_GRIDS if args.quick else GRIDS
    epochs = 3 if args.quick else args.epochs
    best: dict[str, dict[int, dict]] = {m: {} for m in grids}
    for batch in batches:
        for method, grid in grids.items():
            for options in grid:
                r = train(method, batch_size=batch, epochs=epochs, data=data, **options)
                row = {"loss": r.final_train_loss, "test_acc": r.test_acc, "options": options, "seconds": r.seconds}
                if batch not in best[method] or row["loss"] < best[method][batch]["loss"]:
                    best[method][batch] = row
            print(
                f"batch {batch:>5} {method:<6} best loss {best[method][batch]['loss']:.4f} "
                f"acc {best[method][batch]['test_acc']:.3f} {best[method][batch]['options']}",
                flush=True,
            )
    large = [b for b in batches if b >= n / 4]
    ratios = {b: best["kfac"][b]["loss"] / min(best["sgd"][b]["loss"], best["adamw"][b]["loss"]) for b in batches}
    small = min(batches)
    held = all(ratios[b] < 0.7 for b in large) and 1 / 3 <= ratios[small] <= 3
    detail = ", ".join(f"batch {b}: K-FAC/first-order loss {ratios[b]:.2f}" for b in batches)
    claim = "second order wins at large batch, about equal at small batch"
    claim += " (quick smoke run)" if args.quick else ""
    line = verdict(claim, held, detail)
    payload = {
        "claim": "Fig. 1",
        "quick": args.quick,
        "epochs": epochs,
        "n_train": n,
        "best": best,
        "ratios": ratios,
        "verdict": line,
        "seconds": clock.seconds,
    }
    save("large_batch_quick" if args.quick else "large_batch", payload, args.out)
    plot(best, batches, n, result_path("large_batch", "png", args.quick, args.out))
    return payload


def plot(best: dict, batches: list[int], n: int, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method, rows in best.items():
        ax.plot(batches, [rows[b]["loss"] for b in batches], marker="o", label=method)
    ax.axvline(n / 4, color="gray", ls=":", label="batch = dataset / 4")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("final training loss (best setting)")
    ax.set_title(f"digits, fixed epochs, {n} training examples")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
