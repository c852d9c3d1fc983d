"""lightning-soo: second-order optimization for PyTorch Lightning, as callbacks."""

from lightning_soo.manager import PreconditionerManager
from lightning_soo.preconditioners import KFAC, Preconditioner

__version__ = "0.1.0"

__all__ = ["KFAC", "KFACCallback", "Preconditioner", "PreconditionerManager", "SecondOrderCallback", "__version__"]


def __getattr__(name: str) -> object:
    # the callbacks import Lightning; keep `import lightning_soo` free of it for plain-PyTorch users
    if name in ("KFACCallback", "SecondOrderCallback"):
        from lightning_soo import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_soo' has no attribute {name!r}")
