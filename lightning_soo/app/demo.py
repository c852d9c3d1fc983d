"""``lightning-soo demo``: digits at a large batch, SGD against SGD + K-FAC; a table, TensorBoard logs, a PNG.

The seed's first finding at CPU scale: with a batch that is a large fraction of the dataset, second-order
preconditioning reaches a lower loss in the same number of epochs.
"""

from __future__ import annotations

from pathlib import Path

from lightning_soo.app.data import digits, require
from lightning_soo.app.plots import loss_curves
from lightning_soo.app.train import RunResult, train

# The same SGD (lr 0.2, momentum 0.9: the best SGD learning rate of the grid 0.05-1.0 at this batch and budget),
# once plain and once with KFACCallback's defaults; K-FAC's result hardly depends on lr under its KL clip.
DEMO_RUNS: dict[str, float] = {"sgd": 0.2, "kfac": 0.2}  # method -> learning rate


def run(out: Path, epochs: int = 10, batch_size: int = 512, seed: int = 0, quick: bool = False) -> list[RunResult]:
    require("matplotlib")
    if quick:
        epochs = min(epochs, 3)
    out.mkdir(parents=True, exist_ok=True)
    data = digits()
    results = []
    for method, lr in DEMO_RUNS.items():
        print(f"training {method} ...", flush=True)
        log_dir = out / "tensorboard"
        results.append(
            train(method, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed, log_dir=log_dir, data=data)
        )
    print(table(results, len(data[0])))
    png = out / "loss_curves.png"
    loss_curves(results, png, title=f"digits, batch {batch_size} of {len(data[0])} training examples")
    print(f"TensorBoard logs (a new version folder per run): {out / 'tensorboard'}")
    print(f"  tensorboard --logdir {out / 'tensorboard'}   # the CUSTOM SCALARS tab has the second-order dashboard")
    print(f"  lightning-soo report {out / 'tensorboard'}   # the same as PNGs")
    print(f"loss curves: {png}")
    return results


def table(results: list[RunResult], n_train: int) -> str:
    lines = [
        f"{'method':<8} {'batch':>6} {'lr':>6} {'epochs':>6} {'final train loss':>17} {'test acc':>9} {'seconds':>8}",
        "-" * 66,
    ]
    for r in results:
        lines.append(
            f"{r.method:<8} {r.batch_size:>6} {r.lr:>6g} {r.epochs:>6} {r.final_train_loss:>17.4f} "
            f"{r.test_acc:>9.3f} {r.seconds:>8.1f}"
        )
    return "\n".join(lines)
