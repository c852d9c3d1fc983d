"""Damping: a constant, or a callable of the step and the current learning rate."""

from __future__ import annotations

from collections.abc import Callable

DampingFn = Callable[[int, float | None], float]


class Damping:
    """The damping ``ρ`` in force at a refresh.

    ``Damping(1e-3)`` is constant; ``Damping(fn)`` calls ``fn(step, lr)`` (``lr`` the optimizer's current
    learning rate, None outside an optimizer) at every refresh.
    """

    def __init__(self, value: float | DampingFn) -> None:
        if callable(value):
            self._fn: DampingFn | None = value
            self._const = 0.0
        else:
            self._fn = None
            self._const = float(value)

    def __call__(self, step: int, lr: float | None = None) -> float:
        if self._fn is None:
            return self._const
        value = float(self._fn(step, lr))
        if not value >= 0.0:  # also catches NaN
            raise ValueError(f"damping callable returned {value!r} at step {step}; it must return a float >= 0")
        return value
