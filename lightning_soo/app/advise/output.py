"""What ``advise`` hands the user: the printed report and verdict, ``advise.json``, ``advise.png`` and
``advise.yaml`` (a LightningCLI config for the recommended setting, or the best one tried when none is)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning_soo.app.advise.arms import CLASSES, LABELS


def _fmt(value: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def freeze_fraction(arm: dict[str, Any], full_steps: int | None, probe_steps: int) -> float | None:
    """``CurvatureScheduler(frequent_fraction=...)`` from the step where the arm's quality stopped improving (two
    significant digits, rounded up, at least 0.01); None: it did not stop within the probe."""
    step = arm.get("freeze_step")
    if step is None:
        return None
    fraction = max(step, 1) / (full_steps or probe_steps)
    digits = 1 - math.floor(math.log10(fraction))
    return max(0.01, min(1.0, math.ceil(fraction * 10**digits) / 10**digits))


def damping_text(arm: dict[str, Any], lr: float | None, batch: int | None) -> str:
    """The damping argument as Python: K-FAC's absolute damping as a ``ScaledDamping`` rule anchored at the user's
    learning rate and batch size (Fig. 5), the relative dampings of Shampoo and Gauss-Newton as numbers."""
    rho = arm.get("damping")
    if rho is None:
        return ""
    if arm["method"] == "kfac" and lr and batch:
        return f"damping=ScaledDamping({rho:g}, reference_lr={lr:g}, reference_batch_size={batch})"
    return f"damping={rho:g}"


def recommendation(summary: dict[str, Any], arm: dict[str, Any]) -> str:
    """``KFACCallback(damping=...)`` [+ ``CurvatureScheduler(frequent_fraction=f)``]."""
    text = f"{CLASSES[arm['method']]}({damping_text(arm, summary['lr'], summary['batch_size'])})"
    fraction = freeze_fraction(arm, summary["full_steps"], summary["steps"])
    return text if fraction is None else f"{text} + CurvatureScheduler(frequent_fraction={fraction:g})"


def verdict_line(summary: dict[str, Any]) -> str:
    """One sentence a user can act on."""
    decision = summary["decision"]
    ratio = summary["batch_ratio"]
    scale = f"batch/dataset {ratio:.3g}" if ratio is not None else "batch/dataset unknown"
    if decision["verdict"] == "keep":
        return f"not worth it here: {scale}; {decision['reason']}; keep your optimizer"
    arm = summary["best"][decision["method"]] if decision["method"] else None
    if decision["verdict"] == "marginal" and arm is not None:
        return (
            f"about even here: {LABELS[arm['method']]} {_fmt(arm['time_ratio'], '.2f')}x in wall-clock "
            f"({_fmt(arm['step_ratio'], '.2g')}x fewer steps at {_fmt(arm['cost_ratio'], '.2g')}x cost per step; "
            f"{scale}); keep your optimizer, or confirm with a longer probe: --steps {2 * summary['steps']}"
        )
    if decision["verdict"] == "inconclusive" or arm is None:
        who = f"{LABELS[arm['method']]} " if arm else ""
        longer = 2 * summary["steps"]
        return f"too close to call: {who}{decision['reason']} ({scale}); run a longer probe: --steps {longer}"
    return (
        f"{LABELS[arm['method']]}: {_fmt(arm['step_ratio'], '.2g')}x fewer steps, {_fmt(arm['cost_ratio'], '.2g')}x "
        f"cost per step, expected {_fmt(arm['time_ratio'], '.3g')}x faster in wall-clock; use "
        f"`{recommendation(summary, arm)}`"
    )


def report_lines(summary: dict[str, Any], probe_seconds: float, arms_run: int) -> list[str]:
    """The printed report: the setting, one row per arm, the uncertainty, the verdict."""
    base, n = summary["baseline"], summary["steps"]
    full = summary["full_steps"]
    lines = [
        f"lightning-soo advise: {arms_run} arms x {n} optimizer steps, same initial weights and batches; "
        f"probe cost {probe_seconds:.0f} s wall-clock",
        f"batch {_fmt(summary['batch_size'], 'd' if summary['batch_size'] else '')} of "
        f"{_fmt(summary['dataset_size'], ',d' if summary['dataset_size'] else '')} examples (batch/dataset "
        f"{_fmt(summary['batch_ratio'])}); your optimizer: {summary['optimizer']} lr {_fmt(summary['lr'], 'g')}",
        f"target: the baseline's final loss {summary['target_loss']:.4g} (mean of the last {summary['window']} "
        f"steps, noise ±{summary['noise']:.2g}); seconds: "
        + ("wall-clock" if summary["clock"] == "wall" else "process CPU time (--clock cpu)"),
        "",
        f"{'arm':<20}{'s/step':>9}{'cost':>7}{'steps→':>8}{'s→':>8}{'fewer steps':>13}{'faster':>8}"
        f"{'final loss':>12}{'quality':>9}",
        f"{'baseline':<20}{base['seconds_per_step'] * 1e3:>7.1f}ms{1:>7.2f}{_fmt(base['steps_to_target'], 'd'):>8}"
        f"{_fmt(base['seconds_to_target'], '.2f'):>8}{1:>13.2f}{1:>8.2f}{base['final_loss']:>12.4g}{'-':>9}",
    ]
    for arm in summary["arms"]:
        lines.append(
            f"{arm['name']:<20}{arm['seconds_per_step'] * 1e3:>7.1f}ms{_fmt(arm['cost_ratio'], '.2f'):>7}"
            f"{_fmt(arm['steps_to_target'], 'd'):>8}{_fmt(arm['seconds_to_target'], '.2f'):>8}"
            f"{_fmt(arm['step_ratio'], '.2f'):>13}{_fmt(arm['time_ratio'], '.2f'):>8}{arm['final_loss']:>12.4g}"
            f"{_fmt(arm['quality_mean'], '.3f'):>9}"
        )
    lines.append("")
    for method, arm in summary["best"].items():
        fraction = freeze_fraction(arm, full, n)
        when = (
            f"quality index stopped improving at step {arm['freeze_step']}: freeze after frequent_fraction={fraction:g}"
            if fraction is not None
            else "quality index still improving at the end of the probe (or not measured): do not freeze yet"
        )
        tried = sorted(a["damping"] for a in summary["arms"] if a["method"] == method and a["damping"] is not None)
        edge = ""
        if len(tried) > 1 and arm["damping"] in (tried[0], tried[-1]):
            edge = f" (the {'smallest' if arm['damping'] == tried[0] else 'largest'} tried: the best may lie beyond)"
        lines.append(f"{LABELS[method]}: best damping {_fmt(arm['damping'], 'g')}{edge}; {when}")
    if full:
        lines.append(
            f"the probe covers {n} of your run's {full} steps ({100 * n / full:.0f}%): ratios describe that early "
            "part of training, where curvature matters most; later the gap can narrow"
        )
    lines += ["", f"verdict: {verdict_line(summary)}"]
    return lines


def config_text(summary: dict[str, Any]) -> str | None:
    """A LightningCLI config (``callbacks+:``) for the recommended method, or the best one tried; None when no
    method arm ran."""
    decision = summary["decision"]
    method = decision["method"] or min(summary["best"], key=lambda m: summary["best"][m]["final_loss"], default=None)
    if method is None:
        return None
    arm = summary["best"][method]
    header = "recommended" if decision["verdict"] == "recommend" else f"NOT recommended ({decision['verdict']})"
    lines = [
        f"# lightning-soo advise: {header}. {verdict_line(summary)}",
        "# use: python train.py fit --config my.yaml --config advise.yaml",
        "trainer:",
        "  callbacks+:",
        f"    - class_path: lightning_soo.{CLASSES[method]}",
    ]
    rho, lr, batch = arm.get("damping"), summary["lr"], summary["batch_size"]
    if rho is not None and method == "kfac" and lr and batch:
        lines += [
            "      init_args:",
            "        # the seed's Fig. 5: damping proportional to learning rate and batch size, anchored at yours",
            "        damping:",
            "          class_path: lightning_soo.ScaledDamping",
            f"          init_args: {{base: {rho:g}, reference_lr: {lr:g}, reference_batch_size: {batch}}}",
        ]
    elif rho is not None:
        lines += ["      init_args:", f"        damping: {rho:g}"]
    fraction = freeze_fraction(arm, summary["full_steps"], summary["steps"])
    if fraction is not None:
        lines += [
            "    - class_path: lightning_soo.CurvatureScheduler",
            "      init_args:",
            "        # refresh every 10 steps for this fraction of training, then freeze (quality stopped improving)",
            f"        frequent_fraction: {fraction:g}",
            "        interval: null",
            "        # the quality index every N steps (about 4 double backwards each); null: not measured",
            "        quality_every_n_steps: null",
        ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Loss against optimizer steps and against seconds, one line per arm (trailing means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for arm in [summary["baseline"], *summary["arms"]]:
        label = "baseline (your optimizer)" if arm is summary["baseline"] else arm["name"]
        style = {"color": "black", "linewidth": 2} if arm is summary["baseline"] else {}
        by_step.plot(range(1, len(arm["curve"]) + 1), arm["curve"], label=label, **style)
        by_time.plot(arm["seconds"], arm["curve"], label=label, **style)
    for ax, xlabel in ((by_step, "optimizer step"), (by_time, "seconds (steady state)")):
        ax.axhline(summary["target_loss"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (trailing mean)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=7)
    fig.suptitle(verdict_line(summary)[:140], fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(summary: dict[str, Any], out: Path, probe_seconds: float, arms_run: int) -> list[str]:
    """Write ``advise.json``, ``advise.png`` and ``advise.yaml`` under ``out``; return the report's lines."""
    out.mkdir(parents=True, exist_ok=True)
    lines = report_lines(summary, probe_seconds, arms_run)
    payload = {**summary, "probe_seconds": probe_seconds, "verdict_line": verdict_line(summary), "report": lines}
    (out / "advise.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    plot(summary, out / "advise.png")
    config = config_text(summary)
    if config is not None:
        (out / "advise.yaml").write_text(config, encoding="utf-8")
    return lines
