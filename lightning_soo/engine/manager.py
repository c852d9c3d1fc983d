"""PreconditionerManager: per-layer preconditioners over a model, in plain PyTorch (no Lightning).

One optimizer step with a manager::

    manager.begin_step()          # before the forward pass: statistics are captured if the schedule says so
    loss.backward()
    manager.step(optimizer)       # close statistics, refresh when due, p.grad <- P·p.grad
    optimizer.step()

``begin_step`` may be called per micro-batch (gradient accumulation): the step stays open until ``step``, which may
be called several times (once per optimizer, or per closure): statistics are closed and preconditioners refreshed
once per layer and step, gradients rewritten at every call. Steps that do not refresh read the device once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_soo.engine import batched, factored, report, state
from lightning_soo.engine.damping import clip_cannot_protect, make_damping
from lightning_soo.engine.distributed import DistributedPlan, reduce_statistics, world_size
from lightning_soo.engine.layer import Layer, OptimizerLayers, count_missed_passes
from lightning_soo.engine.postprocess import Verdicts, settled, write_updates
from lightning_soo.engine.schedule import ChangeMonitor, Schedule
from lightning_soo.engine.timing import PhaseTimer
from lightning_soo.engine.wiring import wire
from lightning_soo.options import StepOptions
from lightning_soo.preconditioners import get_method
from lightning_soo.preconditioners.base import Preconditioner

Warn = Callable[[str], None]


def _warn(message: str) -> None:  # the default ``warn``: Python warnings, pointing at the caller of the manager
    warnings.warn(message, UserWarning, stacklevel=3)


class PreconditionerManager:
    """Owns the per-layer preconditioners, the schedule and the damping, and rewrites gradients.

    Args:
        model: the model whose supported layers (Linear, Conv1d/2d/3d, Embedding) are preconditioned.
        method: ``"kfac"``, ``"shampoo"``, ``"gauss_newton"``, ``"psgd"`` or a ``Preconditioner`` subclass.
        method_options: options as a dict (e.g. ``{"factor_decay": 0.9}``), merged with ``options`` and ``changes``.
        options: the method's options dataclass (``KFACOptions``, ...; default: its defaults). Every option, its
            default and its check are documented in ``lightning_soo.options``.
        warn: where warnings go (the Lightning callbacks pass ``rank_zero_warn``).
        **changes: options by name, e.g. ``damping=1e-3, kl_clip=None``.

    Raises:
        ValueError: for an unknown method, an unknown option or a value its options dataclass refuses.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | type[Preconditioner] = "kfac",
        method_options: dict[str, Any] | None = None,
        *,
        options: StepOptions | None = None,
        warn: Warn = _warn,
        **changes: Any,
    ) -> None:
        self.method = get_method(method) if isinstance(method, str) else method
        base = options if options is not None else self.method.options_type()
        merged = {**(method_options or {}), **changes}
        self.options: StepOptions = base.updated(**merged) if merged else base
        o = self.options
        self.damping = make_damping(o.damping) if o.uses_damping else None  # type: ignore[arg-type]
        self.schedule = Schedule(o.statistics_interval, o.preconditioner_interval)
        self.plan: DistributedPlan | None = None  # built at the first refresh under torch.distributed
        self.monitor = ChangeMonitor(o.freeze_tolerance, o.freeze_patience) if o.freeze_tolerance is not None else None
        self.last_kl_scale: float | Tensor = 1.0  # ν of the last step (a device tensor under a KL clip)
        self.warn = warn  # _build sets the wiring, its capture, layers, skipped ({param: "Module: why"}), excluded
        self.steps = 0  # optimizer steps begun so far
        self.last_damping: float | None = None
        self.batch_size: int | None = None
        names = ("refreshes", "failed_refreshes", "skipped_statistics", "nonfinite_updates", "preconditioned_steps")
        self.counters = dict.fromkeys(names, 0)  # preconditioned_steps: steps in which a gradient was rewritten
        self._timer = PhaseTimer(next(model.parameters(), torch.empty(0)).device)
        self._cycle = -1  # index of the current (or last) step
        self._open = self._collecting = False
        self._scaled = self._reported = False  # the open step's statistics were captured under a GradScaler
        self._processed: set[str] = set()
        self._warned: set[str] = set()  # manager-wide warnings
        self._verdicts: Verdicts[Layer] = Verdicts()  # device-side flags of the step, read once by _settle
        self._probes = factored.Probes()  # checks of the factored products on statistics steps
        self._stacks = batched.Stacks()  # equally shaped layers preconditioned as one
        self._build(model)

    # -- construction -------------------------------------------------------------------------------------
    def _build(self, model: nn.Module) -> None:
        self.wiring = wire(model, self.method, self.options, self._timer.totals)
        self.capture, self.layers = self.wiring.capture, self.wiring.layers
        self.skipped, self.excluded = self.wiring.skipped, self.wiring.excluded
        self._optimizers = OptimizerLayers(model, self.warn, check_lrs=self.options.kl_clip is not None)
        self._census_due = self.capture.attached
        for message in self.wiring.setup_warnings(self.method.__name__):
            self.warn(message)

    # -- the step -------------------------------------------------------------------------------------
    def begin_step(self, batch_size: int | None = None) -> None:
        """Open an optimizer step; idempotent until ``step`` (micro-batches of gradient accumulation, whose
        ``batch_size`` values add up; the damping rule may use it)."""
        if self._open:
            if batch_size is not None:
                self.batch_size = (self.batch_size or 0) + batch_size
            return
        self._open = True
        self.batch_size = batch_size
        self._cycle = self.steps
        self.steps += 1
        if self.schedule.freezes(self._cycle) and not self.schedule.frozen:
            self.freeze()
        self._collecting = self.schedule.collects(self._cycle)
        if not self._reported and self.counters["refreshes"]:
            self._report_plain()
        self.wiring.open_step(self._collecting, self._processed, self.schedule.read_before_next(self._cycle))
        self._processed.clear()
        if self._collecting and self._census_due and self.wiring.census_wanted(batch_size):
            self.wiring.start_census(batch_size)  # find uses of managed weights that capture cannot see

    @property
    def collecting(self) -> bool:
        """Statistics are being collected in the open step."""
        return self._open and self._collecting

    @property
    def in_step(self) -> bool:
        """A step was begun and its ``step`` has not been called yet (mid accumulation window, for example)."""
        return self._open

    def step(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        accumulation: int = 1,
        grad_scaler: Any = None,
        lr: float | None = None,
    ) -> None:
        """Close statistics, refresh when due and precondition the gradients of ``optimizer``'s parameters (all
        managed layers when None), right before ``optimizer.step``, once they are final and unscaled (fp16).

        Args:
            optimizer: whose parameters to precondition; its first group's learning rate feeds the damping rule.
            accumulation: micro-batches whose mean-loss gradients were added up in this step (the loss was
                divided by it before backward, as Lightning does).
            grad_scaler: the ``torch.amp.GradScaler`` whose scale multiplied this step's backward (None: no scaling).
            lr: the learning rate for the damping rule (default: the optimizer's).

        Raises:
            RuntimeError: when called before ``begin_step``, or when a layer keeps failing to refresh.
        """
        if self._open:
            self._open = False
            if self.wiring.finish_census() | self.wiring.check_calls():
                self._optimizers.clear()
                if not self.layers and (message := self.wiring.setup_warning(self.method.__name__)):
                    self.warn(f"after the census of the first statistics step, {message}")  # no refresh to report
        if self._cycle < 0:
            raise RuntimeError("PreconditionerManager.step() called before begin_step()")
        if lr is None and optimizer is not None and optimizer.param_groups:
            lr = float(optimizer.param_groups[0]["lr"])
        layers = self._optimizers.layers_of(optimizer, self.layers)
        fresh = [layer for layer in layers if layer.name not in self._processed]
        if fresh:
            for layer in fresh:  # capture is per layer: closed by the step of the optimizer that owns it
                layer.collecting = False
            self._update(fresh, self._output_scale(accumulation, grad_scaler), lr)
            self._processed.update(layer.name for layer in fresh)
        self.capture.active = any(layer.collecting for layer in self.layers.values())
        with self._timer.phase("precondition"):
            self._precondition(layers, optimizer, lr)
        self._settle()
        if not self._reported and self.counters["refreshes"] and len(self._processed) == len(self.layers):
            self._report_plain()  # else at the next begin_step, once the batch's other optimizers stepped

    def _output_scale(self, accumulation: int, grad_scaler: Any) -> float | Tensor:
        """``accumulation / loss_scale``: what maps this step's captured output gradients (the 1/N of a mean loss
        already undone by the hooks) to per-example gradients of the loss; see ``engine.layer``."""
        self._scaled = grad_scaler is not None and grad_scaler.is_enabled()
        if not (self._collecting and self._scaled):
            return float(accumulation)
        scale = getattr(grad_scaler, "_get_scale_async", None)  # the scale as a tensor: no device sync
        return accumulation / (scale() if scale is not None else grad_scaler.get_scale())

    # -- the public contract for schedulers -------------------------------------------------------------
    def set_schedule(
        self,
        *,
        frequent_steps: int = 0,
        frequent_interval: int | None = None,
        preconditioner_interval: int | None,
        statistics_interval: int | None = None,
        elapsed: Callable[[], int] | None = None,
    ) -> None:
        """Replace the refresh schedule (the seed's Table 1 shape): every ``frequent_interval`` steps for the first
        ``frequent_steps`` steps (or until ``elapsed()``, the training steps done, reaches it), then every
        ``preconditioner_interval`` steps or never (None: frozen)."""
        every = statistics_interval or self.schedule.statistics_interval
        phase: dict[str, Any] = {"frequent_interval": frequent_interval, "frequent_steps": frequent_steps}
        new = Schedule(every, preconditioner_interval, **phase, elapsed=elapsed)
        new.load_state_dict(self.schedule.state_dict())  # a freeze already made stays
        self.schedule = new

    def enable_adaptive_freeze(self, tolerance: float, patience: int) -> None:
        """Freeze once the curvature statistics change by less than ``tolerance`` (relative, between refreshes)
        for ``patience`` refreshes in a row; kept if one is already on."""
        if self.monitor is None:
            self.monitor = ChangeMonitor(tolerance, patience)

    def capture_paused(self) -> AbstractContextManager[None]:
        """No statistics are captured inside (side passes such as the quality measurement)."""
        return self.wiring.paused()

    def _update(self, layers: list[Layer], output_scale: float | Tensor, lr: float | None) -> None:
        step = self._cycle
        if self._collecting:
            self._close_statistics(layers, output_scale)
        else:
            for layer in layers:
                layer.preconditioner.discard_statistics()
        scheduled = self.schedule.refreshes(step)
        due = layers if scheduled else [lay for lay in layers if self._collecting and (lay.catch_up or lay.retry)]
        if due:  # refresh steps, and layers rewired by the census (or empty at a refresh) once they have statistics
            self._settle()  # refresh steps may synchronise: the statistics' verdicts are needed now
            with self._timer.phase("refresh"):
                self._refresh_due(due, step, lr)
        for layer in due:  # a layer without a preconditioner after a scheduled refresh (no rows: a LoRA ``A`` behind
            # a zero ``B`` at the first step) is refreshed once more at the next statistics step; not under DDP,
            # where readiness differs between ranks
            retry = scheduled and not layer.retried and not layer.preconditioner.ready and world_size() == 1
            layer.retry, layer.retried = retry, layer.retried or retry

    def _close_statistics(self, layers: list[Layer], output_scale: float | Tensor) -> None:
        with self._timer.phase("statistics"):
            count_missed_passes(layers, self.wiring.examples, world_size() > 1)  # an expert missing some passes
            if world_size() > 1:
                sent = reduce_statistics(layers)
                self.counters["bytes_reduced"] = self.counters.get("bytes_reduced", 0) + sent
            for layer in layers:
                pre = layer.preconditioner
                if pre.uses_grad and (g := layer.adapter.grad_matrix()) is not None:
                    pre.observe_grad(g.to(pre.dtype))
            ratio = self.wiring.examples.ratio()  # the head called again in a pass: its further examples
            for cls in dict.fromkeys(type(layer.preconditioner) for layer in layers):  # equal shapes close as banks
                group = [layer for layer in layers if type(layer.preconditioner) is cls]
                scale = output_scale if ratio is None or not cls.loss_examples else output_scale * ratio**0.5
                kept = cls.close_many([layer.preconditioner for layer in group], scale)
                closed = [(layer, k) for layer, k in zip(group, kept, strict=True) if k is not None]
                self._verdicts.add("stats", [c[0] for c in closed], [c[1] for c in closed], raised_when=False)

    def _refresh_due(self, layers: list[Layer], step: int, lr: float | None) -> None:
        damping = self.damping(step, lr, self.batch_size) if self.damping is not None else 0.0
        self.last_damping = damping if self.damping is not None else None
        if (message := clip_cannot_protect(damping, self.options)) and "damping" not in self._warned:
            self._warned.add("damping")
            self.warn(message)
        if world_size() > 1:  # each layer refreshed by its owner rank only
            if self.plan is None:
                self.plan = DistributedPlan(list(self.layers.values()), self.options.grad_worker_fraction)
            self.plan.refresh(layers, lambda layer: self._refresh(layer, damping))
            self.counters["bytes_broadcast"] = self.plan.bytes
        else:  # one batched decomposition per factor shape and method
            for cls in {type(layer.preconditioner) for layer in layers}:
                group = [layer for layer in layers if type(layer.preconditioner) is cls]
                results = cls.refresh_many([layer.preconditioner for layer in group], damping)
                for layer, ok in zip(group, results, strict=True):
                    self._refreshed(layer, ok)
        if self.monitor is not None:
            self._watch_change(layers)

    def _watch_change(self, layers: list[Layer]) -> None:
        """Adaptive freeze: freeze once the curvature stopped changing."""
        assert self.monitor is not None
        states = {layer.name: layer.preconditioner.curvature_state() for layer in layers}
        if self.monitor.observe(states):
            self.freeze()

    def _refresh(self, layer: Layer, damping: float) -> None:
        self._refreshed(layer, layer.preconditioner.refresh(damping))

    def _refreshed(self, layer: Layer, ok: bool | None) -> None:
        """Count a layer's refresh; warn once on failure, raise after ``max_failures`` in a row."""
        if notice := layer.preconditioner.notice:  # e.g. Gauss-Newton subsampled its examples
            self._warn_once(layer, "notice", f"layer '{layer.name}': {notice}")
            layer.preconditioner.notice = None
        if ok is None:
            return
        if ok:
            layer.failures, layer.catch_up = 0, False
            self.counters["refreshes"] += 1
            return
        layer.failures += 1
        self.counters["failed_refreshes"] += 1
        if layer.failures >= self.options.max_failures:
            raise RuntimeError(
                f"the preconditioner of layer '{layer.name}' failed to refresh {layer.failures} times in a row "
                "(non-finite statistics or a failed decomposition); increase `damping`, lower the learning rate "
                "or exclude the layer"
            )
        self._warn_once(
            layer,
            "refresh",
            f"refreshing the preconditioner of layer '{layer.name}' failed "
            "numerically; the last good preconditioner is kept",
        )

    def _preconditioned(self, layers: list[Layer]) -> list[tuple[Layer, Tensor, Tensor]]:
        """(layer, G, P·G) for every layer with a gradient and a preconditioner (here or on its owner rank)."""
        items = [(layer, g) for layer in layers if (g := layer.adapter.grad_matrix()) is not None]
        if self.plan is not None and self.plan.broadcast_gradients:
            outs = self.plan.precondition(items)
            self.counters["bytes_broadcast"] = self.plan.bytes
            return [(layer, g, out) for (layer, g), out in zip(items, outs, strict=True)]
        pre = [(lay, g, lay.preconditioner) for lay, g in items if lay.preconditioner.ready]
        return [(lay, g, factored.precondition(lay.kept, lay.name, p, g, self._probes)) for lay, g, p in pre]

    def _precondition(self, layers: list[Layer], optimizer: torch.optim.Optimizer | None, lr: float | None) -> None:
        stacks, alone = self._stacks.split(layers) if self.plan is None and world_size() == 1 else ([], layers)
        done = self._preconditioned(alone)
        o = self.options
        groups = optimizer.param_groups if optimizer is not None and o.kl_clip is not None else []
        lrs = {id(p): float(g["lr"]) for g in groups for p in g["params"]}
        default = lr if lr is not None else 1.0
        written = write_updates(
            [(layer.adapter, g, out) for layer, g, out in done],
            grafting=o.grafting,
            kl_clip=o.kl_clip,
            max_norm=o.max_update_norm,
            lrs=[lrs.get(id(layer.adapter.params[0]), default) for layer, _, _ in done],
            stacks=batched.precondition(stacks, lrs if o.kl_clip is not None else None, default),
        )
        self.last_kl_scale = written.kl_scale
        self.counters["preconditioned_steps"] += bool(done or stacks)
        batched.record(self._verdicts, [layer for layer, _, _ in done], stacks, written)

    def _settle(self) -> None:
        """Read the step's device-side verdicts in one transfer (the step's one host synchronisation); count and
        warn about what they say."""
        for kind, layer in self._verdicts.read():
            count, message = settled(kind, layer.name, self._scaled)
            self.counters[count] = self.counters.get(count, 0) + 1
            if message:
                self._warn_once(layer, kind, message)

    # -- reporting ------------------------------------------------------------------------------------
    def _warn_once(self, layer: Layer, kind: str, message: str) -> None:
        if kind not in layer.warned:
            layer.warned.add(kind)
            self.warn(message)

    def warn_once(self, key: str, message: str) -> None:
        """Warn the first time ``key`` is seen (diagnostics that degrade, such as a skipped measurement)."""
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    def plain_parameters(self) -> dict[str, str]:
        """Parameters that keep their plain gradient, with the reason."""
        return report.plain_parameters(self)

    def _report_plain(self) -> None:
        self._reported = report.report_plain(self)

    def freeze(self) -> None:
        """Stop collecting statistics and refreshing; remove the hooks. Preconditioning continues."""
        self.schedule.freeze(max(self._cycle, 0))
        self.capture.detach()
        for layer in self.layers.values():
            layer.preconditioner.discard_statistics()

    @property
    def timings(self) -> dict[str, float]:
        """Cumulative seconds in statistics, refresh and preconditioning (CUDA: read from events, a sync)."""
        return self._timer.read()

    @property
    def frozen(self) -> bool:
        return self.schedule.frozen

    def remove_hooks(self) -> None:  # what teardown calls; hooks come back only with a new manager
        self.wiring.end_census()  # a step that raised inside the census leaves it on
        self.capture.detach()

    # -- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (loadable with ``torch.load(weights_only=True)``); see ``engine.state``."""
        return state.manager_state(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        state.load_manager_state(self, saved)
        self._cycle = self.steps - 1
        self._reported = self.counters["refreshes"] > 0
