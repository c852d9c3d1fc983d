"""Preconditioners, one file per method, all implementing ``Preconditioner``."""

from __future__ import annotations

from lightning_soo.preconditioners.base import Preconditioner
from lightning_soo.preconditioners.gauss_newton import GaussNewton
from lightning_soo.preconditioners.kfac import KFAC
from lightning_soo.preconditioners.psgd import PSGD
from lightning_soo.preconditioners.shampoo import Shampoo

METHODS: dict[str, type[Preconditioner]] = {"kfac": KFAC, "shampoo": Shampoo, "gauss_newton": GaussNewton, "psgd": PSGD}


def get_method(name: str) -> type[Preconditioner]:
    """The preconditioner class registered under ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method={name!r} is not known; accepted values: {sorted(METHODS)}") from None


__all__ = ["KFAC", "METHODS", "PSGD", "GaussNewton", "Preconditioner", "Shampoo", "get_method"]
