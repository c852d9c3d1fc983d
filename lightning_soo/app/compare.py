"""``lightning-soo compare``: methods x batch sizes on the bundled digits (or a generated MNIST-1D); a table with
each run's wall-clock to plain SGD's best test accuracy, and a PNG."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torch.utils.data import TensorDataset

from lightning_soo.app.data import DATASETS, require
from lightning_soo.app.timing import best_accuracy, time_to_target
from lightning_soo.app.train import RunResult, train, warm_up

# --quick: a smoke run in seconds (two epochs of 256 examples, a narrower MLP, the first two batch sizes)
QUICK_EXAMPLES, QUICK_EPOCHS, QUICK_HIDDEN = 256, 2, 32

# per-method learning rates (the plain optimizers') on this bundled problem
DEFAULT_LR = {"sgd": 0.2, "adamw": 3e-3, "kfac": 0.2, "shampoo": 0.2, "gauss_newton": 0.2, "psgd": 0.2}


def sgd_targets(results: list[RunResult]) -> dict[int, dict]:
    """Per batch size: the best test accuracy plain SGD reached (evaluated along its run) and, for every run at that
    batch size, the first (steps, training seconds) reaching it, or None (never). Empty without an SGD run."""
    out: dict[int, dict] = {}
    for sgd in (r for r in results if r.method == "sgd"):
        target = best_accuracy(sgd.trajectory)
        hits = {r.method: time_to_target(r.trajectory, target) for r in results if r.batch_size == sgd.batch_size}
        out[sgd.batch_size] = {"target": target, "hits": hits}
    return out


def run(
    methods: list[str],
    batch_sizes: list[int],
    epochs: int,
    out: Path,
    seed: int = 0,
    quick: bool = False,
    dataset: str = "digits",
) -> list[RunResult]:
    require("matplotlib")
    out.mkdir(parents=True, exist_ok=True)
    if not methods or not batch_sizes or epochs < 1 or min(batch_sizes) < 1:
        raise ValueError(f"need methods, batch sizes >= 1 and epochs >= 1; got {methods}, {batch_sizes}, {epochs}")
    data = DATASETS[dataset]()
    hidden = 128
    if quick:
        epochs, batch_sizes, hidden = min(epochs, QUICK_EPOCHS), batch_sizes[:2], QUICK_HIDDEN
        data = (TensorDataset(*data[0][:QUICK_EXAMPLES]), data[1])
    warm_up(methods, data, hidden=hidden)
    results = []
    total = len(methods) * len(batch_sizes)
    for i, (batch, method) in enumerate(((b, m) for b in batch_sizes for m in methods), start=1):
        print(f"[{i}/{total}] {method} at batch {batch} ...", flush=True)
        results.append(
            train(
                method,
                batch_size=batch,
                epochs=epochs,
                lr=DEFAULT_LR.get(method, 0.1),
                seed=seed,
                data=data,
                hidden=hidden,
                track_accuracy=True,
                eval_every_n_steps=max(1, -(-len(data[0]) // batch) // 5),
            )
        )
    targets = sgd_targets(results)
    print(table(results, targets))
    png = out / "compare.png"
    plot(results, methods, batch_sizes, png, len(data[0]), epochs, dataset)
    rows = []
    for r in results:
        hit = targets.get(r.batch_size, {}).get("hits", {}).get(r.method)
        target = targets.get(r.batch_size, {}).get("target")
        rows.append({**asdict(r), "dataset": dataset, "sgd_best_acc": target, "to_sgd_best": hit and asdict(hit)})
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    print(f"table and curves: {out / 'compare.json'}, {png}")
    return results


def table(results: list[RunResult], targets: dict[int, dict] | None = None) -> str:
    """The printed table; ``to SGD's best`` is the training time (evaluation excluded) and steps to the best test
    accuracy plain SGD reached at the same batch size ("never"; "-" without an SGD run)."""
    targets = targets or {}
    head = f"{'method':<13} {'batch':>6} {'lr':>7} {'final train loss':>17} {'test acc':>9} {'seconds':>8}"
    lines = [f"{head} {'to SGD best (acc: s / steps)':>30}", "-" * 95]
    for r in results:
        t = targets.get(r.batch_size)
        hit = t["hits"].get(r.method) if t else None
        wall = "-" if t is None else f"{t['target']:.3f}: " + (f"{hit.seconds:.2f} s / {hit.steps}" if hit else "never")
        lines.append(
            f"{r.method:<13} {r.batch_size:>6} {r.lr:>7g} {r.final_train_loss:>17.4f} "
            f"{r.test_acc:>9.3f} {r.seconds:>8.2f} {wall:>30}"
        )
    return "\n".join(lines)


def plot(
    results: list[RunResult], methods: list[str], batches: list[int], path: Path, n: int, epochs: int, dataset: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for method in methods:
        rows = [r for r in results if r.method == method]
        axes[0].plot([r.batch_size for r in rows], [r.final_train_loss for r in rows], marker="o", label=method)
        axes[1].plot([r.batch_size for r in rows], [r.test_acc for r in rows], marker="o", label=method)
    for ax, label in zip(axes, ("final training loss", "test accuracy"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(f"{dataset} ({n} training examples), {epochs} epochs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
