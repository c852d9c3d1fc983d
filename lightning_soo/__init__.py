"""lightning-soo: second-order optimization for PyTorch Lightning, as callbacks.

Every public name is loaded on first access: ``import lightning_soo`` imports neither torch nor Lightning (the
``lightning-soo --help`` command stays instant), ``from lightning_soo import PreconditionerManager`` imports torch
only, and the callbacks import Lightning. Type checkers and tab completion still see every name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_soo.app.advise import advise
    from lightning_soo.callbacks import (
        CurvatureScheduler,
        GaussNewtonCallback,
        KFACCallback,
        PSGDCallback,
        SecondOrderCallback,
        ShampooCallback,
    )
    from lightning_soo.diagnostics.quality import Quality, QualityReport, measure_quality
    from lightning_soo.engine.damping import Damping, ScaledDamping
    from lightning_soo.engine.manager import PreconditionerManager
    from lightning_soo.engine.schedule import Schedule
    from lightning_soo.options import GaussNewtonOptions, KFACOptions, PSGDOptions, ShampooOptions, StepOptions
    from lightning_soo.preconditioners import KFAC, PSGD, GaussNewton, Preconditioner, Shampoo

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_HOME = {
    **dict.fromkeys(
        (
            "CurvatureScheduler",
            "GaussNewtonCallback",
            "KFACCallback",
            "PSGDCallback",
            "SecondOrderCallback",
            "ShampooCallback",
        ),
        "lightning_soo.callbacks",
    ),
    **dict.fromkeys(("Quality", "QualityReport", "measure_quality"), "lightning_soo.diagnostics.quality"),
    **dict.fromkeys(("Damping", "ScaledDamping"), "lightning_soo.engine.damping"),
    "PreconditionerManager": "lightning_soo.engine.manager",
    "advise": "lightning_soo.app.advise",
    "Schedule": "lightning_soo.engine.schedule",
    **dict.fromkeys(
        ("GaussNewtonOptions", "KFACOptions", "PSGDOptions", "ShampooOptions", "StepOptions"), "lightning_soo.options"
    ),
    **dict.fromkeys(("KFAC", "PSGD", "GaussNewton", "Preconditioner", "Shampoo"), "lightning_soo.preconditioners"),
}

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
    "advise",
    "measure_quality",
]


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        try:  # a subpackage used as an attribute (`lightning_soo.options` after `import lightning_soo`)
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
