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
from lightning_soo.options import DampingFn, DampingSpec, StepOptions


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


def clip_cannot_protect(damping: float, options: StepOptions) -> str | None:
    """Why the KL clip cannot keep an absolute ``damping`` below ``kl_clip`` safe, or None.

    The clip scales the step ``Δθ = −lr·ν·P·G`` so that ``lr²ν²⟨P·G, G⟩ ≤ kl_clip``: it bounds the step in the
    curvature's own metric. In the weights, ``‖Δθ‖² ≤ λ_max(P)·lr²ν²⟨P·G, G⟩ ≤ kl_clip / ρ`` (``λ_max(P) ≤ 1/ρ``
    for K-FAC, both inverse modes), so a damping far below ``kl_clip`` lets a single step move the weights far
    along directions the curvature estimate deems flat. Measured (digits MLP, batch 512, SGD lr 0.2, momentum 0.9,
    ``kl_clip=1e-3``): after 5 epochs, final loss 0.24 at ``ρ=1e-2``, 2.8 at ``1e-3``, 3.0 at ``1e-4``, 179 at
    ``1e-6``, 2990 at ``1e-8`` (from 2.3); after 10 epochs, 0.09–0.18 at ``ρ=3e-3`` (two seeds). Hence a warning
    at ``ρ ≤ kl_clip``.
    """
    relative = getattr(options, "damping_mode", "absolute") == "relative"
    clip = options.kl_clip
    if relative or clip is None or not options.uses_damping or damping > clip:
        return None
    return (
        f"damping {damping:g} is not above kl_clip={clip:g}: the KL clip bounds each step's length in the weights only "
        f"by √(kl_clip/damping) = {(clip / damping) ** 0.5:.3g}, so it cannot keep the learning rate safe (on the "
        "digits MLP every damping at or below kl_clip diverged); raise `damping` or lower `kl_clip`"
    )
