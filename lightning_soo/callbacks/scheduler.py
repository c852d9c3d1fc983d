"""``CurvatureScheduler``: when curvature is refreshed and frozen, and how good it is.

Works with any preconditioner callback in the same Trainer. It acts on two of the seed's findings:

* curvature matters early (Table 1): refresh frequently during the first ``frequent_fraction`` of training, then
  every ``interval`` steps or never (``interval=None``: frozen — hooks removed, only the products remain);
  or freeze adaptively once the curvature stops changing or its quality stops improving;
* curvature quality is measurable (Fig. 2): every ``quality_every_n_steps`` steps, PSGD's criterion and its
  scale-free index on the batch just trained on, logged per layer and for the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_soo import checks as v
from lightning_soo.callbacks.base import SecondOrderCallback, training_loss_fn
from lightning_soo.callbacks.telemetry import log_scalars
from lightning_soo.diagnostics.autograd import run_guarded
from lightning_soo.diagnostics.metrics import PREFIX
from lightning_soo.diagnostics.quality import QualityReport, measure_quality
from lightning_soo.engine.manager import PreconditionerManager


class CurvatureScheduler(Callback):
    """Schedules curvature refreshes and the freeze of a preconditioner callback and logs curvature quality.

    Args:
        frequent_fraction: fraction of training (of ``trainer.estimated_stepping_batches``) in the frequent phase.
        frequent_interval: refresh every this many steps during the frequent phase.
        interval: refresh every this many steps afterwards; None freezes the curvature after the frequent phase.
        statistics_interval: collect statistics every this many steps (None: keep the preconditioner callback's).
        adaptive: also freeze once the curvature statistics change by less than ``tolerance`` (relative, between
            refreshes) for ``patience`` refreshes in a row.
        tolerance: see ``adaptive``.
        patience: see ``adaptive``.
        quality_every_n_steps: measure curvature quality every this many steps (None: never).
        num_probes: random probes per quality measurement (its cost is about ``num_probes`` double backwards).
        quality_patience: freeze when the model's quality index has not improved by ``quality_tolerance``
            (relative) in this many measurements (None: off).
        quality_tolerance: see ``quality_patience``.

    Raises:
        ValueError: when an argument is out of its range (the message names it and what is accepted).
        RuntimeError: when the Trainer has no preconditioner callback, or more than one (at setup).
    """

    def __init__(
        self,
        frequent_fraction: float = 0.05,
        frequent_interval: int = 10,
        interval: Optional[int] = None,
        statistics_interval: Optional[int] = None,
        adaptive: bool = False,
        tolerance: float = 0.02,
        patience: int = 3,
        quality_every_n_steps: Optional[int] = 50,
        num_probes: int = 4,
        quality_patience: Optional[int] = None,
        quality_tolerance: float = 0.01,
    ) -> None:
        super().__init__()
        v.check_float("frequent_fraction", frequent_fraction, 0.0, 1.0)
        v.check_int("frequent_interval", frequent_interval)
        v.check_int("interval", interval, allow_none=True)
        v.check_int("statistics_interval", statistics_interval, allow_none=True)
        v.check_choice("adaptive", adaptive, (True, False))
        v.check_float("tolerance", tolerance, 0.0, low_open=True)
        v.check_int("patience", patience)
        v.check_int("quality_every_n_steps", quality_every_n_steps, allow_none=True)
        v.check_int("num_probes", num_probes)
        v.check_int("quality_patience", quality_patience, allow_none=True)
        v.check_float("quality_tolerance", quality_tolerance, 0.0)
        self.frequent_fraction, self.frequent_interval, self.interval = frequent_fraction, frequent_interval, interval
        self.statistics_interval = statistics_interval
        self.adaptive, self.tolerance, self.patience = adaptive, tolerance, patience
        self.quality_every_n_steps, self.num_probes = quality_every_n_steps, num_probes
        self.quality_patience, self.quality_tolerance = quality_patience, quality_tolerance
        self.best_index = math.inf
        self.stale = 0  # quality measurements without improvement
        self.last_quality: dict[str, float] = {}
        self._target: SecondOrderCallback | None = None
        self._configured: PreconditionerManager | None = None
        self._warned_manual = False

    @property
    @override
    def state_key(self) -> str:
        return type(self).__name__

    # -- wiring ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        targets = [cb for cb in trainer.callbacks if isinstance(cb, SecondOrderCallback)]  # type: ignore[attr-defined]
        if not targets:
            raise RuntimeError(
                "CurvatureScheduler needs exactly one preconditioner callback in the Trainer and found none: add "
                "KFACCallback, ShampooCallback, GaussNewtonCallback or PSGDCallback beside it. With LightningCLI, "
                "give a method's config before this one (`lightning-soo config kfac > kfac.yaml`, then "
                "`--config kfac.yaml --config curvature.yaml`)."
            )
        if len(targets) > 1:
            raise RuntimeError(
                "CurvatureScheduler needs exactly one preconditioner callback in the Trainer and found "
                f"{len(targets)} ({', '.join(type(t).__name__ for t in targets)}): keep one"
            )
        self._target = targets[0]

    def _manager(self) -> PreconditionerManager | None:
        return None if self._target is None else self._target.manager

    def _configure(self, trainer: pl.Trainer, manager: PreconditionerManager) -> None:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            rank_zero_warn("CurvatureScheduler: the number of training steps is unknown; no frequent phase")
            total = 0
        frequent_steps = math.ceil(self.frequent_fraction * total)
        manager.set_schedule(
            frequent_steps=frequent_steps,
            frequent_interval=self.frequent_interval,
            preconditioner_interval=self.interval,
            statistics_interval=self.statistics_interval,
            elapsed=_elapsed(trainer, total),
        )
        if self.adaptive:
            manager.enable_adaptive_freeze(self.tolerance, self.patience)
        self._configured = manager
        after = "frozen" if self.interval is None else f"every {self.interval} steps"
        rank_zero_info(
            f"CurvatureScheduler: refresh every {self.frequent_interval} steps for the first "
            f"{frequent_steps} of {int(total)} steps, then {after}"
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The schedule is set before the first step begins, after a resumed manager loaded its state (every
        callback's ``on_fit_start``): a resumed run already past the frequent phase freezes at its first step."""
        self._ensure_configured(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ensure_configured(trainer)  # a manager built after ``on_train_start``

    def _ensure_configured(self, trainer: pl.Trainer) -> None:
        manager = self._manager()
        if manager is not None and self._configured is not manager:
            self._configure(trainer, manager)

    # -- quality --------------------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        manager = self._manager()
        n = self.quality_every_n_steps
        if manager is None or n is None or manager.in_step or (manager.steps - 1) % n != 0:
            return
        if not pl_module.automatic_optimization:
            if not self._warned_manual:
                self._warned_manual = True
                rank_zero_warn("CurvatureScheduler: curvature quality is not measured under manual optimization")
            return
        if not any(layer.preconditioner.ready for layer in manager.layers.values()):
            return
        loss_fn = training_loss_fn(pl_module, batch, batch_idx)
        reports: list[QualityReport] = []
        measure = lambda: reports.append(measure_quality(manager, loss_fn, num_probes=self.num_probes, model=pl_module))  # noqa: E731
        if not run_guarded("the curvature-quality measurement", measure, manager.warn_once):
            return
        report = reports[0]
        metrics = self._metrics(report, trainer)
        self.last_quality = metrics
        log_scalars(trainer, metrics)
        self._watch_quality(report.model.index, manager)

    def _metrics(self, report: QualityReport, trainer: pl.Trainer) -> dict[str, float]:
        out = report.scalars(PREFIX)
        if trainer.optimizers:
            out[f"{PREFIX}/lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        return out

    def _watch_quality(self, index: float, manager: PreconditionerManager) -> None:
        if self.quality_patience is None or manager.frozen or not math.isfinite(index):
            return
        if index < self.best_index * (1 - self.quality_tolerance):
            self.best_index, self.stale = index, 0
            return
        self.stale += 1
        if self.stale >= self.quality_patience:
            rank_zero_info(f"CurvatureScheduler: quality index stopped improving ({index:.3g}); curvature frozen")
            manager.freeze()

    # -- persistence ----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"best_index": self.best_index, "stale": self.stale}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_index = float(state_dict.get("best_index", math.inf))
        self.stale = int(state_dict.get("stale", 0))


def _elapsed(trainer: pl.Trainer, total: float) -> Callable[[], int]:
    """Training steps done, in the unit of ``estimated_stepping_batches``: optimizer steps (``global_step``) where
    ``max_steps`` bounds it, else windows of ``accumulate_grad_batches`` batches. The manager's steps are windows of
    batches, which are not optimizer steps under manual optimization with two optimizers stepping per batch."""
    if trainer.max_steps != -1 and total == trainer.max_steps:
        return lambda: trainer.global_step
    loop, acc = trainer.fit_loop.epoch_loop, trainer.accumulate_grad_batches
    return lambda: max(loop.total_batch_idx, 0) // acc
