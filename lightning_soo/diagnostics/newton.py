"""PSGD's Newton-form fit: pairs ``(V, H V)`` for the PSGD layers whose next fitting update is due.

A manager-level driver (it needs the loss and all due layers at once, for one double backward), kept out of the
per-layer maths in ``preconditioners.psgd``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from lightning_soo.diagnostics.autograd import CurvatureProducts
from lightning_soo.diagnostics.quality import isolated
from lightning_soo.engine.manager import PreconditionerManager
from lightning_soo.preconditioners.psgd import PSGD


def fit_hessian(manager: PreconditionerManager, loss_fn: Callable[[], Tensor], model: nn.Module | None = None) -> int:
    """Newton-form pairs for every PSGD layer of ``manager`` whose next update is due: one probe ``V`` per layer,
    ``H V`` by one double backward on the batch ``loss_fn`` evaluates (side-effect free, as the quality pass).
    Returns the number of layers given a pair."""
    layers = [
        lay
        for lay in manager.layers.values()
        if isinstance(pre := lay.preconditioner, PSGD) and pre.fit == "hessian" and pre.update_due()
    ]
    if not layers:
        return 0
    params = [p for lay in layers for p in lay.adapter.params]
    with isolated(manager, model):
        hvp = CurvatureProducts(loss_fn, params, manager.warn_once)
        probes = [lay.preconditioner.probe() for lay in layers]  # type: ignore[attr-defined]
        vectors = [
            t
            for lay, v in zip(layers, probes, strict=True)
            for t in lay.adapter.from_matrix(v.to(lay.adapter.weight.param.dtype))
        ]
        products = hvp(vectors)
    start = 0
    for lay, v in zip(layers, probes, strict=True):
        n = len(lay.adapter.params)
        lay.preconditioner.observe_hvp(v, lay.adapter.to_matrix(products[start : start + n]))  # type: ignore[attr-defined]
        start += n
    return len(layers)
