"""Lightning callbacks: thin adapters over the plain-PyTorch manager."""

from lightning_soo.callbacks.base import SecondOrderCallback
from lightning_soo.callbacks.curvature import CurvatureScheduler
from lightning_soo.callbacks.gauss_newton import GaussNewtonCallback
from lightning_soo.callbacks.kfac import KFACCallback
from lightning_soo.callbacks.psgd import PSGDCallback
from lightning_soo.callbacks.shampoo import ShampooCallback

__all__ = [
    "CurvatureScheduler",
    "GaussNewtonCallback",
    "KFACCallback",
    "PSGDCallback",
    "SecondOrderCallback",
    "ShampooCallback",
]
