"""A side-effect-free loss closure over the batch just trained on, for the curvature-quality diagnostic."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch


@contextmanager
def _silenced(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside: the diagnostic must not change the user's metrics."""
    saved = pl_module.__dict__.get("log"), pl_module.__dict__.get("log_dict")
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in zip(("log", "log_dict"), saved, strict=True):
            if value is None:
                del pl_module.__dict__[name]
            else:
                pl_module.__dict__[name] = value


def training_loss_fn(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
) -> Callable[[], torch.Tensor]:
    """``loss_fn()`` re-runs the user's ``training_step`` on ``batch`` with logging silenced."""

    def loss_fn() -> torch.Tensor:
        with _silenced(pl_module):
            out = pl_module.training_step(batch, batch_idx)
        loss = out["loss"] if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor):
            raise RuntimeError("curvature quality needs training_step to return the loss tensor")
        return loss

    return loss_fn
