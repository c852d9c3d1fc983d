"""Seed Fig. 5 at CPU scale: the best damping grows with batch size and learning rate.

K-FAC (SGD + KFACCallback, KL clipping off so the learning rate acts directly) on digits for a fixed number of
epochs over a grid of learning rates x batch sizes x dampings. For every (learning rate, batch size) the damping with
the lowest final training loss is the best one; Spearman rank correlations of the best damping with the learning
rate and with the batch size are printed.

Criterion (stated before running): both rank correlations are positive (> 0.3).

    python examples/seed_damping.py [--quick]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from seed_common import Clock, base_parser, pyplot, quiet, result_path, save, spearman, verdict

from lightning_soo.app.data import digits
from lightning_soo.app.train import train


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "a 2 x 2 x 2 grid, 2 epochs")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    quiet()
    clock = Clock()
    data = digits()
    lrs = [0.02, 0.2] if args.quick else [0.01, 0.03, 0.1, 0.3]
    batches = [64, 512] if args.quick else [32, 128, 512, 1438]
    dampings = [1e-2, 1e-1] if args.quick else [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    epochs = 2 if args.quick else args.epochs
    grid: list[dict] = []
    best: list[dict] = []
    for lr in lrs:
        for batch in batches:
            losses = {}
            for damping in dampings:
                r = train("kfac", batch_size=batch, epochs=epochs, lr=lr, data=data, damping=damping, kl_clip=None)
                loss = r.final_train_loss if math.isfinite(r.final_train_loss) else math.inf
                losses[damping] = loss
                grid.append({"lr": lr, "batch": batch, "damping": damping, "loss": loss, "test_acc": r.test_acc})
            d_best = min(losses, key=losses.get)
            best.append({"lr": lr, "batch": batch, "best_damping": d_best, "loss": losses[d_best]})
            print(f"lr {lr:<5} batch {batch:>5}: best damping {d_best:g} (loss {losses[d_best]:.4f})", flush=True)
    rho_lr = spearman([b["lr"] for b in best], [b["best_damping"] for b in best])
    rho_batch = spearman([b["batch"] for b in best], [b["best_damping"] for b in best])
    print(f"Spearman rank correlation: best damping vs learning rate {rho_lr:.2f}, vs batch size {rho_batch:.2f}")
    held = rho_lr > 0.3 and rho_batch > 0.3
    claim = "the best damping grows with learning rate and batch size"
    claim += " (quick smoke run)" if args.quick else ""
    line = verdict(claim, held, f"rank correlation with lr {rho_lr:.2f}, with batch size {rho_batch:.2f}")
    payload = {
        "claim": "Fig. 5",
        "quick": args.quick,
        "epochs": epochs,
        "grid": grid,
        "best": best,
        "spearman_lr": rho_lr,
        "spearman_batch": rho_batch,
        "verdict": line,
        "seconds": clock.seconds,
    }
    save("damping_quick" if args.quick else "damping", payload, args.out)
    plot(best, lrs, batches, result_path("damping", "png", args.quick, args.out))
    return payload


def plot(best: list[dict], lrs: list[float], batches: list[int], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for lr in lrs:
        rows = [b for b in best if b["lr"] == lr]
        ax.plot([r["batch"] for r in rows], [r["best_damping"] for r in rows], marker="o", label=f"lr {lr:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("best damping")
    ax.set_title("K-FAC on digits: best damping vs batch size and learning rate")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
