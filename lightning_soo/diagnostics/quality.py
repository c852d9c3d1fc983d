"""Curvature quality: PSGD's criterion and its scale-free index, from exact Hessian-vector products.

For a preconditioner P and the loss Hessian H, Li's criterion is

    c(P) = E_δθ[δĝᵀ P δĝ + δθᵀ P⁻¹ δθ],   δĝ = H δθ,   δθ ~ N(0, I),

i.e. ``tr(P H²) + tr(P⁻¹)`` in expectation, minimised by ``P = |H|⁻¹`` (value ``2 tr|H|``). With
``a = E[δĝᵀPδĝ]`` and ``b = E[δθᵀP⁻¹δθ]``, ``c(αP) = α a + b / α`` is smallest at ``α* = √(b/a)`` (the
learning-rate-like scale P wants), where it equals ``2√(ab)``. The scale-free index

    r(P) = √(a_P b_P) / √(a_I b_I)      (a_I = E‖δĝ‖², b_I = E‖δθ‖²)

compares P with the identity (plain SGD), both at their best scale: 1 means no better than SGD, lower is better.

Probes are Gaussian matrices in each managed layer's gradient-matrix shape (``d_out x d_in``, bias column
included), mapped to the parameters by the layer's adapter; parameters outside managed layers get no probe, so H
is the Hessian restricted to the managed parameters. Two ways to probe (``mode``):

* ``"joint"`` (default; one double backward per probe): one probe covers every layer at once and each layer's
  figures use its block of δθ and of the full product δĝ = H δθ. Layer l then sees ``a_l = tr(P_l (H²)_ll)``
  with ``(H²)_ll = Σ_k H_lk H_kl``: cross-layer curvature counts. The model figures are exactly the criterion of
  the block-diagonal P against the managed Hessian.
* ``"layer"`` (one double backward per layer and probe): a probe in one layer only (δθ zero elsewhere), δĝ its
  own block ``H_ll δθ_l``; layer l sees ``tr(P_l H_ll²) + tr(P_l⁻¹)``, minimised by ``P_l = |H_ll|⁻¹``, the
  target a block-diagonal method aims at. The model figures are sums over layers: the criterion against the
  block-diagonal part of H.

Hessian-vector products are exact (double backward, attention on its math kernel); where a model's ops have no
double backward they fall back to finite differences of gradients with a warning (``diagnostics.autograd``). The
pass
leaves no trace: ``torch.autograd.grad`` does not touch ``.grad``, the forward runs on copies of the model's
buffers (BatchNorm running statistics), the global RNG streams (dropout) are restored, probes come from a private
generator, and the manager's capture is off during it. It may run inside an open training step, even between the
training forward and its backward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_soo import checks as v
from lightning_soo.diagnostics.autograd import CurvatureProducts, preserved_state
from lightning_soo.engine.layer import Layer
from lightning_soo.engine.manager import PreconditionerManager
from lightning_soo.preconditioners.base import Preconditioner

Mode = Literal["joint", "layer"]
MODES = ("joint", "layer")


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
        """``√(a b) / √(a_I b_I)``: 1 = no better than the identity, lower is better (NaN without curvature)."""
        denom = math.sqrt(self.a_identity * self.b_identity)
        return math.sqrt(max(self.a * self.b, 0.0)) / denom if denom > 0 else math.nan

    @property
    def alpha_star(self) -> float:
        """``√(b / a)``: the scale of P minimising the criterion (compare with the learning rate)."""
        return math.sqrt(self.b / self.a) if self.a > 0 else math.nan

    @property
    def best_criterion(self) -> float:
        """``c(α* P) = 2√(ab)``, the criterion of P at its best scale."""
        return 2.0 * math.sqrt(max(self.a * self.b, 0.0))

    @staticmethod
    def total(parts: Sequence[Quality]) -> Quality:
        """The block-diagonal whole: every expectation adds up over layers."""
        return Quality(*(sum(getattr(q, k) for q in parts) for k in ("a", "b", "a_identity", "b_identity")))


@dataclass
class QualityReport:
    """Per-layer and whole-model figures of one measurement, and what it cost."""

    layers: dict[str, Quality] = field(default_factory=dict)
    model: Quality = field(default_factory=lambda: Quality(0.0, 0.0, 0.0, 0.0))
    seconds: float = 0.0  # wall-clock time of the pass
    probes: int = 0  # probes per layer (0 for the exact version)
    mode: Mode = "joint"

    def scalars(self, prefix: str = "soo") -> dict[str, float]:
        """Flat ``{tag: value}`` for loggers: index, criterion and α* per layer and for the model, and the cost."""
        out = {f"{prefix}/quality_ms": 1e3 * self.seconds}
        for name, q in [*self.layers.items(), ("model", self.model)]:  # the model last: it wins a name clash
            out[f"{prefix}/quality_index/{name}"] = q.index
            out[f"{prefix}/criterion/{name}"] = q.criterion
            out[f"{prefix}/alpha_star/{name}"] = q.alpha_star
        return out


@contextmanager
def isolated(manager: PreconditionerManager, model: nn.Module | None) -> Iterator[None]:
    """A side pass: the manager's capture paused, grad mode on, buffers and RNG streams restored afterwards."""
    with manager.capture_paused(), preserved_state(model), torch.enable_grad():
        yield


def _select(manager: PreconditionerManager, layers: Sequence[str] | None) -> list[Layer]:
    """Ready layers, all or the named ones."""
    if layers is None:
        return [layer for layer in manager.layers.values() if layer.preconditioner.ready]
    unknown = [name for name in layers if name not in manager.layers]
    if unknown:
        raise ValueError(f"`layers` names unknown layers {unknown}; managed layers are {sorted(manager.layers)}")
    return [manager.layers[name] for name in layers if manager.layers[name].preconditioner.ready]


def _spans(layers: list[Layer]) -> list[slice]:
    """Each layer's slice of the concatenated parameter list."""
    spans, start = [], 0
    for layer in layers:
        n = len(layer.adapter.params)
        spans.append(slice(start, start + n))
        start += n
    return spans


def _forms(layer: Layer, theta: Tensor, ghat: Tensor) -> list[float]:
    """``[ĝᵀPĝ, θᵀP⁻¹θ, ‖ĝ‖², ‖θ‖²]`` for one layer's probe and product (matrices); one device sync."""
    pre = layer.preconditioner
    ghat, theta = ghat.to(pre.dtype).reshape(-1), theta.to(pre.dtype)
    p_ghat = pre.precondition(ghat.reshape(theta.shape)).to(pre.dtype).reshape(-1)
    p_inv_theta = pre.curvature_matvec(theta).to(pre.dtype).reshape(-1)
    theta = theta.reshape(-1)
    forms = [torch.vdot(ghat, p_ghat), torch.vdot(theta, p_inv_theta), torch.vdot(ghat, ghat), torch.vdot(theta, theta)]
    return torch.stack(forms).tolist()


def measure_quality(
    manager: PreconditionerManager,
    loss_fn: Callable[[], Tensor],
    *,
    num_probes: int = 4,
    mode: Mode = "joint",
    generator: torch.Generator | None = None,
    model: nn.Module | None = None,
    layers: Sequence[str] | None = None,
) -> QualityReport:
    """Estimate the criterion of every ready layer's preconditioner on the batch ``loss_fn`` evaluates.

    Args:
        manager: its layers' preconditioners give ``P·V`` (``precondition``) and ``P⁻¹·V`` (``curvature_matvec``).
        loss_fn: ``loss_fn() -> scalar loss``, re-running the forward on a cached batch (called once).
        num_probes: random probes per layer; the estimates' relative error falls as ``1/√num_probes``.
        mode: ``"joint"`` (all layers per probe, cross-layer curvature included) or ``"layer"`` (each layer's
            Hessian block alone, ``num_probes`` double backwards per layer); see the module docstring.
        generator: source of the probes; None uses a fresh one seeded with 0, so successive measurements share
            their probes and changes over training reflect P and H, not the draw.
        model: the module ``loss_fn`` runs; its buffers are swapped for copies during the pass (needed with
            BatchNorm: without it the running statistics take one update per call).
        layers: names of the layers to measure (default all ready ones); others get no probe.

    Cost: one forward and backward with ``create_graph`` plus one double backward per probe (per layer and
    probe in ``"layer"`` mode), and one ``P·V`` and ``P⁻¹·V`` per layer and probe.
    """
    v.check_int("num_probes", num_probes)
    v.check_choice("mode", mode, MODES)
    t0 = time.perf_counter()
    chosen = _select(manager, layers)
    report = QualityReport(probes=num_probes, mode=mode)
    if not chosen:
        report.model = Quality(*(math.nan,) * 4)
        report.seconds = time.perf_counter() - t0
        return report
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    params = [p for layer in chosen for p in layer.adapter.params]
    spans = _spans(chosen)
    sums = [[0.0] * 4 for _ in chosen]
    with isolated(manager, model):
        hvp = CurvatureProducts(loss_fn, params, manager.warn_once)
        for _ in range(num_probes):
            thetas = [_probe(layer, gen) for layer in chosen]
            if mode == "joint":
                vectors = [t for layer, th in zip(chosen, thetas, strict=True) for t in layer.adapter.from_matrix(th)]
                hv = hvp(vectors)
                products = [layer.adapter.to_matrix(hv[s]) for layer, s in zip(chosen, spans, strict=True)]
            else:
                products = [
                    layer.adapter.to_matrix(hvp(layer.adapter.from_matrix(th), s))
                    for layer, s, th in zip(chosen, spans, thetas, strict=True)
                ]
            for acc, layer, th, gh in zip(sums, chosen, thetas, products, strict=True):
                for i, value in enumerate(_forms(layer, th, gh)):
                    acc[i] += value
    means = [Quality(*(s / num_probes for s in acc)) for acc in sums]
    report.layers = {layer.name: q for layer, q in zip(chosen, means, strict=True)}
    report.model = Quality.total(list(report.layers.values()))
    report.seconds = time.perf_counter() - t0
    return report


def _probe(layer: Layer, gen: torch.Generator) -> Tensor:
    """A standard Gaussian matrix in the layer's gradient-matrix shape, dtype and device."""
    w = layer.adapter.weight.param
    return torch.randn(layer.adapter.shape, generator=gen, dtype=w.dtype, device=gen.device).to(w.device)


# -- the dense exact version (small models, tests) --------------------------------------------------------------
def _on(pre: Preconditioner, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` with ``x`` in the preconditioner's device and dtype."""
    return fn(x.to(pre.device, pre.dtype))


def dense_operator(fn: Callable[[Tensor], Tensor], shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """The matrix of a linear map on ``shape``-matrices, acting on row-major ``vec`` (column k = fn(E_k))."""
    n = shape[0] * shape[1]
    basis = torch.eye(n, dtype=dtype)
    return torch.stack([fn(basis[k].reshape(shape)).to(dtype).cpu().reshape(-1) for k in range(n)], dim=1)


def dense_hessian(
    manager: PreconditionerManager,
    loss_fn: Callable[[], Tensor],
    *,
    layers: Sequence[str] | None = None,
    model: nn.Module | None = None,
) -> tuple[Tensor, dict[str, slice]]:
    """The managed Hessian as a dense matrix over the layers' row-major ``vec(G)`` coordinates, concatenated in
    layer order (one double backward per coordinate), and each layer's slice of it. Side-effect free."""
    chosen = _select(manager, layers)
    params = [p for layer in chosen for p in layer.adapter.params]
    spans = _spans(chosen)
    sizes = [layer.adapter.shape[0] * layer.adapter.shape[1] for layer in chosen]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    dtype = torch.float64
    columns = []
    with isolated(manager, model):
        hvp = CurvatureProducts(loss_fn, params, manager.warn_once)
        zeros = [torch.zeros_like(p) for p in params]
        for layer, span, size in zip(chosen, spans, sizes, strict=True):
            w = layer.adapter.weight.param
            for k in range(size):
                e = torch.zeros(size, dtype=w.dtype, device=w.device)
                e[k] = 1.0
                vectors = list(zeros)
                vectors[span] = layer.adapter.from_matrix(e.reshape(layer.adapter.shape))
                hv = hvp(vectors)
                col = [lay.adapter.to_matrix(hv[s]).reshape(-1) for lay, s in zip(chosen, spans, strict=True)]
                columns.append(torch.cat(col).to(dtype).cpu())
    h = torch.stack(columns, dim=1) if columns else torch.zeros(0, 0, dtype=dtype)
    slices = {layer.name: slice(offsets[i], offsets[i + 1]) for i, layer in enumerate(chosen)}
    return h, slices


def exact_quality(
    manager: PreconditionerManager,
    loss_fn: Callable[[], Tensor],
    *,
    mode: Mode = "joint",
    model: nn.Module | None = None,
    layers: Sequence[str] | None = None,
    max_dim: int = 4096,
) -> QualityReport:
    """The exact expectations (δθ ~ N(0, I)) from a dense Hessian and dense per-layer P and P⁻¹, in float64:
    ``a = tr(P_l M_l)``, ``b = tr(P_l⁻¹)``, ``a_I = tr(M_l)``, ``b_I = dim`` with ``M_l = (H²)_ll`` (joint) or
    ``H_ll²`` (layer). For small models: cost is one double backward per managed parameter."""
    v.check_choice("mode", mode, MODES)
    v.check_int("max_dim", max_dim)
    t0 = time.perf_counter()
    chosen = _select(manager, layers)
    n = sum(layer.adapter.shape[0] * layer.adapter.shape[1] for layer in chosen)
    if n > max_dim:
        raise ValueError(
            f"exact_quality builds dense {n} x {n} matrices, more than `max_dim`={max_dim}; "
            "select fewer `layers`, raise `max_dim` or use measure_quality"
        )
    names = [layer.name for layer in chosen]
    h, slices = dense_hessian(manager, loss_fn, layers=names, model=model)
    report = QualityReport(probes=0, mode=mode)
    f64 = torch.float64
    for layer in chosen:
        s, pre, shape = slices[layer.name], layer.preconditioner, layer.adapter.shape
        m = h[:, s].mT @ h[:, s] if mode == "joint" else h[s, s] @ h[s, s]
        p = dense_operator(partial(_on, pre, pre.precondition), shape, f64)
        p_inv = dense_operator(partial(_on, pre, pre.curvature_matvec), shape, f64)
        report.layers[layer.name] = Quality(
            float((p * m.mT).sum()), float(p_inv.trace()), float(m.trace()), float(s.stop - s.start)
        )
    report.model = Quality.total(list(report.layers.values())) if chosen else Quality(*(math.nan,) * 4)
    report.seconds = time.perf_counter() - t0
    return report
