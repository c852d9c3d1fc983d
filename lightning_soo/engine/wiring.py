"""How the manager wires capture: one ``Layer`` per discovered layer, its uses' sinks on the hooks, and the census
that adds the ``F.linear`` calls of managed weights made outside their modules, or leaves plain the layers whose
weight is also used where capture cannot see it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_soo.capture import Capture, Census, LayerAdapter, discover
from lightning_soo.capture.calls import function_name, overridden_base
from lightning_soo.capture.discovery import functional_use, unmatched_patterns
from lightning_soo.engine.examples import LossExamples
from lightning_soo.engine.layer import Layer, use_sink
from lightning_soo.options import StepOptions

_BROADCAST_WHY = (
    "its output is broadcast along the batch ({}; a position embedding called on the positions alone, say): each "
    "of its rows' output gradients is a sum over examples, so its statistics cannot be per example"
)


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
    _stance: Any = None  # the compiler's stance set for the census step (eager), restored when it closes
    # censuses run, the managed parameters frozen at the last one, whether it saw a batch of one
    _census_runs: tuple[int, list[nn.Parameter], bool] = field(default_factory=lambda: (0, [], False))
    method: Any = None  # the preconditioner class, its options, the timings and the loss reduction: for rewiring
    options: StepOptions | None = None
    timings: dict[str, float] = field(default_factory=dict)
    mean: bool = True
    examples: LossExamples = field(default_factory=LossExamples)  # the loss's N of the current backward pass
    calls: dict[str, list[str]] = field(default_factory=dict)  # layer -> modules whose F.linear calls are its uses
    unseen: dict[str, list[bool]] = field(default_factory=dict)  # layer -> per added call use: seen firing yet?
    own_seen: dict[int, list[bool]] = field(default_factory=dict)  # module id -> its own call seen (overridden)

    def setup_warning(self, method: str) -> str:
        """What to say at set-up when ``method`` preconditions nothing (no layer), or nothing trainable (every layer
        frozen: litgpt's LoRA adapters are bare parameters capture cannot see); "" otherwise."""
        model = self.model
        if not self.layers:
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.skipped.items())[:8]) or "none"
            return f"{type(model).__name__} has no layer {method} can precondition (skipped: {why})"
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable or any(all(p.requires_grad for p in lay.adapter.params) for lay in self.layers.values()):
            return ""
        plain = {name: why for name, why in self.skipped.items() if not why.startswith("frozen")}
        why = "; ".join(f"{name}: {reason}" for name, reason in sorted(plain.items())[:8]) or "none"
        return (
            f"{method} preconditions none of the trainable parameters of {type(model).__name__}: its "
            f"{len(self.layers)} layer(s) are frozen (preconditioned once unfrozen), and the {len(trainable)} "
            f"trainable parameter tensor(s) keep their plain gradient ({why})"
        )

    def setup_warnings(self, method: str) -> list[str]:
        """What to say once the model is wired: ``setup_warning`` and ``exclude_warning``, those that say something."""
        return [m for m in (self.setup_warning(method), self.exclude_warning()) if m]

    def exclude_warning(self) -> str:
        """What to say at set-up about ``exclude`` patterns that match no module or parameter (a typo excludes
        nothing, silently otherwise); "" when each matches something."""
        patterns = self.options.exclude if self.options is not None else ()
        unmatched = unmatched_patterns(self.model, patterns)
        if not unmatched:
            return ""
        return f"exclude pattern(s) {unmatched} match no module or parameter name of {type(self.model).__name__}"

    def leave_plain(self, module: nn.Module, params: list[nn.Parameter], why: str) -> None:
        for p in params:
            self.skipped[self.names.get(id(p), "?")] = f"{type(module).__name__}: {why}"

    def param_name(self, p: nn.Parameter, default: str) -> str:
        return self.names.get(id(p), default)

    def open_step(self, collecting: bool, processed: set[str], read: bool = True) -> None:
        """A step begins: every layer collects (or none), except a layer whose refresh reads only the latest
        statistics (``running_statistics`` False) when no refresh reads this step's (``read``), unless it waits to
        catch up. Statistics a layer gathered in the last step without an optimizer step closing them (its
        parameters in no stepping optimizer) are dropped."""
        for layer in self.layers.values():
            if layer.collecting and layer.name not in processed:
                layer.preconditioner.discard_statistics()
            layer.collecting = collecting and (
                read or layer.catch_up or layer.retry or layer.preconditioner.running_statistics
            )
            layer.kept.forget()
        self.capture.active = self.capture.attached and any(layer.collecting for layer in self.layers.values())

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
    def census_wanted(self, batch_size: int | None) -> bool:
        """Whether this statistics step runs the census: the first, and again once a parameter of a managed layer
        frozen at the last census is trainable (a call with a frozen weight makes an output without grad, which it
        does not see), or once a batch of several examples follows a census on one (no broadcast along the batch
        can show in a batch of one)."""
        runs, frozen, single = self._census_runs
        if runs and not any(p.requires_grad for p in frozen) and not (single and batch_size and batch_size > 1):
            return False  # the usual step: nothing frozen at the census, so nothing to look at
        frozen = [p for lay in self.layers.values() for p in lay.adapter.params if not p.requires_grad]
        self._census_runs = (runs + 1, frozen, batch_size == 1)
        return True

    def start_census(self, batch_size: int | None = None) -> None:
        """Watch the calls of this statistics step (once) for uses of managed weights capture does not see."""
        owners: dict[int, set[int]] = {}
        for layer in self.layers.values():
            for p in layer.adapter.params:
                owners.setdefault(id(p), set()).update(id(use.module) for use in layer.uses)
        own = {id(use.module): use.module for layer in self.layers.values() for use in layer.uses if use.own}
        biases = {
            id(lay.adapter.weight.param): id(lay.adapter.bias.param)
            for lay in self.layers.values()
            if lay.adapter.bias is not None and lay.adapter.bias.rows is None and not lay.adapter.transposed
        }
        experts = {id(lay.adapter.weight.param) for lay in self.layers.values() if _expert(lay.adapter)}
        stored = {id(lay.adapter.weight.param) for lay in self.layers.values() if _expert(lay.adapter)
                  and lay.adapter.transposed}  # fmt: skip
        paired = {id(lay.adapter.bias.param): id(lay.adapter.weight.param) for lay in self.layers.values()
                  if _expert(lay.adapter) and lay.adapter.bias is not None}  # fmt: skip
        self.census = Census(self.model, owners, batch_size, own, biases, experts, stored, paired)
        # a compiled model runs this step eagerly: Dynamo tracing the census's Python fails on some models (ConvNeXt:
        # ``___get_torch_function_mode_stack_at``). Not with nn.MultiheadAttention: the replaced
        # ``linear`` its functional code calls is seen under Dynamo only when the first trace has the census's mode
        set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        attention = any(isinstance(u.module, nn.MultiheadAttention) for lay in self.layers.values() for u in lay.uses)
        self._stance = set_stance("force_eager") if set_stance is not None and not attention else None
        self.census.__enter__()

    def end_census(self) -> Census | None:
        """Take the census down (its mode, global hooks and the compiler's stance), if one is on; returns it."""
        census, self.census = self.census, None
        if census is None:
            return None
        census.__exit__(None, None, None)
        if self._stance is not None:
            self._stance.__exit__(None, None, None)  # the stance before the census
            self._stance = None
        census.close()
        return census

    def finish_census(self) -> bool:
        """Add the ``F.linear`` calls the census found as uses of their layers (captured from the next statistics
        step; this step's statistics of those layers, missing the calls, are dropped); a layer with another use
        capture cannot see keeps its plain gradient (its statistics would be those of one use applied to the
        gradient of all). Returns whether a layer was removed."""
        census = self.end_census()
        if census is None:
            return False
        foreign = census.foreign
        self.capture.by_forward |= census.forward_form  # from now on captured by their forward hooks
        removed = False
        for name, layer in list(self.layers.items()):
            own_why = self._own_calls_why(layer, census)
            if own_why:
                del self.layers[name]
                layer.collecting = False
                layer.preconditioner.discard_statistics()
                self.leave_plain(layer.module, layer.adapter.params, own_why)
                removed = True
                continue
            spread = census.broadcast.get(id(layer.adapter.weight.param))
            if spread is not None:  # no per-example rows exist to build statistics from
                del self.layers[name]
                layer.collecting = False
                layer.preconditioner.discard_statistics()
                self.leave_plain(layer.module, layer.adapter.params, _BROADCAST_WHY.format(spread))
                removed = True
                continue
            hit = next((foreign[id(p)] for p in layer.adapter.params if id(p) in foreign), None)
            if hit is None:
                continue
            layer.collecting = False
            layer.preconditioner.discard_statistics()
            why = self._add_calls(layer, census.calls.get(id(layer.adapter.weight.param), {}))
            if why is not None:
                del self.layers[name]
                self.leave_plain(layer.module, layer.adapter.params, f"weight also used by {hit} outside its modules"
                                 + (f" ({why})" if why else ""))  # fmt: skip
                removed = True
        return removed

    def _own_calls_why(self, layer: Layer, census: Census) -> str:
        """Why a layer whose class overrides forward cannot be captured at its own functional call ("": it can):
        its weight or bias is used another way inside (Whisper's positions sliced from the weight, a weight
        computed first), or the call made is not the one capture replaces (bound by name)."""
        if not any(use.own for use in layer.uses):
            return ""
        base = overridden_base(layer.module)
        kind = base.__name__ if base is not None else type(layer.module).__name__
        hit = next((census.unmatched[id(p)] for p in layer.adapter.params if id(p) in census.unmatched), None)
        if hit is not None and _expert(layer.adapter):
            return (
                "a 3-d parameter whose experts are linear layers only where it is used as F.linear(x, p[e]) on one "
                "expert's slice, with no bias, or as grouped_mm(x, p.transpose(-2, -1), offs=offs) on rows sorted by "
                "expert (grouped_mm(x, p, offs=offs) where it is stored (E, in, out), each row's expert bias b[ids] "
                f"added after), in {kind}.forward; it is also used another way (`{hit}`)"
            )
        bias = ", self.bias" if layer.adapter.has_bias else ""
        linear = function_name(layer.module) == "linear"
        product = f" or x @ self.weight.T{' + self.bias' if bias else ''}" if linear else ""
        if hit is not None and base is None:
            return (
                f"{kind}.forward uses its weight or bias other than through F.linear(x, self.weight{bias}){product} "
                f"(`{hit}`): not a linear layer capture can see"
            )
        if hit is not None:
            return (
                f"its class overrides {kind}.forward, which uses its weight or bias other than through the "
                f"F.{function_name(layer.module)} call {kind}.forward makes with its settings{product} (`{hit}`): "
                "capture would not see the layer's own computation"
            )
        if any(id(u.module) in census.own_seen and not self.own_seen[id(u.module)][0] for u in layer.uses if u.own):
            return (
                f"{f'its class overrides {kind}.forward and ' if base is not None else f'{kind}.forward '}makes its "
                f"F.{function_name(layer.module)} call through a name bound before the model was built"
                f"{', or its product as x.matmul(w.T)' if product else ''}, which capture does not see"
            )
        return ""

    def _add_calls(self, layer: Layer, modules: dict[int, nn.Module]) -> str | None:
        """Capture ``F.linear(x, weight)`` inside each of ``modules``' forwards as uses of ``layer``; the reason it
        cannot be done ("" when there are other uses than such calls), or None once done."""
        known = {id(use.module) for use in layer.uses if use.calls}  # added by an earlier census
        if modules and all(id(m) in known for m in modules.values()):
            return None
        uses = [functional_use(layer.adapter, m) for m in modules.values() if id(m) not in known]
        if not uses:
            return ""
        if any(use is None for use in uses):
            return "a call capture cannot join to this layer's statistics"
        transposed = any(use.role == "transposed" for use in uses if use is not None)
        if transposed and not layer.preconditioner.transposed_uses:
            if not self.method.supports_transposed:
                return f"in the swapped orientation, not supported by {self.method.__name__}"
            w = layer.adapter.weight.param
            old = layer.preconditioner
            layer.preconditioner = self.method.for_layer(
                layer.adapter, dtype=old.dtype, device=w.device, options=self.options, transposed_uses=True
            )
        layer.catch_up = True
        names = {id(m): name for name, m in self.model.named_modules(remove_duplicate=False)}
        self.calls.setdefault(layer.name, []).extend(names[id(use.module)] for use in uses if use is not None)
        owners = [use.module for use in layer.uses]
        seen = self.unseen.setdefault(layer.name, [])
        for use in uses:
            assert use is not None
            layer.uses.append(use)
            seen.append(False)
            sink = _watched(use_sink(layer, use, self.timings, self.mean, self.examples), seen, len(seen) - 1)
            self.capture.attach_calls(use.module, {id(layer.adapter.weight.param): sink}, outside=owners)
        return None

    def check_calls(self) -> bool:
        """At the close of the first statistics step after call uses were added: a layer whose calls never reached
        capture (``F.linear`` bound by name before the model was built, so the patched attribute is not the one
        called) keeps its plain gradient, its statistics being those of its other uses only. Returns whether a
        layer was removed."""
        removed = False
        for name, seen in list(self.unseen.items()):
            layer = self.layers.get(name)
            if layer is None or not layer.collecting:
                continue  # not a statistics step for it yet
            del self.unseen[name]
            if all(seen):
                continue
            del self.layers[name]
            layer.collecting = False
            layer.preconditioner.discard_statistics()
            why = "weight also used by an F.linear call outside its modules that capture does not see"
            self.leave_plain(layer.module, layer.adapter.params, why)
            removed = True
        return removed

    def restore_calls(self, calls: dict[str, list[str]]) -> None:
        """Add the call uses a checkpoint's census found (``calls``), before its layers' state is loaded."""
        for name, modules in calls.items():
            layer = self.layers.get(name)
            if layer is not None and name not in self.calls:
                self._add_calls(layer, {i: self.model.get_submodule(m) for i, m in enumerate(modules)})


def _watched(on_call: Any, seen: list[bool], i: int) -> Any:
    """``on_call`` that records, in ``seen[i]``, that the call reached capture."""

    def watched(x: torch.Tensor, rows: slice | None) -> Any:
        seen[i] = True
        return on_call(x, rows)

    return watched


def wire(model: nn.Module, method: Any, options: StepOptions, timings: dict[str, float]) -> Wiring:
    """Discover the layers of ``model``, build their preconditioners and attach the capture of their uses."""
    specs, skipped, excluded = discover(model, options.exclude, options.weight_sharing, options.max_conv_groups)
    wiring = Wiring(
        model, skipped=skipped, excluded=excluded, method=method, options=options, timings=timings,
        mean=options.loss_reduction == "mean",
    )  # fmt: skip
    for pname, p in model.named_parameters(remove_duplicate=False):
        wiring.names.setdefault(id(p), pname)
    mean = wiring.mean
    # a module whose functional calls are captured -> (module, function, own, {weight id: sink}): attention, and
    # subclasses overriding forward (their own call)
    attention: dict[int, tuple[nn.Module, str, bool, dict[int, Any]]] = {}
    experts: dict[int, tuple[nn.Module, dict[int, dict[int, Any]]]] = {}  # module -> 3-d parameter -> expert -> sink
    for spec in specs:
        adapter = spec.adapter
        w = adapter.weight.param
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        tied = spec.transposed_uses and method.supports_transposed
        pre = method.for_layer(adapter, dtype=dtype, device=w.device, options=options, transposed_uses=tied)
        if adapter.hooks_only and not pre.uses_hooks:  # a convolution's group: the whole layer is another spec
            continue
        if adapter.hooks_refused and pre.uses_hooks:
            if not adapter.split_for_hooks:  # else its groups are layers of their own
                wiring.leave_plain(spec.module, adapter.params, adapter.hooks_refused)
            continue
        if adapter.vector and not options.precondition_vectors:
            why = "a vector outside the layers capture knows (precondition_vectors=True has it preconditioned)"
            wiring.leave_plain(spec.module, adapter.params, why)
            continue
        if spec.transposed_uses and pre.uses_hooks and not tied:
            why = f"weight tied in two orientations (embedding and head), not supported by {method.__name__}"
            wiring.leave_plain(spec.module, adapter.params, why)
            continue
        layer = Layer(spec.name, adapter.module, adapter, pre, uses=spec.uses)
        wiring.layers[spec.name] = layer
        if not pre.uses_hooks:
            continue
        for use in spec.uses:
            sink = use_sink(layer, use, timings, mean, wiring.examples)
            if use.own:
                sink = _watched(sink, wiring.own_seen.setdefault(id(use.module), [False]), 0)
            if isinstance(e := adapter.weight.rows, int):  # one expert of a 3-d parameter
                experts.setdefault(id(use.module), (use.module, {}))[1].setdefault(id(w), {})[e] = sink
            elif use.calls:
                fn = function_name(use.module) if use.own else "linear"
                attention.setdefault(id(use.module), (use.module, fn, use.own, {}))[3][id(w)] = sink
            else:
                wiring.capture.attach(use.module, sink)
    for module, function, own, weights in attention.values():
        wiring.capture.attach_calls(module, weights, function=function, own=own)
    stored = {id(s.adapter.weight.param) for s in specs if _expert(s.adapter) and s.adapter.transposed}
    for module, sinks in experts.values():
        wiring.capture.attach_calls(module, {}, experts=sinks, transposed=stored)
    return wiring


def _expert(adapter: LayerAdapter) -> bool:
    """The layer is one expert ``p[e]`` of a 3-d parameter."""
    return isinstance(adapter.weight.rows, int)
