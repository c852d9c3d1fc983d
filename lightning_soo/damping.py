"""Damping: a constant, a callable, or the seed's rule (proportional to learning rate and batch size).

The manager evaluates the damping at every refresh as ``damping(step, lr, batch_size)``, with ``lr`` the
optimizer's current learning rate (so learning-rate schedulers are followed) and ``batch_size`` the number of
examples in the step (micro-batches of gradient accumulation added up), both None when unknown.
"""

from __future__ import annotations

from collections.abc import Callable

DampingFn = Callable[[int, float | None], float]


class Damping:
    """``Damping(1e-3)`` is constant; ``Damping(fn)`` calls ``fn(step, lr)`` at every refresh."""

    def __init__(self, value: float | DampingFn) -> None:
        self._fn: DampingFn | None = value if callable(value) else None
        self._const = 0.0 if callable(value) else float(value)

    def value(self, step: int, lr: float | None, batch_size: int | None) -> float:
        return self._const if self._fn is None else float(self._fn(step, lr))

    def __call__(self, step: int, lr: float | None = None, batch_size: int | None = None) -> float:
        value = self.value(step, lr, batch_size)
        if not value >= 0.0:  # also catches NaN
            raise ValueError(f"damping evaluated to {value!r} at step {step}; it must be a float >= 0")
        return value


class ScaledDamping(Damping):
    """The seed's finding as a rule: ``ρ = base · (lr / reference_lr) · (batch_size / reference_batch_size)``.

    Tune ``base`` once at a reference learning rate and batch size; the rule then follows a learning-rate
    scheduler and a change of batch size. A factor whose value is unknown (no optimizer, no batch size) is 1.
    """

    def __init__(self, base: float, reference_lr: float, reference_batch_size: int) -> None:
        super().__init__(base)
        self.base, self.reference_lr, self.reference_batch_size = base, reference_lr, reference_batch_size

    def value(self, step: int, lr: float | None, batch_size: int | None) -> float:
        rho = self.base
        if lr is not None:
            rho *= lr / self.reference_lr
        if batch_size is not None:
            rho *= batch_size / self.reference_batch_size
        return rho


def make_damping(spec: float | DampingFn | Damping) -> Damping:
    return spec if isinstance(spec, Damping) else Damping(spec)
