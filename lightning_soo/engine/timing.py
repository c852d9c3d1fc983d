"""Honest per-phase timings: ``perf_counter`` on the CPU; on a GPU, CUDA events recorded around each phase and
read only when someone asks (the dashboard, on logging steps), so timing adds no synchronisation to other steps."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Cumulative seconds per phase (``statistics``, ``refresh``, ``precondition``)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.cuda = device is not None and device.type == "cuda"
        self.totals: dict[str, float] = {"statistics": 0.0, "refresh": 0.0, "precondition": 0.0}
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def read(self) -> dict[str, float]:
        """The totals so far; on CUDA this waits for the recorded phases (call it on logging steps only)."""
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                self.totals[name] = self.totals.get(name, 0.0) + start.elapsed_time(end) / 1e3
            self._pending.clear()
        return dict(self.totals)
