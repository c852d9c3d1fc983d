"""``ProbeCallback``: what one arm of ``advise`` measures, written as JSON for the verdict.

One arm is the user's own training run with or without a method's callback. The probe, placed before the method's
callbacks, records per optimizer step the training loss, the time of the step (from its ``on_train_batch_start`` to
its ``on_train_batch_end``: forward, backward, preconditioning, optimizer step) and the time between steps (data
loading, loop overhead; a quality measurement lands here and is left out by taking the median), each on two clocks
(wall-clock, and the process's CPU time, which other processes sharing the CPU do not inflate), a checksum of every
batch, and the curvature-quality index that a ``CurvatureScheduler`` in the same Trainer measured. It stops the run
after ``steps`` optimizer steps.

Same start in every arm: at ``on_fit_start`` the first arm saves the model's weights to ``weights`` and the others
load them; at ``on_train_start`` every arm re-seeds the global RNGs (data order, dropout) with ``seed``, so what the
method callbacks drew while setting up does not shift the batches. Checksums of the initial weights and of every
batch are recorded so the guarantee can be checked, not assumed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_soo import checks


def checksum(value: Any) -> float:
    """A position-weighted sum of every tensor in ``value`` (cheap; differs when values or their order differ)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1).double()
        weights = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device).remainder_(9973).add_(1.0)
        return float((flat * weights).sum())
    if isinstance(value, Mapping):
        return sum(checksum(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum((i + 1) * checksum(v) for i, v in enumerate(value))
    return 0.0


def _loss(outputs: Any) -> float:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, torch.Tensor):
        raise RuntimeError(
            "lightning-soo advise needs training_step to return the loss (a tensor or a dict with 'loss'); under "
            "manual optimization return the loss as well"
        )
    return float(loss.detach())


def _examples(batch: Any) -> int | None:
    """Length of the first tensor in the batch (a loader without ``batch_size``, e.g. a batch sampler)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    return next((n for n in map(_examples, items) if n is not None), None)


class ProbeCallback(Callback):
    """Records one arm of ``advise`` (see the module docstring) and writes it to ``out`` as JSON.

    Args:
        out: where the arm's record goes (JSON); None keeps it in ``record`` only.
        steps: optimizer steps to run, then stop (fewer if the user's run is shorter).
        seed: the global RNGs are seeded with it when training starts.
        weights: a file for the initial weights: saved if ``save_weights``, else loaded (None: neither).
        save_weights: see ``weights``.
        name: the arm's name, copied into the record.
    """

    def __init__(
        self,
        out: Optional[str] = None,
        steps: int = 200,
        seed: int = 0,
        weights: Optional[str] = None,
        save_weights: bool = False,
        name: str = "arm",
    ) -> None:
        super().__init__()
        checks.check_int("steps", steps)
        self.out, self.steps, self.seed, self.name = out, steps, seed, name
        self.weights, self.save_weights = weights, save_weights
        self.record: dict[str, Any] = {}
        self._window_losses: list[float] = []
        self._t_start = (0.0, 0.0)  # (wall, process CPU) clocks
        self._busy = [0.0, 0.0]  # seconds inside training batches of the current optimizer step, per clock
        self._last_end: tuple[float, float] | None = None
        self._stepped = 0
        self._quality_seen: object = None
        self._t_fit = 0.0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_fit = time.perf_counter()
        if self.weights is not None:
            path = Path(self.weights)
            if self.save_weights:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(pl_module.state_dict(), path)
            else:
                pl_module.load_state_dict(torch.load(path, weights_only=True))
        self.record = {
            "name": self.name,
            "init_checksum": sum(checksum(p) for p in pl_module.state_dict().values()),
            "losses": [],
            "step_seconds": [],
            "gap_seconds": [],
            "step_cpu_seconds": [],
            "gap_cpu_seconds": [],
            "batch_checksums": [],
            "quality": [],
            "method": None,
        }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(self.seed, verbose=False)
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        try:
            dataset_size: int | None = len(dataset) if dataset is not None else None
        except TypeError:
            dataset_size = None
        total = trainer.estimated_stepping_batches
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        methods = [m for cb in trainer.callbacks if isinstance(m := getattr(type(cb), "method", None), str)]  # type: ignore[attr-defined]
        self.record.update(
            dataset_size=dataset_size,
            batch_size=getattr(loader, "batch_size", None),
            accumulate=trainer.accumulate_grad_batches,
            full_steps=int(total) if math.isfinite(total) else None,
            lr=float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None,
            optimizer=type(optimizer).__name__ if optimizer is not None else None,
            method=methods[0] if methods else None,
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._note_quality(trainer)
        self.record["batch_checksums"].append(checksum(batch))
        if self.record["batch_size"] is None:
            self.record["batch_size"] = _examples(batch)
        self._t_start = (time.perf_counter(), time.process_time())
        if self._last_end is not None and not self._window_losses:
            self.record["gap_seconds"].append(self._t_start[0] - self._last_end[0])
            self.record["gap_cpu_seconds"].append(self._t_start[1] - self._last_end[1])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._window_losses.append(_loss(outputs))  # reading the loss waits for an accelerator: the step is done
        now = (time.perf_counter(), time.process_time())
        self._busy = [b + n - t for b, n, t in zip(self._busy, now, self._t_start, strict=True)]
        if trainer.global_step == self._stepped:  # mid accumulation window: no optimizer step yet
            return
        self._stepped = trainer.global_step
        self.record["losses"].append(sum(self._window_losses) / len(self._window_losses))
        self.record["step_seconds"].append(self._busy[0])
        self.record["step_cpu_seconds"].append(self._busy[1])
        self._window_losses, self._busy, self._last_end = [], [0.0, 0.0], now
        if len(self.record["losses"]) >= self.steps:
            trainer.should_stop = True

    def _note_quality(self, trainer: pl.Trainer) -> None:
        """The model's quality index, once per measurement of a ``CurvatureScheduler`` in the Trainer."""
        from lightning_soo.callbacks.scheduler import CurvatureScheduler

        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, CurvatureScheduler) and cb.last_quality and cb.last_quality is not self._quality_seen:
                self._quality_seen = cb.last_quality
                index = cb.last_quality.get("soo/quality_index/model")
                if index is not None and math.isfinite(index):
                    self.record["quality"].append([len(self.record["losses"]), float(index)])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._note_quality(trainer)
        managers = [cb.manager for cb in trainer.callbacks if getattr(cb, "manager", None) is not None]  # type: ignore[attr-defined]
        self.record["refreshes"] = int(managers[0].counters["refreshes"]) if managers else 0
        self.record["fit_seconds"] = time.perf_counter() - self._t_fit
        if self.out is not None and trainer.is_global_zero:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps(self.record), encoding="utf-8")
        rank_zero_info(f"advise probe '{self.name}': {len(self.record['losses'])} steps recorded")
