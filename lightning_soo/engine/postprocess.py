"""Post-processing of the preconditioned gradients of one step, between ``P·G`` and ``p.grad``: layer-wise grafting,
the finiteness check, KL clipping (kfac-pytorch's form) and the per-layer norm cap.

On an accelerator everything stays on the device: decisions are ``torch.where``, the KL scale and grafting ratios
are tensors, and what the host needs to know (which layers were not finite or capped) comes back as flags the manager
reads once per step, together with the statistics' flags. On the CPU, where reading a number costs nothing and each
``torch.where`` is a pass over a gradient, the same decisions are taken on the host (``_write_on_host``,
``linalg.host_decides``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from lightning_soo.capture.adapters import LayerAdapter
from lightning_soo.linalg import host_decides, is_finite

Item = tuple[LayerAdapter, Tensor, Tensor]  # (adapter, G, P·G)
T = TypeVar("T")


@dataclass
class Verdicts(Generic[T]):
    """Device-side flags of one step (True: something happened to that owner), read back in one transfer."""

    flags: list[tuple[str, list[T], Tensor, bool]] = field(default_factory=list)
    raised: list[tuple[str, T]] = field(default_factory=list)  # flags the host already read (``host_decides``)

    def add(
        self, kind: str, owners: Sequence[T], flags: Sequence[Tensor | bool] | Tensor, raised_when: bool = True
    ) -> None:
        """One flag per owner: 0-d tensors or bools already read, or one vector for all of them (a stack's). The
        owner's ``kind`` is raised where its flag equals ``raised_when`` (False: the flags say what went right, and
        the host negates them when it reads them, instead of the device launching a negation per flag)."""
        if isinstance(flags, Tensor):
            if owners:
                self.flags.append((kind, list(owners), flags.reshape(-1), raised_when))
            return
        pairs = list(zip(owners, flags, strict=False))
        self.raised += [(kind, owner) for owner, flag in pairs if flag is raised_when]
        tensors = [(owner, flag) for owner, flag in pairs if isinstance(flag, Tensor)]
        if tensors:
            vector = torch.stack([flag.reshape(()) for _, flag in tensors])
            self.flags.append((kind, [owner for owner, _ in tensors], vector, raised_when))

    def read(self) -> list[tuple[str, T]]:
        """The ``(kind, owner)`` of every raised flag; clears the step's flags. One host synchronisation (none when
        every flag was read already)."""
        flags, self.flags = self.flags, []
        raised, self.raised = self.raised, []
        if not flags:
            return raised
        values = iter(torch.cat([vector for _, _, vector, _ in flags]).tolist())
        return raised + [
            (kind, owner) for kind, owners, _, when in flags for owner in owners if bool(next(values)) is when
        ]


def settled(kind: str, name: str, scaled: bool) -> tuple[str, str | None]:
    """The counter a raised flag of ``kind`` increments, and the warning it deserves (None: count only)."""
    if kind == "capped":
        return "capped_updates", None
    if kind == "update":
        return (
            "nonfinite_updates",
            f"the preconditioned gradient of layer '{name}' was not finite; its plain gradient stays",
        )
    why = (
        "expected now and then under fp16 loss scaling, on the steps the GradScaler skips"
        if scaled
        else "the layer's inputs or output gradients held NaN or Inf: check the loss and learning rate"
    )
    return (
        "skipped_statistics",
        f"non-finite statistics in layer '{name}' were skipped ({why}); the last good ones stay",
    )


@dataclass
class Written:
    """What ``write_updates`` did: per-layer flags (device tensors, one vector per stack; bools where the host
    decided) and the KL scale."""

    finite: list[Tensor] | list[bool]  # P·G of the layer was finite (else its plain gradient was kept)
    capped: list[Tensor] | list[bool]  # the layer's update was scaled down to ``max_update_norm``
    kl_scale: Tensor | float  # ν of the step (1.0 without a KL clip)
    stack_finite: list[Tensor] = field(default_factory=list)  # per stack: a flag per member
    stack_capped: list[Tensor] = field(default_factory=list)


@dataclass
class StackItem:
    """A stack's gradients ``g`` and ``P·G`` (``n x d_out x d_in``), its members' squared learning rates (a vector,
    or None without a KL clip) and where the update goes (``store``)."""

    g: Tensor
    out: Tensor
    lr2: Tensor | None
    store: Callable[[Tensor], None]


def graft(out: Tensor, grad: Tensor, dim: tuple[int, ...] | None = None) -> Tensor:
    """``P·G`` rescaled to the Frobenius norm of ``G`` (SGD grafting); left alone when ``P·G`` is zero. ``dim``:
    the dimensions of one layer's matrix in a stack (None: the whole tensor is one layer's)."""
    norm = torch.linalg.vector_norm(out, dim=dim, keepdim=dim is not None)
    gnorm = torch.linalg.vector_norm(grad.to(out.dtype), dim=dim, keepdim=dim is not None)
    return out * torch.where(norm > 0, gnorm / norm, 1.0)


def _scaled(out: Tensor, scale: Tensor | float) -> Tensor:
    """``out · scale`` (a new tensor; ``out`` itself for a scale of 1)."""
    return out if isinstance(scale, float) and scale == 1.0 else out * scale


def write_updates(
    items: Sequence[Item],
    *,
    grafting: str | None,
    kl_clip: float | None,
    max_norm: float | None,
    lrs: Sequence[float],
    stacks: Sequence[StackItem] = (),
) -> Written:
    """``p.grad ← s_l · P·G_l`` for every item and every stack member, ``s_l = ν · cap_l``, with ``P·G`` grafted
    first when asked.

    ``ν = min(1, √(kl_clip / Σ_l lr_l² ⟨P·G_l, G_l⟩))`` (``lrs``: each item's learning rate) bounds the
    second-order model's predicted change (the KL divergence for a Fisher) of the step; ``cap_l`` scales the layer
    down to at most ``max_norm``. A layer whose ``P·G`` is not finite keeps its plain gradient and is left out of
    the KL sum. A stack does the same for all its members in one operation each. No host synchronisation, except
    on the CPU (``linalg.host_decides``), where reading the flags is free and saves passes (``_write_on_host``).
    """
    if items and not stacks and host_decides(items[0][2]):
        return _write_on_host(items, grafting=grafting, kl_clip=kl_clip, max_norm=max_norm, lrs=lrs)
    outs: list[Tensor] = []
    dots: list[Tensor] = []
    finite: list[Tensor] = []
    for _, g, out in items:
        if grafting == "sgd":
            out = graft(out, g)
        # ⟨P·G, G⟩ for the KL clip, else only finiteness is needed: a sum reads P·G alone (both non-finite with P·G)
        dot = torch.vdot(out.reshape(-1), g.to(out.dtype).reshape(-1)) if kl_clip is not None else out.sum()
        ok = is_finite(dot)
        outs.append(out)
        finite.append(ok)
        if kl_clip is not None:
            dots.append(torch.where(ok, dot, 0.0))
    souts, sdots, sfinite = [], [], []
    for item in stacks:
        out = item.out
        if grafting == "sgd":
            out = graft(out, item.g, dim=(1, 2))
        dot = (out * item.g.to(out.dtype)).sum((1, 2)) if kl_clip is not None else out.sum((1, 2))
        ok = is_finite(dot)
        souts.append(out)
        sfinite.append(ok)
        if kl_clip is not None:
            sdots.append(torch.where(ok, dot, 0.0))
    nu: Tensor | float = 1.0
    if kl_clip is not None and (items or stacks):
        terms = [dot * lr**2 for dot, lr in zip(dots, lrs, strict=True)]
        terms += [(dot * item.lr2).sum() for dot, item in zip(sdots, stacks, strict=True)]  # type: ignore[operator]
        total = torch.stack(terms).sum()
        ratio = (kl_clip / total).sqrt().clamp(max=1.0)
        nu = torch.where(total > 0, ratio, 1.0)
    capped: list[Tensor] = []
    for (adapter, _, _), out, ok in zip(items, outs, finite, strict=True):
        scale = nu
        if max_norm is not None:
            norm = out.norm() * nu
            capped.append(norm > max_norm)
            scale = nu * (max_norm / norm).clamp(max=1.0)
        adapter.set_grad_matrix_where(ok, _scaled(out, scale))
    scapped: list[Tensor] = []
    for item, out, ok in zip(stacks, souts, sfinite, strict=True):
        scale = nu if isinstance(nu, float) else nu.reshape(1, 1, 1)
        if max_norm is not None:
            norm = torch.linalg.vector_norm(out, dim=(1, 2), keepdim=True) * nu
            scapped.append((norm > max_norm).reshape(-1))
            scale = nu * (max_norm / norm).clamp(max=1.0)
        ok3 = ok.reshape(-1, 1, 1)
        item.store(torch.where(ok3, _scaled(out, scale), item.g.to(out.dtype)))
    return Written(finite, capped, nu, sfinite, scapped)


def _write_on_host(
    items: Sequence[Item], *, grafting: str | None, kl_clip: float | None, max_norm: float | None, lrs: Sequence[float]
) -> Written:
    """``write_updates`` with every flag and scale read as a number (CPU tensors: no queue to drain): the grafting
    ratio, ν and the cap fold into one scale per layer, written with ``p.grad`` in one pass; a non-finite layer is
    not written at all (its ``p.grad`` still holds ``G``)."""
    ratios, norms, dots = [], [], []
    for _, g, out in items:
        gd = g.to(out.dtype)
        norm = float(torch.linalg.vector_norm(out)) if grafting == "sgd" or max_norm is not None else 1.0
        ratio = 1.0
        if grafting == "sgd" and norm > 0:  # NaN > 0 is False: a non-finite P·G is caught by its dot below
            ratio = float(torch.linalg.vector_norm(gd)) / norm
        ratios.append(ratio)
        norms.append(norm * ratio)
        if kl_clip is not None:  # non-finite whenever P·G is
            dots.append(float(torch.vdot(out.reshape(-1), gd.reshape(-1))) * ratio)
        elif grafting == "sgd" or max_norm is not None:  # only finiteness is needed, and the norm tells it
            dots.append(norm)
        else:  # a sum reads P·G alone, half the bytes of the dot (NaN and Inf propagate)
            dots.append(float(out.sum()))
    finite = [math.isfinite(dot) for dot in dots]
    nu = 1.0
    if kl_clip is not None:
        total = sum(dot * lr**2 for dot, lr, ok in zip(dots, lrs, finite, strict=True) if ok)
        nu = min(1.0, math.sqrt(kl_clip / total)) if total > 0 else 1.0
    capped = []
    for (adapter, _, out), ratio, norm, ok in zip(items, ratios, norms, finite, strict=True):
        scale = nu * ratio
        if max_norm is not None:
            capped.append(norm * nu > max_norm)
            scale *= min(1.0, max_norm / (norm * nu)) if norm * nu > 0 else 1.0
        if ok:
            adapter.set_grad_matrix(out, scale)
    return Written(finite, capped, nu)


def mixed_lrs(layers: Sequence[Any], lrs: dict[int, float]) -> str:
    """The warning for layers whose parameters step at different learning rates (a bias in another param group):
    the KL clip prices a layer's update at its weight's rate; "" when there are none."""
    mixed = [layer.name for layer in layers if len({lrs.get(id(p)) for p in layer.adapter.params}) > 1]
    if not mixed:
        return ""
    return (
        f"the parameters of {len(mixed)} layer(s) ({', '.join(mixed[:5])}) are in param groups with different "
        "learning rates: the KL clip takes each layer's at its weight's learning rate, so a bias at a higher rate "
        "is clipped less than it should be. Keep a layer's weight and bias at one rate, or pass kl_clip=None"
    )
