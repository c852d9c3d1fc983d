"""Damping rules: a constant, a callable, or the seed's rule (proportional to learning rate and batch size).

The manager evaluates the damping at every refresh as ``damping(step, lr, batch_size)``, with ``lr`` the
optimizer's current learning rate (so learning-rate schedulers are followed) and ``batch_size`` the number of
examples in the step (micro-batches of gradient accumulation added up), both None when unknown. What the value
means for each method is documented in ``lightning_soo.options``.
"""

from __future__ import annotations

import inspect
import math

from lightning_soo import checks
from lightning_soo.options import DampingFn, DampingSpec


def _takes_batch_size(fn: DampingFn) -> bool:
    try:
        inspect.signature(fn).bind(0, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): assume the full form
        return True
    return True


class Damping:
    """``Damping(1e-3)`` is constant; ``Damping(fn)`` calls ``fn(step, lr, batch_size)`` (or ``fn(step, lr)``) at
    every refresh. Every value is checked: a non-finite or non-positive damping raises ValueError naming the step."""

    def __init__(self, value: DampingSpec) -> None:
        checks.check_damping("damping", value)
        self._fn: DampingFn | None = value if callable(value) else None
        self._full = self._fn is not None and _takes_batch_size(self._fn)
        self._const = 0.0 if callable(value) else float(value)

    def value(self, step: int, lr: float | None, batch_size: int | None) -> float:
        if self._fn is None:
            return self._const
        return float(self._fn(step, lr, batch_size) if self._full else self._fn(step, lr))

    def __call__(self, step: int, lr: float | None = None, batch_size: int | None = None) -> float:
        value = self.value(step, lr, batch_size)
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(
                f"damping evaluated to {value!r} at step {step} (lr={lr}, batch_size={batch_size}); "
                "it must be a finite number > 0"
            )
        return value


class ScaledDamping(Damping):
    """The seed's finding as a rule: ``ρ = base · (lr / reference_lr) · (batch_size / reference_batch_size)``.

    Tune ``base`` once at a reference learning rate and batch size; the rule then follows a learning-rate
    scheduler and a change of batch size. A factor whose value is unknown (no optimizer, no batch size) is 1.

    Raises:
        ValueError: when ``base`` or ``reference_lr`` is not a finite number > 0 or ``reference_batch_size`` is not
            an int >= 1.
    """

    def __init__(self, base: float, reference_lr: float, reference_batch_size: int) -> None:
        checks.check_float("base", base, 0.0, low_open=True)
        checks.check_float("reference_lr", reference_lr, 0.0, low_open=True)
        checks.check_int("reference_batch_size", reference_batch_size)
        super().__init__(base)
        self.base, self.reference_lr, self.reference_batch_size = base, reference_lr, reference_batch_size

    def value(self, step: int, lr: float | None, batch_size: int | None) -> float:
        rho = self.base
        if lr is not None:
            rho *= lr / self.reference_lr
        if batch_size is not None:
            rho *= batch_size / self.reference_batch_size
        return rho


def make_damping(spec: DampingSpec) -> Damping:
    return spec if isinstance(spec, Damping) else Damping(spec)
