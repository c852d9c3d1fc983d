"""Wall-clock to a target accuracy: a callback that records (steps, training seconds, test accuracy) with the time
spent evaluating taken off the clock, and the helper that reads the first point reaching a target.

Two clocks run side by side: ``seconds`` (``time.perf_counter``, what a user waits) and ``cpu_seconds``
(``time.process_time``, the process's CPU time). For a single-threaded run on a dedicated core they agree; on a
shared machine the wall-clock also counts the time other processes held the core, the CPU time does not."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class Point:
    """One evaluation: optimizer steps taken, training seconds so far (evaluation excluded), test accuracy, and the
    process's CPU seconds so far (evaluation excluded)."""

    steps: int
    seconds: float
    accuracy: float
    cpu_seconds: float = float("nan")


class AccuracyClock(Callback):
    """Evaluate test accuracy at the start, every ``every_n_steps`` optimizer steps (None: at every epoch's end)
    and at the end of training; the evaluations are timed and subtracted, so ``points`` hold training time only.

    Put it after the preconditioner callbacks so their per-step work is inside the clock. The evaluation runs under
    ``torch.no_grad`` in eval mode, so capture hooks (which need grad) record nothing.
    """

    def __init__(self, test_set: TensorDataset, every_n_steps: Optional[int] = None) -> None:
        self.x, self.y = test_set.tensors
        self.every_n_steps = every_n_steps
        self.points: list[Point] = []
        self.excluded = 0.0
        self.cpu_excluded = 0.0
        self._t0 = self._cpu0 = 0.0

    @property
    def training_seconds(self) -> float:
        """Seconds since training started, evaluation excluded (valid after ``on_train_end``)."""
        return self.points[-1].seconds if self.points else 0.0

    def _evaluate(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        steps = trainer.global_step
        if self.points and self.points[-1].steps == steps:
            return
        seconds = start - self._t0 - self.excluded
        cpu_seconds = cpu_start - self._cpu0 - self.cpu_excluded
        was_training = model.training
        model.eval()
        with torch.no_grad():
            accuracy = float((model(self.x.to(model.device)).argmax(-1) == self.y.to(model.device)).float().mean())
        model.train(was_training)
        self.points.append(Point(steps, seconds, accuracy, cpu_seconds))
        self.excluded += time.perf_counter() - start
        self.cpu_excluded += time.process_time() - cpu_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.points, self.excluded, self.cpu_excluded = [], 0.0, 0.0
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_steps:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluate(trainer, pl_module)


def best_accuracy(points: list[Point]) -> float:
    """The best test accuracy along a trajectory (nan when empty)."""
    return max((p.accuracy for p in points), default=float("nan"))


def time_to_target(points: list[Point], target: float) -> Optional[Point]:
    """The first point whose accuracy reaches ``target`` (None: never), i.e. the steps and the training seconds a
    user waits for it."""
    return next((p for p in points if p.accuracy >= target - 1e-9), None)


def fastest(
    trajectories: list[list[Point]], target: float, clock: str = "seconds"
) -> tuple[Optional[int], Optional[Point]]:
    """Among the settings of a tuned method, the one reaching ``target`` in the fewest ``clock`` seconds
    (``"seconds"`` or ``"cpu_seconds"``): (its index, its point), or (None, None) when none does."""
    hits = [(i, p) for i, t in enumerate(trajectories) if (p := time_to_target(t, target)) is not None]
    if not hits:
        return None, None
    return min(hits, key=lambda hit: getattr(hit[1], clock))
