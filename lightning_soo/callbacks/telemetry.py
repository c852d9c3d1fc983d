"""Sending the library's scalars to the trainer's loggers, the TensorBoard layout, and the progress-bar state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_soo.dashboard import layout


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
    """Write the "second-order" custom-scalars layout once per TensorBoard logger."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and not getattr(logger, "_soo_layout_written", False):
            logger.experiment.add_custom_scalars(layout())
            logger._soo_layout_written = True  # type: ignore[attr-defined]


class ProgressBarState:
    """Adds the method's state ("refreshing" / "frozen") to the progress bar's metrics without logging it."""

    def __init__(self, key: str, state: Callable[[], str | None]) -> None:
        self.key, self.state = key, state
        self._bar: Any = None
        self._original: Any = None

    def attach(self, trainer: pl.Trainer) -> None:
        bar = trainer.progress_bar_callback
        if bar is None or self._bar is not None:
            return
        original = bar.get_metrics

        def get_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            metrics = original(trainer, pl_module)
            value = self.state()
            if value is not None:
                metrics[self.key] = value
            return metrics

        bar.get_metrics = get_metrics
        self._bar, self._original = bar, original

    def detach(self) -> None:
        if self._bar is not None:
            self._bar.get_metrics = self._original
            self._bar = self._original = None
