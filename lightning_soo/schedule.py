"""When statistics are collected and preconditioners refreshed; the freeze.

Step indices count optimizer steps from 0. Statistics are collected every ``statistics_interval`` steps and
preconditioners refreshed every ``preconditioner_interval`` steps (step 0 always does both, so a preconditioner
exists from the start). Once ``frozen``, neither happens again: only the preconditioning products remain.
"""

from __future__ import annotations

from typing import Any


class Schedule:
    """Fixed-interval schedule with an explicit freeze switch."""

    def __init__(self, statistics_interval: int = 1, preconditioner_interval: int = 10) -> None:
        self.statistics_interval = statistics_interval
        self.preconditioner_interval = preconditioner_interval
        self.frozen = False

    def collects(self, step: int) -> bool:
        return not self.frozen and step % self.statistics_interval == 0

    def refreshes(self, step: int) -> bool:
        return not self.frozen and step % self.preconditioner_interval == 0

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = bool(state.get("frozen", False))
