"""The ``lightning-soo`` command. Heavy imports happen inside the subcommands, so ``--help`` is instant."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def _demo(args: argparse.Namespace) -> None:
    from lightning_soo.app.demo import run

    run(args.out, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-soo", description="Second-order optimization for PyTorch Lightning: demos and tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="digits at a large batch: SGD vs SGD + K-FAC (table, TensorBoard logs, PNG)",
        description="Train a small MLP on scikit-learn's digits at a large batch with SGD and with K-FAC; print a "
        "table (final train loss, test accuracy, seconds), write TensorBoard logs and a PNG of the loss curves.",
    )
    demo.add_argument("--out", type=Path, default=Path("soo_demo"), help="output folder (default: ./soo_demo)")
    demo.add_argument("--epochs", type=int, default=10, help="training epochs per method (default: 10)")
    demo.add_argument("--batch-size", type=int, default=512, help="batch size (default: 512 of 1,438 examples)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--quick", action="store_true", help="a few epochs only (smoke test)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
