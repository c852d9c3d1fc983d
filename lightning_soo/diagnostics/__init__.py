"""Diagnostics: curvature quality (PSGD's criterion), PSGD's Newton-form fit, and the scalars the dashboard shows;
with the autograd utilities they share."""

from lightning_soo.diagnostics.autograd import (
    CurvatureProducts,
    hvp,
    loss_gradients,
    math_attention,
    preserved_state,
    run_guarded,
)
from lightning_soo.diagnostics.newton import fit_hessian
from lightning_soo.diagnostics.quality import Quality, QualityReport, exact_quality, measure_quality

__all__ = [
    "CurvatureProducts",
    "Quality",
    "QualityReport",
    "exact_quality",
    "fit_hessian",
    "hvp",
    "loss_gradients",
    "math_attention",
    "measure_quality",
    "preserved_state",
    "run_guarded",
]
