"""The Lightning glue shared by every preconditioner callback: a thin adapter over ``PreconditionerManager``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_soo import validation as v
from lightning_soo.callbacks.telemetry import ProgressBarState, add_layout, log_histograms, log_scalars
from lightning_soo.damping import DampingFn
from lightning_soo.dashboard import StepTimer, manager_metrics, spectra
from lightning_soo.manager import PreconditionerManager

_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def _batch_size(batch: Any) -> int | None:
    """Length of the first tensor found in the batch (None if there is none); used by the damping rule."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        size = _batch_size(item)
        if size is not None:
            return size
    return None


class SecondOrderCallback(Callback):
    """Builds a manager over the LightningModule when fit starts and drives it from the training loop.

    ``on_train_batch_start`` opens a step (statistics captured if due), ``on_before_optimizer_step`` (gradients
    accumulated, unscaled and all-reduced, not yet clipped) rewrites the gradients of that optimizer's parameters.
    """

    method: ClassVar[str]

    def __init__(
        self,
        *,
        damping: float | DampingFn,
        statistics_interval: int,
        preconditioner_interval: int,
        exclude: Sequence[str],
        weight_sharing: str,
        loss_reduction: str,
        method_options: dict[str, Any],
        kl_clip: float | None = None,
        grad_worker_fraction: float = 1.0,
        max_update_norm: float | None = None,
        grafting: str | None = None,
    ) -> None:
        super().__init__()
        v.check_damping("damping", damping)
        v.check_int("statistics_interval", statistics_interval)
        v.check_int("preconditioner_interval", preconditioner_interval)
        v.check_patterns("exclude", exclude)
        v.check_choice("weight_sharing", weight_sharing, ("expand", "reduce"))
        v.check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        v.check_float("kl_clip", kl_clip, 0.0, low_open=True, allow_none=True)
        v.check_float("grad_worker_fraction", grad_worker_fraction, 0.0, 1.0, low_open=True)
        v.check_float("max_update_norm", max_update_norm, 0.0, low_open=True, allow_none=True)
        v.check_choice("grafting", grafting, ("sgd", None))
        self.damping = damping
        self.statistics_interval = statistics_interval
        self.preconditioner_interval = preconditioner_interval
        self.exclude = list(exclude)
        self.weight_sharing = weight_sharing
        self.loss_reduction = loss_reduction
        self.method_options = method_options
        self.kl_clip = kl_clip
        self.grad_worker_fraction = grad_worker_fraction
        self.max_update_norm = max_update_norm
        self.grafting = grafting
        self.manager: PreconditionerManager | None = None
        self._pending_state: dict[str, Any] | None = None
        self._timer = StepTimer()
        self._bar = ProgressBarState("soo", self._state_label)
        self._last_logged_refreshes = -1

    @property
    def state_key(self) -> str:
        # stable across hyperparameters so a checkpoint resumes whatever the arguments
        return type(self).__name__

    def build_manager(self, pl_module: pl.LightningModule) -> PreconditionerManager:
        return PreconditionerManager(
            pl_module,
            self.method,
            self.method_options,
            damping=self.damping,
            statistics_interval=self.statistics_interval,
            preconditioner_interval=self.preconditioner_interval,
            exclude=self.exclude,
            weight_sharing=self.weight_sharing,  # type: ignore[arg-type]
            loss_reduction=self.loss_reduction,  # type: ignore[arg-type]
            kl_clip=self.kl_clip,
            grad_worker_fraction=self.grad_worker_fraction,
            max_update_norm=self.max_update_norm,
            grafting=self.grafting,  # type: ignore[arg-type]
            warn=rank_zero_warn,
        )

    # -- lifecycle ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if name in _UNSUPPORTED_STRATEGIES:
            raise RuntimeError(
                f"{type(self).__name__} does not support {name}: sharded parameters and gradients would be "
                "preconditioned shard by shard, which is wrong. Use a single device or the DDP strategy."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.manager is None:
            self.manager = self.build_manager(pl_module)
            rank_zero_info(
                f"{type(self).__name__}: {len(self.manager.layers)} layer(s) preconditioned "
                f"({', '.join(self.manager.layers) or 'none'})"
            )
        if self._pending_state is not None:
            self.manager.load_state_dict(self._pending_state)
            self._pending_state = None
        add_layout(trainer)
        self._bar.attach(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.manager is not None:
            self.manager.begin_step(batch_size=_batch_size(batch))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        manager = self.manager
        if manager is None or manager._open:  # mid accumulation window: no step yet
            return
        if manager.steps % trainer.log_every_n_steps != 0:
            return
        log_scalars(trainer, {**manager_metrics(manager), **self._timer.report(manager)})
        if manager.counters["refreshes"] != self._last_logged_refreshes:  # spectra only when they changed
            self._last_logged_refreshes = manager.counters["refreshes"]
            log_histograms(trainer, spectra(manager))

    def _state_label(self) -> str | None:
        if self.manager is None:
            return None
        return "frozen" if self.manager.frozen else "refreshing"

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.manager is None:
            return
        acc = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        scale = 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = float(scaler.get_scale())
        self.manager.step(optimizer, grad_scale=acc / scale)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.manager is not None:
            self._pending_state = self.manager.state_dict()
            self.manager.remove_hooks()
            self.manager = None
        self._bar.detach()

    # -- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.manager is not None:
            return self.manager.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.manager is not None:
            self.manager.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict
