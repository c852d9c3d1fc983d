"""The managed-layer record, and what the capture hooks do with its data: turn one call into rows and fold them
into the layer's statistics (float32, float64 for float64 models; outside autocast; timed; never traced by
``torch.compile``).

Everything happens in the backward pass: the forward hook keeps a reference to the call's input (the tensor autograd
already saves for the weight gradient of a linear layer: no extra memory) and the output-gradient hook forms both
statistics from it, so the rows a call contributes can depend on the output gradient (the padding rule of
``capture.adapters``: rows whose output gradient is exactly zero are not examples).

Normalisation of the output gradients happens in two steps, both named here. Autograd hands the hooks
``δ = ∂(loss · s)/∂output`` with ``s = 1 / (N · accumulation) · loss_scale`` for a mean loss. The sink undoes
the ``1/N`` of a mean loss (``N`` counted from the rows the adapter makes, known only at hook time). The rest,
``output_scale = accumulation / loss_scale``, is the same for every layer of a step and known only when the step
closes (the loss scale of a ``GradScaler``); the manager passes it to ``Preconditioner.close_statistics``, where
each method applies it to the statistics it kept as their degree in ``δ`` says.

Capture is per layer: ``Layer.collecting`` is set for every layer when a statistics step begins and cleared when
that layer's statistics are closed (the ``step`` of the optimizer that owns it), so with several optimizers
(a GAN) each network's statistics come from the passes of the batch up to its own optimizer step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_soo.capture.adapters import Conv1DAdapter, IndexRows, LayerAdapter, LinearAdapter, Observation
from lightning_soo.capture.discovery import Use
from lightning_soo.capture.hooks import GradCallback, OnCall
from lightning_soo.capture.rows import Count, RowCount, count_tensor
from lightning_soo.engine import factored
from lightning_soo.engine.examples import LossExamples, add_counts, missed_count
from lightning_soo.engine.postprocess import mixed_lrs
from lightning_soo.linalg import host_decides
from lightning_soo.preconditioners.base import Preconditioner


@dataclass
class Layer:
    """One managed layer: its module, adapter, preconditioner and bookkeeping."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    preconditioner: Preconditioner
    uses: list[Use] = field(default_factory=list)
    failures: int = 0  # consecutive failed refreshes
    warned: set[str] = field(default_factory=set)
    collecting: bool = False  # statistics of the open step are being captured for this layer
    catch_up: bool = False  # refresh at the next statistics step, even off schedule (uses added by the census)
    retry: bool = False  # no preconditioner after a scheduled refresh: refreshed at the next statistics step (once)
    retried: bool = False
    seen: bool = False  # a call's output gradient reached the hooks (tells a layer never run from one with no rows)
    kept: factored.Kept = field(default_factory=factored.Kept)  # rows for a cheaper product (``engine.factored``)
    passes: int = 0  # the last backward pass (``LossExamples.passes``) whose examples its statistics counted
    own_count: bool = False  # its calls have more rows than the head: they keep their own count (``engine.examples``)
    counted: Count = 0  # the loss's examples of the passes it was called in since its statistics last closed
    step_passes: int = 0  # how many of those passes

    def unready_reason(self) -> str:
        """Why this layer has no preconditioner yet, for the report of parameters that keep their plain gradient."""
        why = (
            "no preconditioner yet: every output-gradient row was exactly zero, so no example was counted (dead "
            "units below, or a branch the loss does not reach), or its refreshes failed"
            if self.seen
            else "no statistics captured (its forward never ran)"
        )
        return f"{type(self.module).__name__}: {why}"


class OptimizerLayers:
    """Which managed layers an optimizer steps (all of a layer's parameters in its groups), cached per optimizer;
    parameters that were not in the model at set-up are named once in a warning (they keep their plain gradient)."""

    def __init__(self, model: nn.Module, warn: Callable[[str], None], check_lrs: bool = False) -> None:
        self._model = model
        self._check_lrs = check_lrs  # under a KL clip: say once when a layer's parameters step at different rates
        self._known = {id(p) for p in model.parameters()}
        self._warn = warn
        self._cache: dict[int, tuple[int, list[Layer]]] = {}

    def clear(self) -> None:
        """Forget the cached layer lists (the managed layers changed)."""
        self._cache.clear()

    def layers_of(self, optimizer: torch.optim.Optimizer | None, layers: dict[str, Layer]) -> list[Layer]:
        if optimizer is None:
            return list(layers.values())
        ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
        cached = self._cache.get(id(optimizer))
        if cached is not None and cached[0] == len(ids):
            return cached[1]
        idset = set(ids)
        unknown = idset - self._known
        if unknown:
            self._known |= unknown
            names = [n for n, p in self._model.named_parameters() if id(p) in unknown]
            listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            outside = len(unknown) - len(names)
            listed += f"{', ' if names else ''}{outside} not in the model now" if outside else ""
            self._warn(
                f"{len(unknown)} parameter tensor(s) of the optimizer were not in the model when the preconditioner "
                f"was set up (modules added later): {listed}; they keep their plain gradient"
            )
        mine = [layer for layer in layers.values() if all(id(p) in idset for p in layer.adapter.params)]
        if self._check_lrs and (
            mixed := mixed_lrs(mine, {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]})
        ):
            self._check_lrs = False
            self._warn(mixed)
        self._cache[id(optimizer)] = (len(ids), mine)
        return mine


class _no_autocast:
    """Disable autocast around statistics (fp32 maths) only when it is on: the check is cheaper than the context."""

    def __init__(self, x: Tensor) -> None:
        self.device_type = x.device.type
        self.ctx: Any = None

    def __enter__(self) -> None:
        if torch.is_autocast_enabled(self.device_type):
            self.ctx = torch.autocast(self.device_type, enabled=False)
            self.ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _fit(obs: Observation, shape: tuple[int, int], rows: slice | None, transposed: bool) -> Observation:
    """Place one call's rows in the layer's coordinates: the output-gradient columns of a row block, and a zero
    bias column for a call without the layer's bias. That column is on the layer's input side: the inputs' of a
    use in the layer's orientation, the output gradients' of one in the swapped orientation (a tied embedding
    after its head with a bias: the embedding's gradient has no part in the head's bias)."""
    d_out, d_in = (shape[1], shape[0]) if transposed else shape
    d, h = obs.d, obs.h
    short = not isinstance(h, IndexRows) and h.shape[1] < d_in
    if not short and d.shape[1] == d_out:
        return obs
    if d.shape[1] != d_out:  # a row block's columns, or the swapped orientation's missing bias column (the last)
        full = d.new_zeros(d.shape[0], d_out)
        full[:, rows if rows is not None else slice(0, d.shape[1])] = d
        d = full
    if short and not isinstance(h, IndexRows):
        h = torch.cat([h, h.new_zeros(h.shape[0], d_in - h.shape[1])], dim=1)
    return dataclasses.replace(obs, h=h, d=d)


_DENSE = (LinearAdapter, Conv1DAdapter)


def _fast(layer: Layer, use: Use, x: Tensor, g: Tensor) -> bool:
    """The usual call, which the method takes in a few lines (``Preconditioner.observe_dense``): a linear layer's own
    use, float rows of the statistics' dtype, outside autocast, its positions as further rows, and the method ready
    (the step's first call)."""
    adapter = use.rows
    return (
        layer.preconditioner.dense_ready()  # first: a method without the path pays one call
        and adapter is layer.adapter
        and type(adapter) in _DENSE  # a linear layer's rows: ``nn.Linear``, Hugging Face's ``Conv1D``
        and use.role == "normal"
        and x.dtype == g.dtype == layer.preconditioner.dtype
        and (x.dim() == 2 or adapter.weight_sharing != "reduce")
        and not torch.is_autocast_enabled(g.device.type)
    )


def _fold(
    layer: Layer,
    use: Use,
    x: Tensor,
    g: Tensor,
    rows: slice | None,
    mean: bool,
    timings: dict[str, float],
    examples: LossExamples | None,
) -> None:
    """Fold one call's statistics into ``layer`` (in the backward pass). The usual call goes to the method's
    ``observe_dense`` in a few lines, where every line of Python shows (the hook runs once per layer and step,
    inside the backward pass: a K-FAC call on the deep MLP of width 128 took 337 µs in place against the general
    path's 373); the others, and a batch with padding decided on the host, the general way. ``examples``: the
    loss's ``N`` replaces the call's own count of examples (``engine.examples``)."""
    if not layer.collecting:
        return
    layer.seen = True
    pre = layer.preconditioner
    t0 = time.perf_counter()
    if rows is None and mean and _fast(layer, use, x, g):
        obs = layer.adapter.observe(x, g, pre.row_norms)
        own = obs.n  # the rows' count (a dense adapter's examples are its rows)
        obs, per = _loss_examples(layer, use, obs, examples, False)
        if _usual(own) and obs.n is per and _usual(per):
            _keep_rows(layer, obs, True)  # for the close
            pre.observe_dense(obs)
        else:  # padding, decided on the host (the mask's count is a tensor); a later call of the pass
            _fold_observation(layer, obs, False, mean, True, per)
    else:
        with _no_autocast(g):
            xs = x if not x.is_floating_point() else x.to(pre.dtype)
            transposed = use.role == "transposed"
            weighted = pre.row_norms and not transposed
            obs = _fit(use.rows.observe(xs, g.to(pre.dtype), weighted), layer.adapter.shape, rows, transposed)
            obs, per = _loss_examples(layer, use, obs, examples, transposed)
            _fold_observation(layer, obs, transposed, mean, not transposed and rows is None, per)
    timings["statistics"] += time.perf_counter() - t0


def _usual(n: Count) -> bool:
    """A count the usual path takes: every row real (a number above zero), or a count for the close."""
    return isinstance(n, RowCount) or (isinstance(n, int) and n > 0)


def _loss_examples(
    layer: Layer, use: Use, obs: Observation, examples: LossExamples | None, transposed: bool
) -> tuple[Observation, Count]:
    """``obs`` with the loss's ``N`` as its count of examples where the method takes it (``examples``) and the call
    has no more examples than the head's (rows; a convolution's batch): the layer's first call of the backward pass
    adds ``N`` to the divisor, later ones add rows only; and the count that undoes a mean loss's ``1/N`` of its
    rows. A call with more rows than the head's (several per example), and a use in the swapped orientation (a tied
    head), keep their own."""
    if examples is None:
        return obs, obs.n
    size = obs.n if isinstance(obs.n, int) else obs.d.shape[0]  # its examples at most: a convolution's batch, rows
    n = examples.arrive(obs.n, use, size)  # a use: a tied head's embedding use is not the head again
    layer.own_count = layer.own_count if transposed else size > examples.rows
    if transposed or size > examples.rows:
        return obs, obs.n
    first = layer.passes != examples.passes
    layer.passes = examples.passes
    if first:
        layer.counted, layer.step_passes = add_counts(layer.counted, n), layer.step_passes + 1
    return dataclasses.replace(obs, n=n if first else 0), n


def count_missed_passes(layers: list[Layer], examples: LossExamples, distributed: bool = False) -> None:
    """At a close of statistics: a layer taking the loss's ``N`` that was called in some of the step's backward
    passes only (an expert no token of one micro-batch was routed to) adds the ``N`` of the others to its divisor,
    which averages over every example of the step (``B = (1/ΣN) Σ_rows bbᵀ``); the rows it lacks there are zero.
    A layer not called at all folds nothing in one process; under data parallelism (``distributed``) it counts the
    step's ``N`` too, as another rank's rows may be summed into it (``distributed.reduce_statistics``)."""
    total, passes = examples.step_count(), examples.step_passes
    for layer in layers:
        counted, layer.counted = layer.counted, 0
        called, layer.step_passes = layer.step_passes, 0
        skip = called == passes or (
            called == 0 and not distributed
        )  # decided on the host: the usual layer costs nothing
        if skip or layer.own_count or not layer.preconditioner.uses_hooks:
            continue
        missed = missed_count(total, counted)
        if missed is None:
            continue
        for factor, takes_n in layer.preconditioner.statistics_factors():
            if takes_n and (factor.pending or called == 0):
                factor.count_examples(missed)


def _keep_rows(layer: Layer, obs: Observation, whole: bool) -> None:
    """Keep a call's rows for the factored product at the step (``G = ΔᵀH̄``) where it is a ``whole`` call of the
    layer's own with dense rows decided on the host; any other call also wrote into the gradient, so it drops them
    (e.g. a tied head's embedding use)."""
    if whole and isinstance(obs.h, Tensor) and host_decides(obs.d):
        layer.kept.keep(layer.adapter.shape, obs.h, obs.d)
    else:
        layer.kept.another_use()


def _fold_observation(
    layer: Layer, obs: Observation, transposed: bool, mean: bool, whole: bool, per: Count | None = None
) -> None:
    """The general path's fold of one call's observation (``whole``: see ``_keep_rows``; ``per``: the count that
    undoes a mean loss's ``1/N``, default ``obs.n``)."""
    pre = layer.preconditioner
    _keep_rows(layer, obs, whole)
    # undo the 1/N of a mean loss (per-example output gradients): a count the host knows goes into the products,
    # a count tensor to a method that applies it inside its statistics (``count_scaled_rows``), else to the rows
    # (a ``RowCount`` is reduced only where it is needed now: the rows, not the statistics)
    n = obs.n if per is None else per
    data = isinstance(n, Tensor | RowCount)
    by_scale = mean and not transposed and not data
    inside = mean and not transposed and data and pre.count_scaled_rows
    d = obs.d
    if mean and not (by_scale or inside):
        d = d * (count_tensor(n) if isinstance(n, Tensor | RowCount) else n)
    if transposed:
        pre.observe_transposed(obs.h, d, obs.rows, obs.n)
    else:
        pre.observe(obs, d, n if inside else float(n) if by_scale else 1.0)


_fold_eager = torch.compiler.disable(_fold)  # under torch.compile: run as plain Python, never traced


def use_sink(
    layer: Layer, use: Use, timings: dict[str, float], mean: bool, examples: LossExamples | None = None
) -> OnCall:
    """``on_call(x, rows)`` for one use of ``layer``: keeps the input, folds the statistics in the backward pass
    (``examples``: the loss's count of examples, for a method whose output-gradient statistics take it)."""
    weight = layer.adapter.weight.param
    if not layer.preconditioner.loss_examples:
        examples = None

    def on_call(x: Tensor, rows: slice | None) -> GradCallback | None:
        if not layer.collecting or not weight.requires_grad:  # closed for this step, or frozen (fine-tuning)
            return None
        if examples is not None:
            examples.forward_call()
        return lambda g: _fold_eager(layer, use, x, g, rows, mean, timings, examples)

    return torch.compiler.disable(on_call)
