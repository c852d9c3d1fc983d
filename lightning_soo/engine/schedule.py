"""When statistics are collected and preconditioners refreshed, and when curvature is frozen.

Step indices count optimizer steps from 0. The seed's Table 1 shape:

* statistics every ``statistics_interval`` steps;
* during the first ``frequent_steps`` steps (the frequent phase) the preconditioner is refreshed every
  ``frequent_interval`` steps;
* afterwards every ``preconditioner_interval`` steps, or never when it is None: the curvature is then frozen,
  the hooks come off and only the preconditioning products remain.

Step 0 always collects and refreshes, so a preconditioner exists from the first step. Adaptive freezing (the
preconditioner stopped changing) is decided by the manager, which calls ``freeze``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


class Schedule:
    """Fixed-interval schedule with an optional frequent phase and freeze."""

    def __init__(
        self,
        statistics_interval: int = 1,
        preconditioner_interval: int | None = 10,
        *,
        frequent_interval: int | None = None,
        frequent_steps: int = 0,
        elapsed: Callable[[], int] | None = None,
    ) -> None:
        self.elapsed = elapsed  # training steps done, counted as ``frequent_steps`` is: the phase ends at either
        self.statistics_interval = statistics_interval
        self.preconditioner_interval = preconditioner_interval
        self.frequent_interval = frequent_interval or preconditioner_interval or statistics_interval
        self.frequent_steps = frequent_steps
        self.frozen = False
        self.frozen_at: int | None = None

    def collects(self, step: int) -> bool:
        """Statistics are captured at ``step``."""
        return not self.frozen and not self.freezes(step) and step % self.statistics_interval == 0

    def refreshes(self, step: int) -> bool:
        """The preconditioner is recomputed at ``step``."""
        if self.frozen or self.freezes(step):
            return False
        if step == 0:
            return True
        if self._frequent(step):
            return step % self.frequent_interval == 0
        interval = self.preconditioner_interval
        return interval is not None and step % interval == 0

    def read_before_next(self, step: int) -> bool:
        """A refresh comes at or after ``step`` and before the next statistics step: statistics collected at
        ``step`` are read by a refresh even where it keeps only the latest (``Preconditioner.running_statistics``)."""
        return any(self.refreshes(r) for r in range(step, step + self.statistics_interval))

    def freezes(self, step: int) -> bool:
        """The schedule has no refresh left from ``step`` on (``preconditioner_interval=None`` past the frequent
        phase); step 0 is never frozen."""
        return step > 0 and self.preconditioner_interval is None and not self._frequent(step)

    def _frequent(self, step: int) -> bool:
        """``step`` is in the frequent phase: before ``frequent_steps`` steps, and before as many by ``elapsed``
        (a trainer's optimizer steps, where a step of this schedule is not one: two optimizers stepping per batch,
        a step skipped in an ``optimizer_step`` override)."""
        return step < self.frequent_steps and (self.elapsed is None or self.elapsed() < self.frequent_steps)

    def freeze(self, step: int) -> None:
        if not self.frozen:
            self.frozen, self.frozen_at = True, step

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen, "frozen_at": -1 if self.frozen_at is None else self.frozen_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = bool(state.get("frozen", False))
        at = int(state.get("frozen_at", -1))
        self.frozen_at = None if at < 0 else at


class ChangeMonitor:
    """Adaptive freeze: watches the relative change of the curvature statistics between refreshes,
    ``√(Σ‖S_new − S_old‖²) / √(Σ‖S_old‖²)`` over all layers, and says when it stayed below ``tolerance`` for
    ``patience`` refreshes in a row."""

    def __init__(self, tolerance: float, patience: int = 3) -> None:
        self.tolerance, self.patience = tolerance, patience
        self.last_change: float | None = None
        self.calm = 0
        self._snapshot: dict[str, list[Tensor]] = {}

    def observe(self, states: dict[str, list[Tensor]]) -> bool:
        """Record this refresh's statistics; True when the curvature should be frozen."""
        num = den = 0.0
        for name, tensors in states.items():
            new = [t.detach().clone() for t in tensors]
            old = self._snapshot.get(name)
            if old is not None and len(old) == len(new):
                pairs = [(n, o) for n, o in zip(new, old, strict=True) if n.shape == o.shape]  # e.g. N changed
                num += sum(float((n - o).square().sum()) for n, o in pairs)
                den += sum(float(o.square().sum()) for _, o in pairs)
            self._snapshot[name] = new
        if den == 0.0:
            return False
        self.last_change = (num / den) ** 0.5
        self.calm = self.calm + 1 if self.last_change < self.tolerance else 0
        if self.calm >= self.patience:
            self._snapshot.clear()
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"calm": self.calm, "last_change": -1.0 if self.last_change is None else self.last_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calm = int(state.get("calm", 0))
        change = float(state.get("last_change", -1.0))
        self.last_change = None if change < 0 else change
