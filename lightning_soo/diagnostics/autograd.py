"""Autograd utilities shared by the diagnostics: the loss gradient with its graph, Hessian-vector products by
double backward, and running a side pass without leaving a trace (buffers, RNG streams).

Used by the curvature-quality measurement and by PSGD's Newton-form fit; plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def preserved_state(model: nn.Module | None) -> Iterator[None]:
    """Run on copies of the model's buffers (BatchNorm running statistics, spectral-norm vectors, ...) and restore
    the global RNG streams (CPU, and CUDA when initialised) on exit.

    The buffers are swapped for clones rather than saved and written back: the originals are never written, so
    their version counters stay put and a training graph that saved them (BatchNorm saves its running statistics
    for backward) can still be backpropagated after the pass.
    """
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    swapped: list[tuple[dict[str, Tensor | None], str, Tensor]] = []
    if model is not None:
        clones: dict[int, Tensor] = {}  # one clone per tensor: buffers shared between modules stay shared
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    swapped.append((module._buffers, name, buf))
                    module._buffers[name] = clones.setdefault(id(buf), buf.detach().clone())
    try:
        yield
    finally:
        for buffers, name, buf in swapped:
            buffers[name] = buf
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def loss_gradients(loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
    """``∇L`` of the managed parameters with its graph (None where a parameter does not affect the loss)."""
    loss = loss_fn()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss_fn` must return a scalar loss tensor, got {shape}")
    if not loss.requires_grad:
        raise RuntimeError("`loss_fn()` returned a loss without a graph (computed under torch.no_grad?)")
    return torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)


def hvp(grads: Sequence[Tensor | None], params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """``H · v`` by double backward: the derivative of ``⟨∇L, v⟩`` with respect to ``params``."""
    pairs = [(g, vec) for g, vec in zip(grads, vectors, strict=True) if g is not None and g.requires_grad]
    if not pairs:  # the gradient does not depend on the parameters: H = 0
        return [torch.zeros_like(p) for p in params]
    outs = torch.autograd.grad(
        [g for g, _ in pairs], params, grad_outputs=[vec for _, vec in pairs], retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(p) if o is None else o.detach() for o, p in zip(outs, params, strict=True)]
