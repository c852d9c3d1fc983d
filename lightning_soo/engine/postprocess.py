"""Post-processing of the preconditioned gradients of one step, between ``P·G`` and ``p.grad``: layer-wise grafting,
the finiteness check, KL clipping (kfac-pytorch's form) and the per-layer norm cap."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_soo.capture.adapters import LayerAdapter

Update = tuple[LayerAdapter, float, Tensor]  # (adapter, ⟨P·G, G⟩, preconditioned P·G)
Item = tuple[LayerAdapter, Tensor, Tensor]  # (adapter, G, P·G)


def finite_updates(items: Sequence[Item], grafting: str | None) -> tuple[list[Update], list[int]]:
    """The (grafted) updates with their ``⟨P·G, G⟩``, and the indices of the items whose ``P·G`` is not finite
    (those keep their plain gradient). The dot product is non-finite whenever ``P·G`` is, so one pass serves as the
    finiteness check and the KL-clip term."""
    updates: list[Update] = []
    failed: list[int] = []
    for index, (adapter, g, out) in enumerate(items):
        if grafting == "sgd":
            out = graft(out, g)
        dot = float(torch.vdot(out.reshape(-1), g.to(out.dtype).reshape(-1)))
        if math.isfinite(dot):
            updates.append((adapter, dot, out))
        else:
            failed.append(index)
    return updates, failed


def write_updates(updates: Sequence[Update], scale: float, max_norm: float | None) -> int:
    """``p.grad ← scale · P·G`` per layer, each scaled down further to at most ``max_norm`` (Frobenius); returns
    how many layers were capped."""
    capped = 0
    for adapter, _, out in updates:
        s = scale
        if max_norm is not None:
            norm = float(out.norm()) * s
            if norm > max_norm:
                s *= max_norm / norm
                capped += 1
        adapter.set_grad_matrix(out if s == 1.0 else out * s)
    return capped


def kl_scale(
    updates: Sequence[Update], kl_clip: float, optimizer: torch.optim.Optimizer | None, lr: float | None
) -> float:
    """``ν = min(1, √(kl_clip / Σ_l lr_l² ⟨P·G_l, G_l⟩))`` with each layer's own learning rate.

    Scaling every preconditioned gradient by ν bounds the second-order model's predicted change
    (the KL divergence for a Fisher) of the step, so a learning rate tuned for SGD cannot blow up.
    """
    lrs: dict[int, float] = {}
    if optimizer is not None:
        lrs = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    default = lr if lr is not None else 1.0
    total = 0.0
    for adapter, dot, _ in updates:
        total += lrs.get(id(adapter.params[0]), default) ** 2 * dot
    if not total > 0.0:
        return 1.0
    return min(1.0, (kl_clip / total) ** 0.5)


def graft(out: Tensor, grad: Tensor) -> Tensor:
    """``P·G`` rescaled to the Frobenius norm of ``G`` (SGD grafting); left alone when ``P·G`` is zero."""
    norm = out.norm()
    return out * (grad.to(out.dtype).norm() / norm) if float(norm) > 0 else out
