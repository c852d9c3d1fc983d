"""The ``lightning-soo`` command. Heavy imports happen inside the subcommands: ``--help``, ``--version`` and
``config`` import neither torch nor Lightning."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from lightning_soo import __version__

CONFIGS = ("kfac", "shampoo", "gauss_newton", "psgd", "curvature")


def _positive(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def config_text(name: str) -> str:
    """The packaged LightningCLI config ``name`` (one of ``CONFIGS``) as text."""
    return (resources.files("lightning_soo") / "configs" / f"{name}.yaml").read_text(encoding="utf-8")


def _config(args: argparse.Namespace) -> None:
    if args.list or args.name is None:
        for name in CONFIGS:
            summary = config_text(name).splitlines()[0].lstrip("# ").split(". ")[0]
            print(f"{name:<13} {summary}")
        if not args.list:
            print("\nprint one with: lightning-soo config NAME > NAME.yaml", file=sys.stderr)
        return
    sys.stdout.write(config_text(args.name))


def _demo(args: argparse.Namespace) -> None:
    from lightning_soo.app.demo import run

    run(args.out, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, quick=args.quick)


def _compare(args: argparse.Namespace) -> None:
    from lightning_soo.app.compare import run

    run(args.methods, args.batch_sizes, args.epochs, args.out, seed=args.seed, quick=args.quick, dataset=args.dataset)


def _report(args: argparse.Namespace) -> None:
    if not args.logdir.is_dir():
        raise SystemExit(f"lightning-soo report: {args.logdir} does not exist or is not a folder")
    from lightning_soo.app.report import report

    if not report(args.logdir, args.out):
        raise SystemExit(1)


def _advise(args: argparse.Namespace) -> None:
    if not args.script.is_file():
        raise SystemExit(f"lightning-soo advise: script {args.script} does not exist")
    missing = [str(c) for c in args.config if not c.is_file()]
    if missing:
        raise SystemExit(f"lightning-soo advise: --config file(s) not found: {', '.join(missing)}")
    from lightning_soo.app.advise.arms import parse_methods

    try:
        methods = parse_methods(args.methods)
    except ValueError as err:
        raise SystemExit(f"lightning-soo advise: {err}") from None
    from lightning_soo.app.advise import advise_script

    try:
        advise_script(args, methods)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-soo", description="Second-order optimization for PyTorch Lightning: demos and tools."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="digits at a large batch: SGD vs SGD + K-FAC (table, TensorBoard logs, PNG)",
        description="Train a small MLP on scikit-learn's digits at a large batch with SGD and with K-FAC; print a "
        "table (final train loss, test accuracy, seconds), write TensorBoard logs and a PNG of the loss curves.",
    )
    demo.add_argument("--out", type=Path, default=Path("soo_demo"), help="output folder (default: ./soo_demo)")
    demo.add_argument("--epochs", type=_positive, default=10, help="training epochs per method (default: 10)")
    demo.add_argument("--batch-size", type=_positive, default=512, help="batch size (default: 512 of 1,438 examples)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--quick", action="store_true", help="a few epochs only (smoke test)")
    demo.set_defaults(func=_demo)

    compare = sub.add_parser(
        "compare",
        help="methods x batch sizes on the bundled digits: a table (with wall-clock to SGD's best) and a PNG",
        description="Train the digits MLP with each method at each batch size for a fixed number of epochs; print a "
        "table (final train loss, test accuracy, seconds, and the training seconds and steps to the best test "
        "accuracy plain SGD reached at that batch size, evaluation excluded) and write compare.png and compare.json.",
    )
    methods = ["sgd", "adamw", "kfac", "shampoo", "gauss_newton", "psgd"]
    compare.add_argument(
        "--methods",
        nargs="+",
        default=methods,
        choices=methods,
        metavar="METHOD",
        help=f"any of {', '.join(methods)} (default: all)",
    )
    compare.add_argument(
        "--batch-sizes", type=_positive, nargs="+", default=[32, 128, 512, 1438], help="default: 32 128 512 1438"
    )
    compare.add_argument("--epochs", type=_positive, default=10, help="epochs per run (default: 10)")
    compare.add_argument("--out", type=Path, default=Path("soo_compare"), help="output folder (default: ./soo_compare)")
    compare.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    compare.add_argument(
        "--dataset",
        choices=["digits", "mnist1d"],
        default="digits",
        help="digits (bundled, default) or MNIST-1D (generated locally; needs the examples extra)",
    )
    compare.add_argument(
        "--quick",
        action="store_true",
        help="the first two batch sizes, two epochs of 256 examples, a narrower MLP (smoke test: seconds)",
    )
    compare.set_defaults(func=_compare)

    report = sub.add_parser(
        "report",
        help="PNG plots from the TensorBoard logs of a run (quality, damping, refresh timeline)",
        description="Read the lightning-soo scalars from every run under LOGDIR and write one PNG per run: quality "
        "index and criterion per layer, damping with the refresh count and the freeze, time per step.",
    )
    report.add_argument("logdir", type=Path, help="a TensorBoard log folder (searched recursively)")
    report.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: LOGDIR)")
    report.set_defaults(func=_report)

    advise = sub.add_parser(
        "advise",
        help="will second order speed up YOUR run? probe a LightningCLI script with and without each method",
        description="Run your LightningCLI script (`python SCRIPT fit --config ...`) for a short budget with your "
        "optimizer and with each method (a few dampings each), from the same initial weights and the same batches; "
        "print the cost per step, the steps and seconds each needs to reach your optimizer's final loss, the best "
        "damping, when the curvature can be frozen and a verdict; write advise.json, advise.png and advise.yaml "
        "(a config for the recommended setting). Arguments after `--` go to your script.",
    )
    advise.add_argument("script", type=Path, help="your LightningCLI script (run with its `fit` subcommand)")
    advise.add_argument(
        "--config", type=Path, action="append", default=[], help="your config file(s), in order (repeatable)"
    )
    advise.add_argument(
        "--methods",
        default="kfac,shampoo",
        help="comma-separated: kfac, shampoo, gauss_newton, psgd (default: kfac,shampoo)",
    )
    advise.add_argument("--steps", type=_positive, default=200, help="optimizer steps per arm (default: 200)")
    advise.add_argument(
        "--damping-grid", type=_positive, default=3, help="dampings tried per method (default: 3; psgd has none)"
    )
    advise.add_argument("--seed", type=int, default=0, help="seed of every arm (default: 0)")
    advise.add_argument("--out", type=Path, default=Path("soo_advise"), help="output folder (default: ./soo_advise)")
    advise.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="seconds by wall-clock (default) or by the process's CPU time (a CPU shared with other jobs; run "
        "single-threaded, OMP_NUM_THREADS=1)",
    )
    advise.add_argument(
        "--keep-validation", action="store_true", help="run your validation too (default: off during the probe)"
    )
    advise.set_defaults(func=_advise)

    config = sub.add_parser(
        "config",
        help="print a LightningCLI config shipped with the package (kfac, shampoo, gauss_newton, psgd, curvature)",
        description="Print one of the packaged LightningCLI configs, e.g. `lightning-soo config kfac > kfac.yaml`, "
        "then `python train.py fit --config my.yaml --config kfac.yaml`. `curvature` schedules a preconditioner "
        "callback: use it together with one of the others.",
    )
    config.add_argument("name", nargs="?", choices=CONFIGS, metavar="NAME", help=f"one of {', '.join(CONFIGS)}")
    config.add_argument("--list", action="store_true", help="list the configs")
    config.set_defaults(func=_config)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv.index("--") if "--" in argv else len(argv)  # `advise ... -- ARGS`: ARGS go to the user's script
    args = build_parser().parse_args(argv[:rest])
    args.script_args = argv[rest + 1 :]
    args.func(args)


if __name__ == "__main__":
    main()
