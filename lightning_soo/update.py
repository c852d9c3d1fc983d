"""Post-processing of the preconditioned gradients of one step: layer-wise grafting and KL clipping
(kfac-pytorch's form)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_soo.layers import LayerAdapter

Update = tuple[LayerAdapter, float, Tensor]  # (adapter, ⟨P·G, G⟩, preconditioned P·G)


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
