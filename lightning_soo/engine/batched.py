"""Same-shape layers preconditioned as one stack: ``P·G = L · G · R`` for every member in two ``bmm`` calls, and the
post-processing (grafting, finiteness, KL clip terms, norm cap, the write into ``p.grad``) as a handful of operations
per stack instead of a handful per layer. This is what keeps a deep stack of equal blocks from paying a kernel
launch per layer and operation on a GPU.

A layer joins a stack when its preconditioner gives stackable operands (``stack_operands``: the dense Kronecker
operands of K-FAC's Cholesky inverses, Shampoo's one-block roots and PSGD's ``QᵀQ``, or Gauss-Newton's examples and
Cholesky factor; ``precondition_stacked`` multiplies them) and its adapter is a plain ``nn.Linear`` view (the whole
weight, optional whole bias). The stacked
operands are rebuilt when a member's operands change (a refresh or a checkpoint load replaces the tensors); the
cache holds the members' tensors, so an identity check is exact. Memory: a second copy of the members' inverses
and one gradient-sized buffer per stack. Under ``torch.distributed`` nothing is stacked
(a broadcast overwrites inverses in place).

On the CPU nothing is stacked either (``linalg.BATCH_ON_CPU`` turns it on): the 48 equal layers of the deep MLP of
``benchmarks/overhead.py`` took 10.6-11.8 ms a step stacked against 8.7 ms one by one (one thread), because there
the time goes into the elementwise passes, which stacking does not shorten, not into launching them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from lightning_soo import linalg
from lightning_soo.capture.adapters import LinearAdapter
from lightning_soo.engine.layer import Layer
from lightning_soo.engine.postprocess import StackItem, Verdicts, Written

#: smallest number of layers worth a stack
MIN_MEMBERS = 2


@dataclass
class Stack:
    """Members of one shape, their stacked operands and a gradient buffer with a view per member."""

    layers: list[Layer]
    operands: list[tuple[Tensor, ...]]  # the members' operands the stacked ones were built from
    stacked: tuple[Tensor, ...]  # each operand stacked over the members (K-FAC: L and R)
    buffer: Tensor  # (n, d_out, d_in): G in, the written update out
    weight_views: list[Tensor] = field(default_factory=list)
    bias_views: list[Tensor] = field(default_factory=list)

    @property
    def left(self) -> Tensor:
        """The first stacked operand (a Kronecker method's ``L``)."""
        return self.stacked[0]

    def _grads(self, part: int) -> list[Tensor]:
        """The members' current gradients of their weight (``part`` 0) or bias (1)."""
        return [cast(Tensor, layer.adapter.params[part].grad) for layer in self.layers]

    def load(self) -> Tensor:
        """Copy the members' gradients into the buffer (two ``foreach`` copies); returns it."""
        torch._foreach_copy_(self.weight_views, self._grads(0))
        if self.bias_views:
            torch._foreach_copy_(self.bias_views, self._grads(1))
        return self.buffer

    def store(self, update: Tensor) -> None:
        """Write ``update`` (stacked like the buffer) into the members' ``p.grad``."""
        self.buffer.copy_(update)
        torch._foreach_copy_(self._grads(0), self.weight_views)
        if self.bias_views:
            torch._foreach_copy_(self._grads(1), self.bias_views)


def _key(layer: Layer) -> tuple | None:
    """The stack a layer can join (None: precondition it alone)."""
    adapter, pre = layer.adapter, layer.preconditioner
    if type(adapter) is not LinearAdapter or adapter.weight.rows is not None or not pre.ready:
        return None
    if adapter.bias is not None and adapter.bias.rows is not None:
        return None
    grads = [p.grad for p in adapter.params]
    operands = pre.stack_operands() if not any(g is None or g.is_sparse for g in grads) else None
    if operands is None:
        return None
    w = adapter.weight.param
    shapes = tuple(t.shape for t in operands)
    return (
        type(pre),
        pre.d_out,
        pre.d_in,
        shapes,
        adapter.bias is not None,
        pre.dtype,
        cast(Tensor, grads[0]).dtype,
        w.device,
    )


def _operands(layer: Layer) -> tuple[Tensor, ...]:
    operands = layer.preconditioner.stack_operands()
    assert operands is not None  # checked by _key
    return operands


class Stacks:
    """Finds the stacks among a step's layers and keeps their operands and buffers between steps."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, ...], Stack] = {}

    def split(self, layers: Sequence[Layer]) -> tuple[list[Stack], list[Layer]]:
        """(stacks, layers preconditioned alone)."""
        device = layers[0].adapter.weight.param.device if layers else None
        if device is None or (device.type == "cpu" and not linalg.BATCH_ON_CPU):
            return [], list(layers)
        groups: dict[tuple, list[Layer]] = {}
        alone: list[Layer] = []
        for layer in layers:
            key = _key(layer)
            if key is None:
                alone.append(layer)
            else:
                groups.setdefault(key, []).append(layer)
        stacks = []
        for members in groups.values():
            if len(members) < MIN_MEMBERS:
                alone.extend(members)
            else:
                stacks.append(self._stack(members))
        return stacks, alone

    def _stack(self, members: list[Layer]) -> Stack:
        names = tuple(layer.name for layer in members)
        operands = [_operands(layer) for layer in members]
        stack = self._cache.get(names)
        fresh = stack is not None and all(
            all(a is b for a, b in zip(old, new, strict=True))
            for old, new in zip(stack.operands, operands, strict=True)
        )
        if stack is not None and fresh:
            return stack
        stacked = tuple(torch.stack(column) for column in zip(*operands, strict=True))
        if stack is None:
            pre = members[0].preconditioner
            buffer = stacked[0].new_empty(len(members), pre.d_out, pre.d_in)
            d = members[0].adapter.weight.param.shape[1]
            stack = Stack(members, operands, stacked, buffer)
            stack.weight_views = [buffer[i, :, :d] for i in range(len(members))]
            if members[0].adapter.bias is not None:
                stack.bias_views = [buffer[i, :, d] for i in range(len(members))]
            self._cache[names] = stack
        else:
            stack.operands, stack.stacked = operands, stacked
        return stack

    def clear(self) -> None:
        self._cache.clear()


def precondition(stacks: Sequence[Stack], lrs: dict[int, float] | None, default: float) -> list[StackItem]:
    """``P·G`` of every stack (two ``bmm``), with its members' squared learning rates when ``lrs`` is given (KL
    clip: parameter id -> learning rate)."""
    items = []
    for stack in stacks:
        g = stack.load()
        out = type(stack.layers[0].preconditioner).precondition_stacked(stack.stacked, g)
        lr2 = None
        if lrs is not None:
            values = [lrs.get(id(layer.adapter.params[0]), default) ** 2 for layer in stack.layers]
            lr2 = torch.tensor(values, dtype=out.dtype).to(out.device, non_blocking=True)
        items.append(StackItem(g, out, lr2, stack.store))
    return items


def record(verdicts: Verdicts[Layer], alone: list[Layer], stacks: Sequence[Stack], written: Written) -> None:
    """The step's update flags: one per layer preconditioned alone, one vector per stack."""
    pairs = (
        ("update", written.finite, written.stack_finite, False),  # raised where P·G was not finite
        ("capped", written.capped, written.stack_capped, True),
    )
    for kind, flags, per_stack, when in pairs:
        verdicts.add(kind, alone, flags, raised_when=when)
        for stack, vector in zip(stacks, per_stack, strict=False):
            verdicts.add(kind, stack.layers, vector, raised_when=when)
