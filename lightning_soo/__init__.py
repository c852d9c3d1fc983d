"""lightning-soo: second-order optimization for PyTorch Lightning, as callbacks.

``import lightning_soo`` does not import Lightning: the callbacks are loaded on first access, so plain-PyTorch users
of ``PreconditionerManager`` pay nothing for them. Type checkers and tab completion still see every name.
"""

from typing import TYPE_CHECKING

from lightning_soo.diagnostics.quality import Quality, QualityReport, measure_quality
from lightning_soo.engine.damping import Damping, ScaledDamping
from lightning_soo.engine.manager import PreconditionerManager
from lightning_soo.engine.schedule import Schedule
from lightning_soo.options import GaussNewtonOptions, KFACOptions, PSGDOptions, ShampooOptions, StepOptions
from lightning_soo.preconditioners import KFAC, PSGD, GaussNewton, Preconditioner, Shampoo

if TYPE_CHECKING:
    from lightning_soo.callbacks import (
        CurvatureScheduler,
        GaussNewtonCallback,
        KFACCallback,
        PSGDCallback,
        SecondOrderCallback,
        ShampooCallback,
    )

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "PSGD",
    "CurvatureScheduler",
    "Damping",
    "GaussNewton",
    "GaussNewtonCallback",
    "GaussNewtonOptions",
    "KFACCallback",
    "KFACOptions",
    "PSGDCallback",
    "PSGDOptions",
    "Preconditioner",
    "PreconditionerManager",
    "Quality",
    "QualityReport",
    "ScaledDamping",
    "Schedule",
    "SecondOrderCallback",
    "Shampoo",
    "ShampooCallback",
    "ShampooOptions",
    "StepOptions",
    "__version__",
    "measure_quality",
]


def __getattr__(name: str) -> object:
    # the callbacks import Lightning; keep `import lightning_soo` free of it for plain-PyTorch users
    if name in __all__:
        from lightning_soo import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_soo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
