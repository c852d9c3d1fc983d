"""The Lightning glue shared by every preconditioner callback: a thin adapter over ``PreconditionerManager``."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Optional, TypedDict

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_soo.callbacks.telemetry import add_layout, log_histograms, log_progress, log_scalars
from lightning_soo.diagnostics.metrics import StepTimer, manager_metrics, spectra
from lightning_soo.engine.manager import PreconditionerManager
from lightning_soo.options import LossReduction, StepOptions, WeightSharing

_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class StepArguments(TypedDict, total=False):
    """Arguments every preconditioner callback takes beside its own; defaults and checks: ``lightning_soo.options``.

    Args:
        statistics_interval: capture statistics every this many optimizer steps (default 1).
        exclude: module-name patterns (``fnmatch``, e.g. ``"decoder"``, ``"*.out_proj"``) left plain (default none).
        weight_sharing: ``"expand"`` (every sequence / spatial position a row, default) or ``"reduce"``.
        loss_reduction: ``"mean"`` if your loss averages over examples (default), ``"sum"`` if it sums.
        max_update_norm: cap on the Frobenius norm of each layer's preconditioned gradient (default None: no cap).
        grad_worker_fraction: under DDP each layer's preconditioner is computed by one owner rank; 1.0 (default)
            broadcasts it at refreshes, 1/world_size lets the owner precondition and broadcast the gradient.
        precondition_vectors: PSGD and Shampoo with ``statistics="gradient"`` also precondition vector parameters
            outside layers (norms' scales and shifts), each with a diagonal factor (default False).
        max_conv_groups: K-FAC, Gauss-Newton and per-example Shampoo precondition a convolution of at most this many
            groups group by group, a layer per group (default 0: grouped convolutions are left to PSGD).
    """

    statistics_interval: int
    exclude: Sequence[str]
    weight_sharing: WeightSharing
    loss_reduction: LossReduction
    max_update_norm: Optional[float]
    grad_worker_fraction: float
    precondition_vectors: bool
    max_conv_groups: int


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


@contextmanager
def _silenced(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside: a diagnostic must not change the user's metrics."""
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


def training_loss_fn(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Callable[[], torch.Tensor]:
    """``loss_fn()`` re-runs the user's ``training_step`` on ``batch`` with logging silenced (for side passes:
    curvature quality, PSGD's Newton fit)."""

    def loss_fn() -> torch.Tensor:
        with _silenced(pl_module):
            out = pl_module.training_step(batch, batch_idx)
        loss = out["loss"] if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor):
            raise RuntimeError("curvature quality needs training_step to return the loss tensor")
        return loss

    return loss_fn


class SecondOrderCallback(Callback):
    """Builds a manager over the LightningModule when fit starts and drives it from the training loop.

    ``on_train_batch_start`` opens a step (statistics captured if due), ``on_before_optimizer_step`` (gradients
    accumulated, unscaled and all-reduced, not yet clipped) rewrites the gradients of that optimizer's parameters.
    Subclasses pass their options dataclass, already checked; its fields are readable as attributes
    (``callback.damping``).
    """

    method: ClassVar[str]

    def __init__(self, options: StepOptions) -> None:
        super().__init__()
        self.options = options
        self.manager: PreconditionerManager | None = None
        self._batches = 1  # training batches in the open step's window (manual optimization's accumulation)
        self._pending_state: dict[str, Any] | None = None
        self._pending_model: weakref.ref[pl.LightningModule] | None = None  # whose fit left _pending_state
        self._timer = StepTimer()
        self._last_logged_refreshes = -1

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in type(options).__dataclass_fields__:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    @override
    def state_key(self) -> str:
        # stable across hyperparameters so a checkpoint resumes whatever the arguments
        return type(self).__name__

    def build_manager(self, pl_module: pl.LightningModule) -> PreconditionerManager:
        return PreconditionerManager(pl_module, self.method, options=self.options, warn=rank_zero_warn)

    # -- lifecycle ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if name in _UNSUPPORTED_STRATEGIES:
            raise RuntimeError(
                f"{type(self).__name__} does not support {name}: sharded parameters and gradients would be "
                "preconditioned shard by shard, which is wrong. Use a single device or the DDP strategy."
            )
        mine = [cb for cb in trainer.callbacks if isinstance(cb, SecondOrderCallback)]  # type: ignore[attr-defined]
        if len(mine) > 1:
            names = ", ".join(type(c).__name__ for c in mine)
            raise RuntimeError(
                f"found {len(mine)} preconditioner callbacks in the Trainer ({names}): each rewrites the gradient, "
                "so the optimizer would step one method applied to the other's output. Keep one."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.manager is None:
            self.manager = self.build_manager(pl_module)
            layers = self.manager.layers
            frozen = sum(not all(p.requires_grad for p in lay.adapter.params) for lay in layers.values())
            rank_zero_info(
                f"{type(self).__name__}: {len(layers)} layer(s) preconditioned"
                + (f", {frozen} of them frozen now" if frozen else "")
                + f" ({', '.join(layers) or 'none'})"
            )
        if (
            self._pending_state is not None
            and self._pending_model is not None
            and self._pending_model() is not pl_module
        ):
            rank_zero_info(
                f"{type(self).__name__}: used for a new model, starting fresh (state carries over between fits of the "
                "same model, or through a checkpoint)"
            )
            self._pending_state = None
        if self._pending_state is not None:
            self.manager.load_state_dict(self._pending_state)
            self._pending_state = None
        add_layout(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.manager is not None:
            self._batches = self._batches + 1 if self.manager.in_step else 1  # in the window of the next step
            self.manager.begin_step(batch_size=_batch_size(batch))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        manager = self.manager
        if manager is None or manager.in_step:  # mid accumulation window: no step yet
            return
        log_progress(pl_module, manager.frozen)
        if manager.steps % trainer.log_every_n_steps != 0:  # type: ignore[attr-defined]
            return
        log_scalars(trainer, {**manager_metrics(manager), **self._timer.report(manager)})
        if manager.counters["refreshes"] != self._last_logged_refreshes:  # spectra only when they changed
            self._last_logged_refreshes = manager.counters["refreshes"]
            log_histograms(trainer, spectra(manager))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.manager is None:
            return
        # manual optimization: a step after k batches is accumulation with the loss divided by k, as Lightning's
        # documentation writes it (the statistics of those k batches are this step's)
        acc = trainer.accumulate_grad_batches if pl_module.automatic_optimization else self._batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.manager.step(optimizer, accumulation=acc, grad_scaler=scaler)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A run that raised (in a step, Ctrl-C) may never reach ``teardown``: take the hooks (and a census still
        on from a first step that raised) off the model now."""
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.manager is not None:
            self._pending_state = self.manager.state_dict()
            self._pending_model = weakref.ref(pl_module)
            self.manager.remove_hooks()
            self.manager = None

    # -- persistence ----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.manager is not None:
            return self.manager.state_dict()
        return dict(self._pending_state or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.manager is not None:
            self.manager.load_state_dict(state_dict)
        else:
            self._pending_state, self._pending_model = state_dict, None  # a checkpoint: applies to the next fit
