"""lightning-soo: second-order optimization for PyTorch Lightning, as callbacks."""

from lightning_soo.damping import Damping, ScaledDamping
from lightning_soo.manager import PreconditionerManager
from lightning_soo.preconditioners import KFAC, PSGD, GaussNewton, Preconditioner, Shampoo
from lightning_soo.quality import Quality, QualityReport, measure_quality
from lightning_soo.schedule import Schedule

__version__ = "0.1.0"

_CALLBACKS = (
    "CurvatureScheduler",
    "GaussNewtonCallback",
    "KFACCallback",
    "PSGDCallback",
    "SecondOrderCallback",
    "ShampooCallback",
)

__all__ = [
    "KFAC",
    "PSGD",
    "CurvatureScheduler",
    "Damping",
    "GaussNewton",
    "GaussNewtonCallback",
    "KFACCallback",
    "PSGDCallback",
    "Preconditioner",
    "PreconditionerManager",
    "Quality",
    "QualityReport",
    "ScaledDamping",
    "Schedule",
    "SecondOrderCallback",
    "Shampoo",
    "ShampooCallback",
    "__version__",
    "measure_quality",
]


def __getattr__(name: str) -> object:
    # the callbacks import Lightning; keep `import lightning_soo` free of it for plain-PyTorch users
    if name in _CALLBACKS:
        from lightning_soo import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_soo' has no attribute {name!r}")
