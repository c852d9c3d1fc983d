"""The TensorBoard dashboard: K-FAC with the CurvatureScheduler on digits, then a PNG made from the logs.

    python examples/dashboard.py [--out soo_dashboard] [--quick]
    tensorboard --logdir soo_dashboard        # the "second-order" tab of CUSTOM SCALARS

The scheduler refreshes the curvature every 2 steps for the first 30% of training, then freezes it (seed Table 1),
and measures the curvature quality every 3 steps (seed Fig. 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_soo import CurvatureScheduler, KFACCallback
from lightning_soo.app.data import digits
from lightning_soo.app.report import report
from lightning_soo.app.train import DigitsMLP


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("soo_dashboard"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="4 epochs")
    args = parser.parse_args(argv)
    L.seed_everything(0)
    train_set, _ = digits()
    trainer = L.Trainer(
        max_epochs=4 if args.quick else args.epochs,
        callbacks=[
            KFACCallback(preconditioner_interval=2),
            CurvatureScheduler(frequent_fraction=0.3, frequent_interval=2, interval=None, quality_every_n_steps=3),
        ],
        logger=TensorBoardLogger(str(args.out), name="kfac"),  # kfac/version_N: a new folder per run
        log_every_n_steps=1,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsMLP(lr=0.2), DataLoader(train_set, batch_size=256, shuffle=True))
    return report(args.out, args.out)


if __name__ == "__main__":
    main()
