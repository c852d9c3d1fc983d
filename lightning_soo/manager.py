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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_soo.capture import Capture
from lightning_soo.damping import Damping, DampingFn, make_damping
from lightning_soo.discovery import discover
from lightning_soo.distributed import DistributedPlan, reduce_statistics, world_size
from lightning_soo.layers import LayerAdapter, WeightSharing
from lightning_soo.preconditioners import get_method
from lightning_soo.preconditioners.base import Preconditioner
from lightning_soo.schedule import ChangeMonitor, Schedule
from lightning_soo.sinks import grad_sink, input_sink
from lightning_soo.update import finite_updates, kl_scale, write_updates

LossReduction = Literal["mean", "sum"]
Grafting = Literal["sgd"]
Warn = Callable[[str], None]


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


@dataclass
class Layer:
    """One managed layer: its module, adapter, preconditioner and bookkeeping."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    preconditioner: Preconditioner
    failures: int = 0  # consecutive failed refreshes
    warned: set[str] = field(default_factory=set)


class PreconditionerManager:
    """Owns the per-layer preconditioners, the schedule and the damping, and rewrites gradients.

    Args:
        model: the model whose supported layers (Linear, Conv1d/2d/3d, Embedding) are preconditioned.
        method: ``"kfac"`` (more with the other methods) or a ``Preconditioner`` subclass.
        method_options: keyword arguments for the method's constructor (e.g. ``factor_decay``).
        damping: constant ``ρ``, ``fn(step, lr) -> ρ`` or a ``Damping`` rule such as ``ScaledDamping``.
        statistics_interval: collect statistics every this many steps.
        preconditioner_interval: refresh preconditioners every this many steps (None: only at step 0, then freeze).
            ``manager.schedule`` can be replaced by a ``Schedule`` with a frequent phase.
        exclude: module-name patterns (``fnmatch``) left to the plain gradient.
        weight_sharing: ``"expand"`` or ``"reduce"`` for sequence / spatial dimensions.
        loss_reduction: ``"mean"`` if the loss averages over examples (the 1/N is undone), ``"sum"`` otherwise.
        kl_clip: if set, scale all preconditioned gradients of a step by ``ν = min(1, √(kl_clip / Σ lr²⟨P·G, G⟩))``
            (the KL-clipping of kfac-pytorch), so a learning rate tuned for SGD cannot produce a huge step.
        grad_worker_fraction: under DDP, 1.0 broadcasts each refreshed preconditioner from its owner rank to all;
            1/world_size lets the owner alone precondition and broadcast ``P·G`` every step (see ``distributed``).
        max_update_norm: if set, each layer's preconditioned gradient is scaled down to at most this Frobenius norm
            (after KL clipping): a per-layer cap on exploding preconditioned steps.
        grafting: ``"sgd"`` rescales each layer's ``P·G`` to the Frobenius norm of ``G`` (layer-wise grafting:
            the preconditioner chooses the direction, the plain gradient the step length). None: off.
        freeze_tolerance: adaptive freeze: when the curvature statistics change by less than this (relative, between
            consecutive refreshes) ``freeze_patience`` refreshes in a row, the curvature is frozen. None: off.
        freeze_patience: see ``freeze_tolerance``.
        max_failures: consecutive failed refreshes of one layer before an error is raised.
        warn: where warnings go (the Lightning callbacks pass ``rank_zero_warn``).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | type[Preconditioner] = "kfac",
        method_options: dict[str, Any] | None = None,
        *,
        damping: float | DampingFn | Damping = 1e-2,
        statistics_interval: int = 1,
        preconditioner_interval: int | None = 10,
        exclude: Sequence[str] = (),
        weight_sharing: WeightSharing = "expand",
        loss_reduction: LossReduction = "mean",
        kl_clip: float | None = None,
        grad_worker_fraction: float = 1.0,
        max_update_norm: float | None = None,
        grafting: Grafting | None = None,
        freeze_tolerance: float | None = None,
        freeze_patience: int = 3,
        max_failures: int = 5,
        warn: Warn = _warn,
    ) -> None:
        self.method = get_method(method) if isinstance(method, str) else method
        self.method_options = dict(method_options or {})
        self.damping = make_damping(damping)
        self.schedule = Schedule(statistics_interval, preconditioner_interval)
        self.loss_reduction = loss_reduction
        self.max_failures = max_failures
        self.kl_clip = kl_clip
        self.grad_worker_fraction = grad_worker_fraction
        self.max_update_norm = max_update_norm
        self.grafting = grafting
        self.plan: DistributedPlan | None = None  # built at the first refresh under torch.distributed
        self.monitor = ChangeMonitor(freeze_tolerance, freeze_patience) if freeze_tolerance is not None else None
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
        self._processed: set[str] = set()
        self._reported = False
        self._opt_cache: dict[int, tuple[int, list[Layer]]] = {}
        self._build(model, exclude, weight_sharing)

    # -- construction -------------------------------------------------------------------------------------
    def _build(self, model: nn.Module, exclude: Sequence[str], weight_sharing: WeightSharing) -> None:
        adapters, self.skipped = discover(model, exclude, weight_sharing)
        self._known_params = {id(p) for p in model.parameters()}
        for name, adapter in adapters.items():
            w = adapter.module.weight
            dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
            pre = self.method.for_layer(adapter, dtype=dtype, device=w.device, **self.method_options)
            layer = Layer(name, adapter.module, adapter, pre)
            self.layers[name] = layer
            if pre.uses_hooks:
                self.capture.attach(
                    adapter.module,
                    input_sink(adapter, pre, self.timings),
                    grad_sink(adapter, pre, self.timings, self.loss_reduction == "mean"),
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

    def step(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        grad_scale: float = 1.0,
        lr: float | None = None,
    ) -> None:
        """Close statistics, refresh when due and precondition the gradients of ``optimizer``'s parameters
        (all managed layers when None).

        ``grad_scale`` maps captured output gradients to the loss's own: ``accumulation / loss_scale``.
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
            self._update(fresh, grad_scale, lr)
            self._processed.update(layer.name for layer in fresh)
        t0 = time.perf_counter()
        self._precondition(layers, optimizer, lr)
        self.timings["precondition"] += time.perf_counter() - t0
        if not self._reported and self.counters["refreshes"]:
            self._report_plain()

    def _update(self, layers: list[Layer], grad_scale: float, lr: float | None) -> None:
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
                closed = pre.close_statistics(grad_scale)
                if pre.notice:
                    self._warn_once(layer, "notice", f"layer '{layer.name}': {pre.notice}")
                    pre.notice = None
                if closed is False:
                    self.counters["skipped_statistics"] += 1
                    self._warn_once(
                        layer,
                        "stats",
                        f"non-finite statistics in layer '{layer.name}' were skipped "
                        "(expected now and then under fp16 loss scaling); the last good ones are kept",
                    )
            self.timings["statistics"] += time.perf_counter() - t0
        else:
            for layer in layers:
                layer.preconditioner.discard_statistics()
        if self.schedule.refreshes(step):
            t0 = time.perf_counter()
            damping = self.damping(step, lr, self.batch_size)
            self.last_damping = damping
            if world_size() > 1:  # each layer refreshed by its owner rank only
                if self.plan is None:
                    self.plan = DistributedPlan(list(self.layers.values()), self.grad_worker_fraction)
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
        if layer.failures >= self.max_failures:
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
        updates, failed = finite_updates([(layer.adapter, g, out) for layer, g, out in done], self.grafting)
        for index in failed:
            layer = done[index][0]
            self.counters["nonfinite_updates"] += 1
            self._warn_once(
                layer,
                "update",
                f"the preconditioned gradient of layer '{layer.name}' was not finite; its plain gradient was kept",
            )
        self.last_kl_scale = kl_scale(updates, self.kl_clip, optimizer, lr) if self.kl_clip and updates else 1.0
        self.counters["preconditioned_steps"] += bool(updates)
        capped = write_updates(updates, self.last_kl_scale, self.max_update_norm)
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
        """Plain tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "steps": self.steps,
            "last_damping": self.last_damping,
            "counters": dict(self.counters),
            "schedule": self.schedule.state_dict(),
            "monitor": self.monitor.state_dict() if self.monitor is not None else {},
            "layers": {name: layer.preconditioner.state_dict() for name, layer in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self._cycle = self.steps - 1
        self.last_damping = state.get("last_damping")
        self.counters.update(state.get("counters", {}))
        self.schedule.load_state_dict(state.get("schedule", {}))
        if self.monitor is not None:
            self.monitor.load_state_dict(state.get("monitor", {}))
        if self.schedule.frozen:
            self.capture.detach()
        missing = [name for name in state["layers"] if name not in self.layers]
        if missing:
            self.warn(f"checkpoint has preconditioner state for unknown layers {missing}; it was ignored")
        for name, layer_state in state["layers"].items():
            if name in self.layers:
                pre = self.layers[name].preconditioner
                pre.load_state_dict(layer_state)
                if not pre.ready and self.last_damping is not None:
                    pre.refresh(self.last_damping)  # saved by a rank that did not own this layer: rebuild it
        self._reported = self.counters["refreshes"] > 0
