"""How the manager wires capture: one ``Layer`` per discovered layer, its uses' sinks on the hooks, and the census
that leaves plain the layers whose weight is also used where capture cannot see it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_soo.capture import Capture, Census, discover
from lightning_soo.engine.layer import Layer, use_sink
from lightning_soo.options import StepOptions


@dataclass
class Wiring:
    """The managed layers of a model and how their statistics are captured."""

    model: nn.Module
    capture: Capture = field(default_factory=Capture)
    layers: dict[str, Layer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # parameter name -> "ModuleType: reason"
    excluded: dict[str, str] = field(default_factory=dict)  # parameter name -> "excluded by you"
    names: dict[int, str] = field(default_factory=dict)  # parameter id -> its (first) name
    census: Census | None = None

    def leave_plain(self, module: nn.Module, params: list[nn.Parameter], why: str) -> None:
        for p in params:
            self.skipped[self.names.get(id(p), "?")] = f"{type(module).__name__}: {why}"

    def param_name(self, p: nn.Parameter, default: str) -> str:
        return self.names.get(id(p), default)

    def open_step(self, collecting: bool, processed: set[str]) -> None:
        """A step begins: every layer collects (or none). Statistics a layer gathered in the last step without an
        optimizer step closing them (its parameters in no stepping optimizer) are dropped."""
        for layer in self.layers.values():
            if layer.collecting and layer.name not in processed:
                layer.preconditioner.discard_statistics()
            layer.collecting = collecting
        self.capture.active = collecting and self.capture.attached

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No statistics are captured inside (side passes); each layer's state is restored on exit."""
        was_active, collecting = self.capture.active, [lay for lay in self.layers.values() if lay.collecting]
        self.capture.active = False
        for layer in collecting:
            layer.collecting = False
        try:
            yield
        finally:
            self.capture.active = was_active
            for layer in collecting:
                layer.collecting = True

    # -- the census -----------------------------------------------------------------------------------
    def start_census(self) -> None:
        """Watch the calls of this statistics step (once) for uses of managed weights capture does not see."""
        owners: dict[int, set[int]] = {}
        for layer in self.layers.values():
            for p in layer.adapter.params:
                owners.setdefault(id(p), set()).update(id(use.module) for use in layer.uses)
        self.census = Census(self.model, owners)
        self.census.__enter__()

    def finish_census(self) -> bool:
        """Layers with a use capture cannot see keep their plain gradient (their statistics would be those of one
        use applied to the gradient of all). Returns whether a layer was removed."""
        census, self.census = self.census, None
        if census is None:
            return False
        census.__exit__(None, None, None)
        foreign = census.close()
        removed = False
        for name, layer in list(self.layers.items()):
            hit = next((foreign[id(p)] for p in layer.adapter.params if id(p) in foreign), None)
            if hit is not None:
                del self.layers[name]
                layer.collecting = False
                layer.preconditioner.discard_statistics()
                self.leave_plain(layer.module, layer.adapter.params, f"weight also used by {hit} outside its modules")
                removed = True
        return removed


def wire(model: nn.Module, method: Any, options: StepOptions, timings: dict[str, float]) -> Wiring:
    """Discover the layers of ``model``, build their preconditioners and attach the capture of their uses."""
    specs, skipped, excluded = discover(model, options.exclude, options.weight_sharing)
    wiring = Wiring(model, skipped=skipped, excluded=excluded)
    for pname, p in model.named_parameters(remove_duplicate=False):
        wiring.names.setdefault(id(p), pname)
    mean = options.loss_reduction == "mean"
    attention: dict[int, tuple[nn.Module, dict[int, Any]]] = {}  # attention module -> (module, {weight id: sink})
    for spec in specs:
        adapter = spec.adapter
        w = adapter.weight.param
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        tied = spec.transposed_uses and method.supports_transposed
        pre = method.for_layer(adapter, dtype=dtype, device=w.device, options=options, transposed_uses=tied)
        if spec.transposed_uses and pre.uses_hooks and not tied:
            why = f"weight tied in two orientations (embedding and head), not supported by {method.__name__}"
            wiring.leave_plain(spec.module, adapter.params, why)
            continue
        layer = Layer(spec.name, adapter.module, adapter, pre, uses=spec.uses)
        wiring.layers[spec.name] = layer
        if not pre.uses_hooks:
            continue
        for use in spec.uses:
            sink = use_sink(layer, use, timings, mean)
            if use.attention:
                attention.setdefault(id(use.module), (use.module, {}))[1][id(w)] = sink
            else:
                wiring.capture.attach(use.module, sink)
    for module, weights in attention.values():
        wiring.capture.attach_attention(module, weights)
    return wiring
