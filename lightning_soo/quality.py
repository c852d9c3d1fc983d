"""Curvature quality: PSGD's criterion and its scale-free index, from exact Hessian-vector products.

For a preconditioner P and the loss Hessian H, Li's criterion is

    c(P) = E_δθ[δĝᵀ P δĝ + δθᵀ P⁻¹ δθ],   δĝ = H δθ,   δθ ~ N(0, I),

i.e. ``tr(P H²) + tr(P⁻¹)`` in expectation, minimised by ``P = |H|⁻¹`` (value ``2 tr|H|``). With
``a = E[δĝᵀPδĝ]`` and ``b = E[δθᵀP⁻¹δθ]``, the best scale of P is ``α* = √(b/a)`` and the scale-free index

    r(P) = √(a_P b_P) / √(a_I b_I)      (a_I = E‖δĝ‖², b_I = E‖δθ‖²)

compares P with the identity (plain SGD) at their best scales: 1 means no better than SGD, lower is better.

Probing: one probe covers every managed layer at once; δĝ is the full Hessian-vector product (cross-layer terms
included), and each layer's figures use its own block of δθ and δĝ, P and P⁻¹ being block-diagonal. Hessian-vector
products are exact (double backward, no finite differences, which are wrong across ReLU kinks).

The pass has no side effects: ``torch.autograd.grad`` leaves ``.grad`` alone, BatchNorm buffers and the RNG state
are restored, probes come from a private generator, and the manager's capture is off during it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_soo.manager import PreconditionerManager


@dataclass
class Quality:
    """Expectations behind the criterion for one layer (or the whole model)."""

    a: float  # E[δĝᵀ P δĝ]
    b: float  # E[δθᵀ P⁻¹ δθ]
    a_identity: float  # E[‖δĝ‖²]
    b_identity: float  # E[‖δθ‖²]

    @property
    def criterion(self) -> float:
        """``c(P) = a + b``, the raw criterion (seed Fig. 2)."""
        return self.a + self.b

    @property
    def index(self) -> float:
        """``√(a b) / √(a_I b_I)``: 1 = no better than the identity, lower is better."""
        denom = math.sqrt(self.a_identity * self.b_identity)
        return math.sqrt(max(self.a * self.b, 0.0)) / denom if denom > 0 else math.nan

    @property
    def alpha_star(self) -> float:
        """``√(b / a)``: the scale of P minimising the criterion (compare with the learning rate)."""
        return math.sqrt(self.b / self.a) if self.a > 0 else math.nan


@dataclass
class QualityReport:
    layers: dict[str, Quality] = field(default_factory=dict)
    model: Quality = field(default_factory=lambda: Quality(0.0, 0.0, 0.0, 0.0))
    seconds: float = 0.0
    probes: int = 0


@contextmanager
def preserved_state(model: nn.Module | None) -> Iterator[None]:
    """Restore BatchNorm buffers and the global RNG streams on exit."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)] if model is not None else []
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved, strict=True):
            for k, value in buffers.items():
                getattr(m, k).copy_(value)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _probe(
    layers: list, params: list[Tensor], grads: tuple[Tensor, ...], generator: torch.Generator | None, sums: dict
) -> None:
    """One probe δθ over every layer; accumulate a, b, a_I, b_I per layer."""
    probes = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    hvp = torch.autograd.grad(grads, params, grad_outputs=probes, retain_graph=True)
    offset = 0
    for layer in layers:
        n = len(layer.adapter.params)
        theta = layer.adapter.to_matrix(probes[offset : offset + n])
        ghat = layer.adapter.to_matrix([h.detach() for h in hvp[offset : offset + n]])
        offset += n
        pre = layer.preconditioner
        s = sums[layer.name]
        s[0] += float((ghat * pre.precondition(ghat).to(ghat.dtype)).sum())
        s[1] += float((theta * pre.curvature_matvec(theta).to(theta.dtype)).sum())
        s[2] += float(ghat.square().sum())
        s[3] += float(theta.square().sum())


def measure_quality(
    manager: PreconditionerManager,
    loss_fn: Callable[[], Tensor],
    *,
    num_probes: int = 4,
    generator: torch.Generator | None = None,
    model: nn.Module | None = None,
) -> QualityReport:
    """Estimate the criterion of every ready layer's preconditioner on the batch ``loss_fn`` evaluates.

    Cost: one forward and backward with ``create_graph`` plus one double backward per probe.
    """
    t0 = time.perf_counter()
    layers = [layer for layer in manager.layers.values() if layer.preconditioner.ready]
    report = QualityReport(probes=num_probes)
    if not layers:
        return report
    params = [p for layer in layers for p in layer.adapter.params]
    was_active = manager.capture.active
    manager.capture.active = False
    sums = {layer.name: [0.0, 0.0, 0.0, 0.0] for layer in layers}
    try:
        # BatchNorm's running buffers are saved for backward: restore them only after the last double backward
        with preserved_state(model):
            loss = loss_fn()
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for _ in range(num_probes):
                _probe(layers, params, grads, generator, sums)
    finally:
        manager.capture.active = was_active
    total = [0.0, 0.0, 0.0, 0.0]
    for name, s in sums.items():
        report.layers[name] = Quality(*(v / num_probes for v in s))
        total = [t + v / num_probes for t, v in zip(total, s, strict=True)]
    report.model = Quality(*total)
    report.seconds = time.perf_counter() - t0
    return report
