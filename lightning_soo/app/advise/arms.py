"""The arms of an ``advise`` probe: the user's optimizer alone, then each method at a few dampings.

The damping grid follows the seed's Fig. 5 (the best damping grows with learning rate and batch size). For K-FAC,
whose damping is absolute, the centre is the value measured best on the digits MLP (``1e-2`` at lr 0.2, batch 512)
scaled to the user's learning rate and batch size, and the grid is kept above ``kl_clip`` (below it the clip cannot
keep the step safe: README, damping guide). Shampoo and Gauss-Newton damp relative to the largest eigenvalue, which
is already scale-free: their grids are centred on their defaults. PSGD has no damping: one arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

METHODS = ("kfac", "shampoo", "gauss_newton", "psgd")
CLASSES = {
    "kfac": "KFACCallback",
    "shampoo": "ShampooCallback",
    "gauss_newton": "GaussNewtonCallback",
    "psgd": "PSGDCallback",
}
LABELS = {"kfac": "K-FAC", "shampoo": "Shampoo", "gauss_newton": "Gauss-Newton", "psgd": "PSGD", None: "baseline"}
# (centre, spacing between grid values) per method with a damping
_REFERENCE = {"kfac": (1e-2, 3.0), "shampoo": (1e-4, 10.0), "gauss_newton": (0.3, 3.0)}
_KFAC_REFERENCE_LR, _KFAC_REFERENCE_BATCH = 0.2, 512
_KFAC_FLOOR = 2e-3  # twice the default kl_clip


@dataclass(frozen=True)
class Arm:
    """One run of the probe: ``method`` None is the user's optimizer alone."""

    name: str
    method: Optional[str] = None
    damping: Optional[float] = None


def parse_methods(text: str) -> list[str]:
    """``"kfac,shampoo"`` -> ``["kfac", "shampoo"]``; an unknown name raises ValueError listing the accepted ones."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise ValueError(f"`methods` must be a comma-separated list of {', '.join(METHODS)}; got {text!r}")
    return list(dict.fromkeys(names))


def damping_grid(method: str, size: int, lr: float | None, batch_size: int | None) -> list[float | None]:
    """``size`` dampings for ``method`` (see the module docstring); ``[None]`` for PSGD."""
    if method == "psgd":
        return [None]
    centre, spacing = _REFERENCE[method]
    if method == "kfac":
        centre *= (lr or _KFAC_REFERENCE_LR) / _KFAC_REFERENCE_LR
        centre *= (batch_size or _KFAC_REFERENCE_BATCH) / _KFAC_REFERENCE_BATCH
    values = [centre * spacing ** (i - (size - 1) / 2) for i in range(size)]
    if method == "kfac":
        values = [max(v, _KFAC_FLOOR) for v in values]
    return list(dict.fromkeys(float(f"{v:.2g}") for v in values))


def plan(methods: list[str], grid: int, lr: float | None, batch_size: int | None) -> list[Arm]:
    """The method arms (the baseline is run first, alone, to learn ``lr`` and ``batch_size``)."""
    arms = []
    for method in methods:
        for rho in damping_grid(method, grid, lr, batch_size):
            arms.append(Arm(method if rho is None else f"{method}@{rho:g}", method, rho))
    return arms


def default_interval(method: str) -> int:
    """The method's own ``preconditioner_interval`` (the probe keeps it: refreshes are amortised as in a real run)."""
    from lightning_soo import options

    cls = {"kfac": options.KFACOptions, "shampoo": options.ShampooOptions}.get(method)
    cls = cls or {"gauss_newton": options.GaussNewtonOptions, "psgd": options.PSGDOptions}[method]
    return int(cls().preconditioner_interval or 1)


def callback_specs(arm: Arm, steps: int) -> list[dict[str, Any]]:
    """LightningCLI ``class_path``/``init_args`` entries of the arm's method callback and its quality-measuring
    ``CurvatureScheduler`` (refreshing on the method's own interval, never freezing)."""
    if arm.method is None:
        return []
    args: dict[str, Any] = {} if arm.damping is None else {"damping": arm.damping}
    scheduler = {
        "frequent_fraction": 0.0,
        "interval": default_interval(arm.method),
        "quality_every_n_steps": max(1, steps // 8),
    }
    return [
        {"class_path": f"lightning_soo.{CLASSES[arm.method]}", "init_args": args},
        {"class_path": "lightning_soo.CurvatureScheduler", "init_args": scheduler},
    ]


def build_callbacks(arm: Arm, steps: int) -> list[Any]:
    """The same callbacks as ``callback_specs``, constructed (for the in-process ``advise``)."""
    import lightning_soo

    return [
        getattr(lightning_soo, spec["class_path"].rsplit(".", 1)[1])(**spec["init_args"])
        for spec in callback_specs(arm, steps)
    ]
