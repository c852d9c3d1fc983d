"""``advise``: will second-order optimization speed up *this* run? A short probe of the user's own training, with
and without each method, from the same initial weights and the same batches, and a verdict measured from it.

``lightning-soo advise train.py --config my.yaml`` does it for a LightningCLI project (``runner.cli_runner``);
``advise(model, datamodule, trainer_kwargs)`` for any LightningModule (``runner.module_runner``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Union

from lightning_soo import checks
from lightning_soo.app.advise.arms import parse_methods

__all__ = ["advise", "advise_script"]


def advise(
    model: Any,
    datamodule: Any,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    *,
    methods: Union[str, list[str]] = "kfac,shampoo",
    steps: int = 200,
    damping_grid: int = 3,
    seed: int = 0,
    out: Union[str, Path] = "soo_advise",
    clock: str = "wall",
) -> dict[str, Any]:
    """Probe ``model`` for ``steps`` optimizer steps with its own optimizer and with each method, then report.

    Every arm fits a copy of ``model`` taken before any training (same initial weights), with the global RNGs
    seeded with ``seed`` when training starts (same data order and dropout); the probe records loss, step time and
    a checksum of every batch. Writes ``advise.json``, ``advise.png`` and ``advise.yaml`` (a LightningCLI config of
    the recommended setting) under ``out`` and logs the report.

    Args:
        model: a LightningModule whose ``configure_optimizers`` is your baseline.
        datamodule: a LightningDataModule, or a training DataLoader.
        trainer_kwargs: ``lightning.Trainer`` arguments of your run (its length sets the freeze recommendation;
            the probe adds its callbacks to yours and turns off logging, checkpointing and validation unless set).
        methods: any of ``kfac``, ``shampoo``, ``gauss_newton``, ``psgd`` (a list or comma-separated).
        steps: optimizer steps per arm.
        damping_grid: dampings tried per method (1: the centre of the grid only).
        seed: seeds the global RNGs at the start of every arm's training.
        out: output folder.
        clock: ``"wall"`` (wall-clock seconds) or ``"cpu"`` (the process's CPU time: step costs on a CPU shared
            with other work, single-threaded runs only).

    Returns:
        The summary written to ``advise.json``: per arm its seconds per step, steps and seconds to the baseline's
        final loss and their ratios, the best damping and freeze point per method, the decision and the report.

    Raises:
        ValueError: for a bad argument (the message names it and what is accepted).
    """
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_soo.app.advise.runner import module_runner, probe

    if not isinstance(model, L.LightningModule):
        raise ValueError(f"`model` must be a LightningModule, got {type(model).__name__}")
    if datamodule is None:
        raise ValueError("`datamodule` must be a LightningDataModule or a training DataLoader, got None")
    if trainer_kwargs is not None and not isinstance(trainer_kwargs, dict):
        raise ValueError(
            f"`trainer_kwargs` must be a dict of lightning.Trainer arguments, got {type(trainer_kwargs).__name__}"
        )
    names = parse_methods(methods if isinstance(methods, str) else ",".join(methods))
    checks.check_int("steps", steps)
    checks.check_int("damping_grid", damping_grid)
    checks.check_int("seed", seed, 0)
    checks.check_choice("clock", clock, ("wall", "cpu"))
    runner = module_runner(model, datamodule, dict(trainer_kwargs or {}), Path(out) / "arms")
    return probe(runner, names, steps, damping_grid, seed, Path(out), rank_zero_info, clock)


def advise_script(args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """``lightning-soo advise``: the probe over the user's LightningCLI script, one subprocess per arm."""
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_soo.app.advise.runner import cli_runner, probe

    out = Path(args.out).resolve()
    configs = [Path(c).resolve() for c in args.config]
    runner = cli_runner(Path(args.script).resolve(), configs, out / "arms", args.script_args, args.keep_validation)
    return probe(runner, methods, args.steps, args.damping_grid, args.seed, out, rank_zero_info, args.clock)
