"""From the arms' own records to the numbers and the verdict of ``advise``. Plain Python (no torch, no Lightning):
every figure here is computed from what ``ProbeCallback`` recorded, so tests can feed it synthetic records.

Definitions (one place, used by the report, the JSON and the README's check):

* seconds of a step: its own time (forward, backward, preconditioning, optimizer step) plus the arm's median time
  between steps (data loading, loop); the first ``warmup`` steps are replaced by the steady-state mean, so start-up
  costs do not count. Refresh steps are kept: the mean amortises them.
* cost ratio: the arm's steady seconds per step over the baseline's.
* target: the baseline's final loss, the trailing mean of its last ``window`` steps.
* steps / seconds to target: the first step whose trailing-mean loss is at or below the target, and the cumulative
  seconds up to it; ratios are the baseline's over the arm's (> 1: the method is faster).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Any

SPEEDUP = 1.1  # a recommendation needs at least this predicted wall-clock gain
MIN_STEPS = 20  # shorter probes cannot separate the curves from their noise
QUALITY_TOLERANCE = 0.05  # the quality index "stopped improving" below this relative gain
CLOCKS = ("wall", "cpu")


def window_for(steps: int) -> int:
    """Width of the trailing mean: 5% of the probe, at least 3 steps."""
    return max(3, round(0.05 * steps))


def warmup_for(steps: int) -> int:
    """Steps left out of the steady state: 10% of the probe, between 1 and 10."""
    return min(10, max(1, steps // 10))


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def step_durations(record: dict[str, Any], warmup: int, clock: str = "wall") -> list[float]:
    """Seconds of every step on ``clock`` (``"wall"`` or ``"cpu"``; see the module docstring)."""
    key = "" if clock == "wall" else "_cpu"
    gaps = record.get(f"gap{key}_seconds") or [0.0]
    gap = statistics.median(gaps)
    raw = [s + gap for s in record[f"step{key}_seconds"]]
    steady = raw[warmup:] or raw
    mean = sum(steady) / len(steady)
    return [mean] * min(warmup, len(raw)) + raw[warmup:]


def cumulative(values: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for value in values:
        total += value
        out.append(total)
    return out


def first_at_or_below(curve: Sequence[float], target: float) -> int | None:
    """Index of the first value ``<= target`` (None if none is)."""
    return next((i for i, value in enumerate(curve) if value <= target), None)


def freeze_step(quality: Sequence[Sequence[float]], tolerance: float = QUALITY_TOLERANCE) -> int | None:
    """The first measured step after which the quality index (lower is better) never improves by more than
    ``tolerance`` (relative) again; None when it was still improving at the last measurement or was not measured."""
    for k, (step, index) in enumerate(quality[:-1]):
        if all(later >= index * (1 - tolerance) for _, later in quality[k + 1 :]):
            return int(step)
    return None


def noise(losses: Sequence[float], window: int) -> float:
    """Standard error of a trailing mean of ``window`` losses near the end (step-to-step noise / √window)."""
    tail = losses[-2 * window :]
    diffs = [b - a for a, b in itertools.pairwise(tail)]
    if len(diffs) < 2:
        return 0.0
    return statistics.stdev(diffs) / math.sqrt(2) / math.sqrt(window)


def measure_arm(record: dict[str, Any], target: float, window: int, warmup: int, clock: str = "wall") -> dict[str, Any]:
    """The figures of one arm against the baseline's ``target`` loss."""
    losses = record["losses"]
    curve = smooth(losses, window)
    durations = step_durations(record, warmup, clock)
    seconds = cumulative(durations)
    hit = first_at_or_below(curve, target)
    steady = durations[warmup:] or durations
    return {
        "name": record["name"],
        "method": record.get("method"),
        "damping": record.get("damping"),
        "steps": len(losses),
        "seconds_per_step": sum(steady) / len(steady),
        "final_loss": curve[-1],
        "steps_to_target": None if hit is None else hit + 1,
        "seconds_to_target": None if hit is None else seconds[hit],
        "quality": record.get("quality", []),
        "quality_mean": statistics.fmean(q for _, q in record["quality"]) if record.get("quality") else None,
        "freeze_step": freeze_step(record.get("quality", [])),
        "refreshes": record.get("refreshes", 0),
        "curve": curve,
        "seconds": seconds,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def summarize(baseline: dict[str, Any], arms: Sequence[dict[str, Any]], clock: str = "wall") -> dict[str, Any]:
    """Everything ``advise`` reports, from the baseline's record and the method arms' records; seconds on ``clock``
    (``"wall"``, or ``"cpu"``: the process's CPU time, for a CPU shared with other work)."""
    if clock not in CLOCKS:
        raise ValueError(f"`clock` must be one of {', '.join(CLOCKS)}; got {clock!r}")
    n = len(baseline["losses"])
    if n == 0:
        raise ValueError("the baseline arm recorded no optimizer step")
    window, warmup = window_for(n), warmup_for(n)
    base_curve = smooth(baseline["losses"], window)
    target = base_curve[-1]
    base = measure_arm(baseline, target, window, warmup, clock)
    se = noise(baseline["losses"], window)
    measured = []
    for record in arms:
        arm = measure_arm(record, target, window, warmup, clock)
        arm["cost_ratio"] = _ratio(arm["seconds_per_step"], base["seconds_per_step"])
        arm["step_ratio"] = _ratio(base["steps_to_target"], arm["steps_to_target"])
        arm["time_ratio"] = _ratio(base["seconds_to_target"], arm["seconds_to_target"])
        arm["loss_margin"] = target - arm["final_loss"]
        arm["decisive"] = abs(arm["loss_margin"]) > 2 * math.sqrt(2) * se
        measured.append(arm)
    batch = baseline.get("batch_size")
    size = baseline.get("dataset_size")
    batch_ratio = None if not batch or not size else batch * baseline.get("accumulate", 1) / size
    best = _best_per_method(measured)
    return {
        "steps": n,
        "clock": clock,
        "window": window,
        "warmup": warmup,
        "target_loss": target,
        "noise": se,
        "batch_size": batch,
        "dataset_size": size,
        "batch_ratio": batch_ratio,
        "lr": baseline.get("lr"),
        "optimizer": baseline.get("optimizer"),
        "full_steps": baseline.get("full_steps"),
        "baseline": base,
        "arms": measured,
        "best": best,
        "decision": decide(n, best),
    }


def _key(arm: dict[str, Any]) -> tuple[float, float, float]:
    """The best damping of a method: fewest steps to the target, then the lowest final loss (a method's cost per
    step does not depend on its damping, so timing noise must not pick it); never there: the lowest final loss."""
    reached = arm["steps_to_target"]
    return (0.0, reached, arm["final_loss"]) if reached is not None else (1.0, 0.0, arm["final_loss"])


def _best_per_method(arms: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for arm in arms:
        method = str(arm["method"])
        if method not in best or _key(arm) < _key(best[method]):
            best[method] = arm
    return best


def decide(steps: int, best: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``recommend`` (a method wins by ``SPEEDUP`` beyond the noise), ``keep`` (every method is clearly slower),
    ``marginal`` (the best is within ``SPEEDUP`` of the baseline either way, its loss beyond the noise) or
    ``inconclusive`` (too short, or the final losses within the noise), with the method and the reason."""
    if steps < MIN_STEPS:
        return {"verdict": "inconclusive", "method": None, "reason": f"only {steps} steps (fewer than {MIN_STEPS})"}
    ranked = sorted(best.values(), key=lambda a: -(a["time_ratio"] or 0.0))
    winners = [a for a in ranked if (a["time_ratio"] or 0.0) >= SPEEDUP and a["decisive"]]
    if winners:
        return {"verdict": "recommend", "method": winners[0]["method"], "reason": "faster beyond the noise"}
    even = [a for a in ranked if a["decisive"] and a["time_ratio"] is not None and a["time_ratio"] >= 1 / SPEEDUP]
    if even:
        return {"verdict": "marginal", "method": even[0]["method"], "reason": "within 10% of the baseline"}
    noisy = [a for a in ranked if not a["decisive"]]
    if noisy:
        return {"verdict": "inconclusive", "method": noisy[0]["method"], "reason": "final losses within the noise"}
    return {"verdict": "keep", "method": None, "reason": "every method is slower to the baseline's loss"}
