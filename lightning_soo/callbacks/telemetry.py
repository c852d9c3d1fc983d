"""Sending the library's scalars to the trainer's loggers, the TensorBoard layout, and the progress-bar state."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_soo.diagnostics.metrics import PREFIX, layout


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's own logging uses (as LearningRateMonitor does)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Through every logger, on rank 0, at Lightning's logging step (raw writes would not be aligned)."""
    if not metrics or not trainer.is_global_zero:
        return
    step = logger_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_histograms(trainer: pl.Trainer, tensors: dict[str, torch.Tensor]) -> None:
    """Histograms go to TensorBoard loggers only (other loggers have no such notion)."""
    if not tensors or not trainer.is_global_zero:
        return
    step = logger_step(trainer)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for tag, values in tensors.items():
                logger.experiment.add_histogram(tag, values, global_step=step)


def add_layout(trainer: pl.Trainer) -> None:
    """Write the "second-order" custom-scalars layout once per TensorBoard logger, and the method's name as text
    (``soo/method``: ``lightning-soo report`` titles its plots with it)."""
    if not trainer.is_global_zero:
        return
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    methods = sorted({m for cb in callbacks if isinstance(m := getattr(type(cb), "method", None), str)})
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and not getattr(logger, "_soo_layout_written", False):
            logger.experiment.add_custom_scalars(layout())
            if methods:
                logger.experiment.add_text(f"{PREFIX}/method", ", ".join(methods))
            logger._soo_layout_written = True  # type: ignore[attr-defined]


def log_progress(pl_module: pl.LightningModule, frozen: bool) -> None:
    """The curvature's state in the progress bar (``soo_frozen`` 0 or 1), not sent to the loggers."""
    pl_module.log("soo_frozen", float(frozen), prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
