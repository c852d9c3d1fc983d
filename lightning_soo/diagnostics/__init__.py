"""Diagnostics: curvature quality (PSGD's criterion), PSGD's Newton-form fit, and the scalars the dashboard shows;
with the autograd utilities they share."""

from lightning_soo.diagnostics.autograd import hvp, loss_gradients, preserved_state
from lightning_soo.diagnostics.newton import fit_hessian
from lightning_soo.diagnostics.quality import Quality, QualityReport, exact_quality, measure_quality

__all__ = [
    "Quality",
    "QualityReport",
    "exact_quality",
    "fit_hessian",
    "hvp",
    "loss_gradients",
    "measure_quality",
    "preserved_state",
]
