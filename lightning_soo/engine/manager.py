"""PreconditionerManager: per-layer preconditioners over a model, in plain PyTorch (no Lightning).

One optimizer step with a manager::

    manager.begin_step()          # before the forward pass: statistics are captured if the schedule says so
    loss.backward()
    manager.step(optimizer)       # close statistics, refresh when due, p.grad <- P·p.grad
    optimizer.step()

``begin_step`` may be called once per micro-batch (gradient accumulation): the step stays open until ``step``.
``step`` may be called several times per step (one call per optimizer, or a closure optimizer calling it per
closure): statistics are closed and preconditioners refreshed once per layer and step, gradients rewritten at
every call.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_soo.capture import Capture, discover
from lightning_soo.engine import state
from lightning_soo.engine.damping import make_damping
from lightning_soo.engine.distributed import DistributedPlan, reduce_statistics, world_size
from lightning_soo.engine.layer import Layer, grad_sink, input_sink
from lightning_soo.engine.postprocess import finite_updates, kl_scale, write_updates
from lightning_soo.engine.schedule import ChangeMonitor, Schedule
from lightning_soo.options import StepOptions
from lightning_soo.preconditioners import get_method
from lightning_soo.preconditioners.base import Preconditioner

Warn = Callable[[str], None]


def _warn(message: str) -> None:
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
        self.last_kl_scale = 1.0
        self.warn = warn
        self.capture = Capture()
        self.layers: dict[str, Layer] = {}
        self.skipped: dict[str, str] = {}  # parameter name -> reason it keeps its plain gradient
        self.steps = 0  # optimizer steps begun so far
        self.last_damping: float | None = None
        self.batch_size: int | None = None
        # preconditioned_steps: steps (optimizer calls) in which at least one gradient was rewritten
        names = ("refreshes", "failed_refreshes", "skipped_statistics", "nonfinite_updates", "preconditioned_steps")
        self.counters = dict.fromkeys(names, 0)
        self.timings = {"statistics": 0.0, "refresh": 0.0, "precondition": 0.0}  # seconds, cumulative
        self._cycle = -1  # index of the current (or last) step
        self._open = False
        self._collecting = False
        self._scaled = False  # the open step's statistics were captured under a GradScaler
        self._processed: set[str] = set()
        self._reported = False
        self._opt_cache: dict[int, tuple[int, list[Layer]]] = {}
        self._build(model)

    # -- construction -------------------------------------------------------------------------------------
    def _build(self, model: nn.Module) -> None:
        adapters, self.skipped = discover(model, self.options.exclude, self.options.weight_sharing)
        self._known_params = {id(p) for p in model.parameters()}
        for name, adapter in adapters.items():
            w = adapter.module.weight
            dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
            pre = self.method.for_layer(adapter, dtype=dtype, device=w.device, options=self.options)  # type: ignore[arg-type]
            layer = Layer(name, adapter.module, adapter, pre)
            self.layers[name] = layer
            if pre.uses_hooks:
                self.capture.attach(
                    adapter.module,
                    input_sink(adapter, pre, self.timings),
                    grad_sink(adapter, pre, self.timings, self.options.loss_reduction == "mean"),
                )

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
        self._processed.clear()
        if self.schedule.freezes(self._cycle) and not self.schedule.frozen:
            self.freeze()
        self._collecting = self.schedule.collects(self._cycle)
        self.capture.active = self._collecting and self.capture.attached

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
        """Close statistics, refresh when due and precondition the gradients of ``optimizer``'s parameters
        (all managed layers when None). Call it after the gradients are final and unscaled
        (``scaler.unscale_(optimizer)`` first under fp16), right before ``optimizer.step``.

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
            self.capture.active = False
        if self._cycle < 0:
            raise RuntimeError("PreconditionerManager.step() called before begin_step()")
        if lr is None and optimizer is not None and optimizer.param_groups:
            lr = float(optimizer.param_groups[0]["lr"])
        layers = self._layers_of(optimizer)
        fresh = [layer for layer in layers if layer.name not in self._processed]
        if fresh:
            self._update(fresh, self._output_scale(accumulation, grad_scaler), lr)
            self._processed.update(layer.name for layer in fresh)
        t0 = time.perf_counter()
        self._precondition(layers, optimizer, lr)
        self.timings["precondition"] += time.perf_counter() - t0
        if not self._reported and self.counters["refreshes"]:
            self._report_plain()

    def _output_scale(self, accumulation: int, grad_scaler: Any) -> float:
        """``accumulation / loss_scale``: what maps this step's captured output gradients (the 1/N of a mean loss
        already undone by the hooks) to per-example gradients of the loss; see ``engine.layer``."""
        self._scaled = grad_scaler is not None and grad_scaler.is_enabled()
        if not self._collecting:
            return 1.0  # nothing captured: no need to read the scale (a device sync)
        return accumulation / float(grad_scaler.get_scale()) if self._scaled else float(accumulation)

    # -- the public contract for schedulers -------------------------------------------------------------
    def set_schedule(
        self,
        *,
        frequent_steps: int = 0,
        frequent_interval: int | None = None,
        preconditioner_interval: int | None,
        statistics_interval: int | None = None,
    ) -> None:
        """Replace the refresh schedule (the seed's Table 1 shape): every ``frequent_interval`` steps for the first
        ``frequent_steps`` steps, then every ``preconditioner_interval`` steps or never (None: frozen)."""
        statistics = statistics_interval or self.schedule.statistics_interval
        schedule = Schedule(
            statistics, preconditioner_interval, frequent_interval=frequent_interval, frequent_steps=frequent_steps
        )
        schedule.load_state_dict(self.schedule.state_dict())  # a freeze already made stays
        self.schedule = schedule

    def enable_adaptive_freeze(self, tolerance: float, patience: int) -> None:
        """Freeze once the curvature statistics change by less than ``tolerance`` (relative, between refreshes)
        for ``patience`` refreshes in a row; kept if one is already on."""
        if self.monitor is None:
            self.monitor = ChangeMonitor(tolerance, patience)

    @contextmanager
    def capture_paused(self) -> Iterator[None]:
        """No statistics are captured inside (side passes such as the quality measurement)."""
        was_active = self.capture.active
        self.capture.active = False
        try:
            yield
        finally:
            self.capture.active = was_active

    def _update(self, layers: list[Layer], output_scale: float, lr: float | None) -> None:
        step = self._cycle
        if self._collecting:
            t0 = time.perf_counter()
            if world_size() > 1:
                self.counters["bytes_reduced"] = self.counters.get("bytes_reduced", 0) + reduce_statistics(layers)
            for layer in layers:
                pre = layer.preconditioner
                if pre.uses_grad:
                    g = layer.adapter.grad_matrix()
                    if g is not None:
                        pre.observe_grad(g.to(pre.dtype))
                closed = pre.close_statistics(output_scale)
                if pre.notice:
                    self._warn_once(layer, "notice", f"layer '{layer.name}': {pre.notice}")
                    pre.notice = None
                if closed is False:
                    self.counters["skipped_statistics"] += 1
                    why = (
                        "expected now and then under fp16 loss scaling, on the steps the GradScaler skips"
                        if self._scaled
                        else "the layer's inputs or output gradients held NaN or Inf: check the loss and learning rate"
                    )
                    self._warn_once(
                        layer,
                        "stats",
                        f"non-finite statistics in layer '{layer.name}' were skipped ({why}); "
                        "the last good ones are kept",
                    )
            self.timings["statistics"] += time.perf_counter() - t0
        else:
            for layer in layers:
                layer.preconditioner.discard_statistics()
        if self.schedule.refreshes(step):
            t0 = time.perf_counter()
            damping = self.damping(step, lr, self.batch_size) if self.damping is not None else 0.0
            self.last_damping = damping if self.damping is not None else None
            if world_size() > 1:  # each layer refreshed by its owner rank only
                if self.plan is None:
                    self.plan = DistributedPlan(list(self.layers.values()), self.options.grad_worker_fraction)
                self.plan.refresh(layers, lambda layer: self._refresh(layer, damping))
                self.counters["bytes_broadcast"] = self.plan.bytes
            else:
                for layer in layers:
                    self._refresh(layer, damping)
            if self.monitor is not None:
                self._watch_change(layers)
            self.timings["refresh"] += time.perf_counter() - t0

    def _watch_change(self, layers: list[Layer]) -> None:
        """Adaptive freeze: freeze once the curvature stopped changing."""
        assert self.monitor is not None
        states = {layer.name: layer.preconditioner.curvature_state() for layer in layers}
        if self.monitor.observe(states):
            self.freeze()

    def _refresh(self, layer: Layer, damping: float) -> None:
        ok = layer.preconditioner.refresh(damping)
        if ok is None:
            return
        if ok:
            layer.failures = 0
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
        return [(layer, g, layer.preconditioner.precondition(g)) for layer, g in items if layer.preconditioner.ready]

    def _precondition(self, layers: list[Layer], optimizer: torch.optim.Optimizer | None, lr: float | None) -> None:
        done = self._preconditioned(layers)
        o = self.options
        updates, failed = finite_updates([(layer.adapter, g, out) for layer, g, out in done], o.grafting)
        for index in failed:
            layer = done[index][0]
            self.counters["nonfinite_updates"] += 1
            self._warn_once(
                layer,
                "update",
                f"the preconditioned gradient of layer '{layer.name}' was not finite; its plain gradient was kept",
            )
        self.last_kl_scale = kl_scale(updates, o.kl_clip, optimizer, lr) if o.kl_clip and updates else 1.0
        self.counters["preconditioned_steps"] += bool(updates)
        capped = write_updates(updates, self.last_kl_scale, o.max_update_norm)
        if capped:
            self.counters["capped_updates"] = self.counters.get("capped_updates", 0) + capped

    def _layers_of(self, optimizer: torch.optim.Optimizer | None) -> list[Layer]:
        if optimizer is None:
            return list(self.layers.values())
        ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
        cached = self._opt_cache.get(id(optimizer))
        if cached is not None and cached[0] == len(ids):
            return cached[1]
        idset = set(ids)
        unknown = idset - self._known_params
        if unknown:
            self._known_params |= unknown
            self.warn(
                f"{len(unknown)} parameter tensor(s) of the optimizer were not in the model when the preconditioner "
                "was set up (modules added later); they keep their plain gradient"
            )
        layers = [lay for lay in self.layers.values() if all(id(p) in idset for p in lay.adapter.params)]
        self._opt_cache[id(optimizer)] = (len(ids), layers)
        return layers

    # -- reporting ------------------------------------------------------------------------------------
    def _warn_once(self, layer: Layer, kind: str, message: str) -> None:
        if kind not in layer.warned:
            layer.warned.add(kind)
            self.warn(message)

    def plain_parameters(self) -> dict[str, str]:
        """Parameters that keep their plain gradient, with the reason."""
        plain = dict(self.skipped)
        for layer in self.layers.values():
            elsewhere = self.plan is not None and self.plan.broadcast_gradients and not self.plan.owns(layer)
            if not layer.preconditioner.ready and not elsewhere:
                for pname, _p in layer.module.named_parameters(recurse=False):
                    plain.setdefault(f"{layer.name}.{pname}", "no statistics captured (its forward never ran)")
        return plain

    def _report_plain(self) -> None:
        self._reported = True
        plain = self.plain_parameters()
        if plain:
            lines = "\n".join(f"  {name}: {why}" for name, why in sorted(plain.items()))
            self.warn(f"{len(plain)} parameter(s) keep their plain gradient (not preconditioned):\n{lines}")

    def freeze(self) -> None:
        """Stop collecting statistics and refreshing; remove the hooks. Preconditioning continues."""
        self.schedule.freeze(max(self._cycle, 0))
        self.capture.detach()
        for layer in self.layers.values():
            layer.preconditioner.discard_statistics()

    @property
    def frozen(self) -> bool:
        return self.schedule.frozen

    def remove_hooks(self) -> None:
        self.capture.detach()

    # -- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (loadable with ``torch.load(weights_only=True)``); see ``engine.state``."""
        return state.manager_state(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        state.load_manager_state(self, saved)
        self._cycle = self.steps - 1
        self._reported = self.counters["refreshes"] > 0
