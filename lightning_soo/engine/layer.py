"""The managed-layer record, and what the capture hooks do with its data: turn it into rows and fold them into the
layer's statistics (float32, float64 for float64 models; outside autocast; timed; never traced by ``torch.compile``).

Normalisation of the output gradients happens in two steps, both named here. Autograd hands the hooks
``δ = ∂(loss · s)/∂output`` with ``s = 1 / (N · accumulation) · loss_scale`` for a mean loss. ``grad_sink`` undoes
the ``1/N`` of a mean loss (``N`` counted from the rows the adapter makes, known only at hook time). The rest,
``output_scale = accumulation / loss_scale``, is the same for every layer of a step and known only when the step
closes (the loss scale of a ``GradScaler``); the manager passes it to ``Preconditioner.close_statistics``, where
each method applies it to the statistics it kept as their degree in ``δ`` says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_soo.capture.adapters import LayerAdapter
from lightning_soo.preconditioners.base import Preconditioner


@dataclass
class Layer:
    """One managed layer: its module, adapter, preconditioner and bookkeeping."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    preconditioner: Preconditioner
    failures: int = 0  # consecutive failed refreshes
    warned: set[str] = field(default_factory=set)


class OptimizerLayers:
    """Which managed layers an optimizer steps (all of a layer's parameters in its groups), cached per optimizer;
    parameters that were not in the model at set-up are named once in a warning (they keep their plain gradient)."""

    def __init__(self, model: nn.Module, warn: Callable[[str], None]) -> None:
        self._known = {id(p) for p in model.parameters()}
        self._warn = warn
        self._cache: dict[int, tuple[int, list[Layer]]] = {}

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
            self._warn(
                f"{len(unknown)} parameter tensor(s) of the optimizer were not in the model when the preconditioner "
                "was set up (modules added later); they keep their plain gradient"
            )
        mine = [layer for layer in layers.values() if all(id(p) in idset for p in layer.adapter.params)]
        self._cache[id(optimizer)] = (len(ids), mine)
        return mine


FROZEN = object()  # forward-hook context of a frozen layer: its output gradient is not folded either


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


def input_sink(adapter: LayerAdapter, pre: Preconditioner, timings: dict[str, float]) -> Callable[[Tensor], Any]:
    weight = adapter.module.weight

    def sink(x: Tensor) -> Any:
        if not weight.requires_grad:  # frozen (fine-tuning): no statistics
            return FROZEN
        t0 = time.perf_counter()
        with _no_autocast(x):
            rows, n = adapter.input_rows(x if not x.is_floating_point() else x.to(pre.dtype))
            ctx = pre.observe_inputs(rows, n)
        timings["statistics"] += time.perf_counter() - t0
        return ctx

    return torch.compiler.disable(sink)  # under torch.compile: run as plain Python, never traced


def grad_sink(
    adapter: LayerAdapter, pre: Preconditioner, timings: dict[str, float], mean: bool
) -> Callable[[Tensor, Any], None]:
    def sink(g: Tensor, ctx: Any) -> None:
        if ctx is FROZEN:
            return
        t0 = time.perf_counter()
        with _no_autocast(g):
            rows, n = adapter.output_rows(g.to(pre.dtype))
            if mean:
                rows = rows * n  # undo the 1/N of a mean loss: per-example output gradients
            pre.observe_output_grads(rows, n, ctx)
        timings["statistics"] += time.perf_counter() - t0

    return torch.compiler.disable(sink)
