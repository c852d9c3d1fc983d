"""Seed Table 1 at CPU scale: curvature matters early, so it can be refreshed rarely or frozen afterwards.

K-FAC on digits (batch 128, 60 epochs, about 660 steps) with statistics every 10 steps and the preconditioner
refreshed every 10 steps during the first x% of training (the frequent phase), then every `interval` steps or never
(frozen: hooks removed). CurvatureScheduler does the scheduling. Metric: test accuracy (and final training loss).

Criterion (stated before running): with a frequent phase of at least 3% of training, every long interval (frozen
included) reaches a test accuracy within 1 point of refreshing every 10 steps throughout (x = 100%).

    python examples/seed_early_curvature.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from seed_common import Clock, base_parser, pyplot, quiet, result_path, save, verdict

from lightning_soo import CurvatureScheduler
from lightning_soo.app.data import digits
from lightning_soo.app.train import train


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "a 2 x 2 table, 6 epochs")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)
    quiet()
    clock = Clock()
    data = digits()
    fractions = [0.0, 0.3] if args.quick else [0.0, 0.01, 0.03, 0.1, 0.3, 1.0]
    intervals: list[int | None] = [None, 100] if args.quick else [None, 300, 100]
    epochs = 6 if args.quick else args.epochs
    table: dict[str, dict[str, dict]] = {}
    for interval in intervals:
        key = "frozen" if interval is None else f"every {interval}"
        table[key] = {}
        for fraction in fractions:
            scheduler = CurvatureScheduler(
                frequent_fraction=fraction,
                frequent_interval=10,
                interval=interval,
                statistics_interval=10,
                quality_every_n_steps=None,
            )
            r = train(
                "kfac",
                batch_size=128,
                epochs=epochs,
                lr=0.2,
                data=data,
                extra_callbacks=[scheduler],
                statistics_interval=10,
                preconditioner_interval=10,
            )
            table[key][f"{fraction:.0%}"] = {"test_acc": r.test_acc, "loss": r.final_train_loss}
            print(
                f"interval {key:<10} frequent {fraction:>5.0%}: test acc {r.test_acc:.3f} loss {r.final_train_loss:.4f}"
            )
    reference = max(row["100%"]["test_acc"] for row in table.values()) if "100%" in next(iter(table.values())) else None
    if reference is None:  # quick mode: compare with the best cell
        reference = max(c["test_acc"] for row in table.values() for c in row.values())
    early = [f"{f:.0%}" for f in fractions if f >= 0.03]
    gaps = {k: {f: round(reference - row[f]["test_acc"], 4) for f in early} for k, row in table.items()}
    held = all(gap <= 0.01 for row in gaps.values() for gap in row.values())
    detail = f"reference accuracy {reference:.3f}; accuracy gaps for frequent phase >= 3%: {gaps}"
    claim = "curvature refreshed only early (then rarely or frozen) is enough"
    claim += " (quick smoke run)" if args.quick else ""
    line = verdict(claim, held, detail)
    payload = {
        "claim": "Table 1",
        "quick": args.quick,
        "epochs": epochs,
        "table": table,
        "verdict": line,
        "seconds": clock.seconds,
    }
    save("early_curvature_quick" if args.quick else "early_curvature", payload, args.out)
    plot(table, fractions, result_path("early_curvature", "png", args.quick, args.out))
    return payload


def plot(table: dict, fractions: list[float], path: Path) -> None:
    plt = pyplot()
    cols = [f"{f:.0%}" for f in fractions]
    values = [[table[k][c]["test_acc"] for c in cols] for k in table]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.6 * len(table) + 1.5), dpi=110)
    im = ax.imshow(values, cmap="viridis", vmin=min(map(min, values)) - 0.01, vmax=max(map(max, values)))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(table)), list(table))
    ax.set_xlabel("frequent phase (refresh every 10 steps) as % of training")
    ax.set_ylabel("afterwards")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(
                j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < max(map(max, values)) - 0.02 else "k"
            )
    fig.colorbar(im, ax=ax, label="test accuracy")
    ax.set_title("K-FAC on digits: when must curvature be refreshed?")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
