"""Lightning callbacks: thin adapters over the plain-PyTorch manager."""

from lightning_soo.callbacks.base import SecondOrderCallback, StepArguments
from lightning_soo.callbacks.methods import GaussNewtonCallback, KFACCallback, PSGDCallback, ShampooCallback
from lightning_soo.callbacks.scheduler import CurvatureScheduler

__all__ = [
    "CurvatureScheduler",
    "GaussNewtonCallback",
    "KFACCallback",
    "PSGDCallback",
    "SecondOrderCallback",
    "ShampooCallback",
    "StepArguments",
]
