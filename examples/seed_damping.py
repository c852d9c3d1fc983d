"""Seed Fig. 5 at CPU scale: the best damping grows with batch size and learning rate.

K-FAC (SGD + KFACCallback, KL clipping off so the learning rate acts directly) for 10 epochs on digits (batch 32,
256, 1,438) and MNIST-1D (batch 128, 1,000, 8,000), learning rates 0.01, 0.03, 0.1, 0.3. For every (learning rate,
batch size): a coarse pass (seed 0, dampings 1e-3 ... 1 at 2 per decade) finds the region of the optimum, then a fine
pass (6 per decade, half a decade either side of the coarse optimum: 7 values) runs 3 seeds. The best damping is the
argmin of the seed-mean final training loss; its spread is the range of the per-seed argmins. A best damping at the
edge of its fine window is flagged.

Criterion (stated before running), per dataset: the Spearman rank correlations of the best damping with the learning
rate and with the batch size are both > 0.3.

    OMP_NUM_THREADS=1 python examples/seed_damping.py [--quick] [--dataset digits|mnist1d|both]
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

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

LRS = [0.01, 0.03, 0.1, 0.3]
BATCHES = {"digits": [32, 256, 1438], "mnist1d": [128, 1000, 8000]}
COARSE = [10 ** (k / 2) for k in range(-6, 1)]  # 1e-3 ... 1, 2 per decade
SEEDS = [0, 1, 2]
CRITERION = __doc__.split("Criterion")[1].split("\n\n")[0]


def loss(data: tuple, batch: int, lr: float, damping: float, epochs: int, seed: int) -> float:
    r = train("kfac", batch_size=batch, epochs=epochs, lr=lr, data=data, damping=damping, kl_clip=None, seed=seed)
    return r.final_train_loss if math.isfinite(r.final_train_loss) else math.inf


def cell(data: tuple, batch: int, lr: float, epochs: int, quick: bool) -> dict:
    """Coarse pass, then the fine window over seeds: the best damping and its spread for one (lr, batch)."""
    coarse_grid = [1e-2, 1e-1] if quick else COARSE
    coarse = {d: loss(data, batch, lr, d, epochs, 0) for d in coarse_grid}
    center = min(coarse, key=coarse.get)
    fine = [center * 10 ** (k / 6) for k in ((-1, 0, 1) if quick else range(-3, 4))]
    seeds = SEEDS[:2] if quick else SEEDS
    losses = {d: [loss(data, batch, lr, d, epochs, s) for s in seeds] for d in fine}
    mean = {d: statistics.fmean(v) if all(map(math.isfinite, v)) else math.inf for d, v in losses.items()}
    best = min(mean, key=mean.get)
    per_seed = [min(fine, key=lambda d, i=i: losses[d][i]) for i in range(len(seeds))]
    return {
        "lr": lr,
        "batch": batch,
        "coarse": coarse,
        "fine": {f"{d:.4g}": v for d, v in losses.items()},
        "best_damping": best,
        "loss": mean[best],
        "per_seed_best": per_seed,
        "spread": [min(per_seed), max(per_seed)],
        "at_window_edge": best in (fine[0], fine[-1]),
    }


def run_dataset(name: str, data: tuple, quick: bool, epochs: int) -> dict:
    lrs = [0.02, 0.2] if quick else LRS
    batches = [64, len(data[0])] if quick else BATCHES[name]
    best = []
    for lr in lrs:
        for batch in batches:
            c = cell(data, batch, lr, epochs, quick)
            best.append(c)
            print(f"[{name}] lr {lr:<5} batch {batch:>5}: best damping {c['best_damping']:.3g} (seed-mean loss "
                  f"{c['loss']:.4g}), per-seed best {c['spread'][0]:.3g}-{c['spread'][1]:.3g}"
                  + (" [edge of window]" if c["at_window_edge"] else ""), flush=True)  # fmt: skip
    rho_lr = spearman([b["lr"] for b in best], [b["best_damping"] for b in best])
    rho_batch = spearman([b["batch"] for b in best], [b["best_damping"] for b in best])
    line = verdict(
        f"the best damping grows with learning rate and batch size [{name}]" + (" (quick smoke run)" if quick else ""),
        rho_lr > 0.3 and rho_batch > 0.3,
        f"rank correlation with lr {rho_lr:.2f}, with batch size {rho_batch:.2f} (both > 0.3 needed); "
        f"{sum(b['spread'][0] != b['spread'][1] for b in best)} of {len(best)} cells' per-seed optima disagree",
    )
    return {"epochs": epochs, "n_train": len(data[0]), "lrs": lrs, "batches": batches, "best": best,
            "spearman_lr": rho_lr, "spearman_batch": rho_batch, "verdict": line}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "a 2 x 2 grid, 2 coarse + 3 fine dampings, 2 seeds, 2 epochs, a small MNIST-1D")
    parser.add_argument("--epochs", type=int, default=10)
    add_dataset(parser)
    args = parser.parse_args(argv)
    quiet()
    print("Criterion" + CRITERION, flush=True)
    clock = Clock()
    epochs = 2 if args.quick else args.epochs
    results = {}
    for name, data in load_datasets(args.dataset, args.quick).items():
        results[name] = run_dataset(name, data, args.quick, epochs)
        plot(name, results[name], result_path(f"damping_{name}", "png", args.quick, args.out))
    payload = {
        "claim": "Fig. 5",
        "quick": args.quick,
        "command": command("seed_damping.py", argv),
        "datasets": results,
        "verdict": [r["verdict"] for r in results.values()],
        "seconds": clock.seconds,
    }
    save("damping_quick" if args.quick else "damping", payload, args.out)
    return payload


def plot(name: str, res: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for k, lr in enumerate(res["lrs"]):
        rows = [r for r in res["best"] if r["lr"] == lr]
        x = [r["batch"] * 1.04**k for r in rows]  # a small offset per lr keeps the error bars apart
        y = [r["best_damping"] for r in rows]
        err = [[v - r["spread"][0] for v, r in zip(y, rows, strict=True)],
               [r["spread"][1] - v for v, r in zip(y, rows, strict=True)]]  # fmt: skip
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"lr {lr:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("best damping (seed mean; bars: per-seed range)")
    ax.set_title(f"K-FAC on {name}: best damping vs batch size and learning rate")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
