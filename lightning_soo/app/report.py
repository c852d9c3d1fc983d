"""``lightning-soo report LOGDIR``: PNG plots from the TensorBoard logs of a run with the library's callbacks.

Reads every event file under LOGDIR (one run per folder) and plots the "second-order" scalars: quality index and
criterion per layer and for the model, damping and the refresh timeline with the freeze, and time per step.
Runs without them (a plain SGD baseline) are named and skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_soo.app.data import require

Series = dict[str, tuple[list[int], list[float]]]

METHOD_NAMES = {"kfac": "K-FAC", "shampoo": "Shampoo", "gauss_newton": "Gauss-Newton", "psgd": "PSGD"}
METHOD_TAG = "soo/method/text_summary"  # written by the callbacks with the dashboard layout


def _events(run_dir: Path) -> Any:
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def read_scalars(run_dir: Path, prefix: str = "soo/") -> Series:
    """Every scalar tag under ``prefix`` in the event files of ``run_dir``: tag -> (steps, values)."""
    events = _events(run_dir)
    out: Series = {}
    for tag in events.Tags().get("scalars", []):
        if tag.startswith(prefix):
            points = events.Scalars(tag)
            out[tag] = ([p.step for p in points], [p.value for p in points])
    return out


def read_method(run_dir: Path) -> str | None:
    """The method the run's callback logged (``"kfac"``, ...), or None for logs written before it was logged."""
    events = _events(run_dir)
    if METHOD_TAG not in events.Tags().get("tensors", []):
        return None
    values = events.Tensors(METHOD_TAG)[-1].tensor_proto.string_val
    return values[0].decode() if values else None


def runs(logdir: Path) -> list[Path]:
    """Folders under ``logdir`` that hold event files."""
    return sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")})


def title(method: str | None, run_name: str) -> str:
    """``"K-FAC — kfac/version_0"``: the method and the run's name inside the log folder (no machine path)."""
    label = ", ".join(METHOD_NAMES.get(m, m) for m in method.split(", ")) if method else "lightning-soo"
    return f"{label} — run {run_name}"


def _no_data(ax: Any, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _lines(ax: Any, series: Series, prefix: str) -> list[str]:
    tags = sorted(t for t in series if t.startswith(prefix))
    for tag in tags:
        steps, values = series[tag]
        name = tag.removeprefix(prefix) or tag.rsplit("/", 1)[-1]
        ax.plot(steps, values, label=name, lw=2 if name == "model" else 1)
    return tags


def _legend_below(ax: Any, handles: list[Any] | None = None) -> None:
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)


def _damping_panel(ax: Any, series: Series) -> None:
    """Damping (log axis, no offset), refreshes counted per refresh on a twin axis, the freeze as a line."""
    from matplotlib.ticker import MaxNLocator

    styles = {  # the set value wide and pale, the applied one thin on top: equal values stay both visible
        "soo/damping": ("damping (set)", {"lw": 4, "alpha": 0.4}),
        "soo/damping_applied": ("damping applied (mean over layers)", {"lw": 1.2}),
    }
    values = []
    for tag, (name, style) in styles.items():
        if tag in series:
            ax.plot(*series[tag], label=name, **style)
            values += [v for v in series[tag][1] if v > 0]
    handles = list(ax.get_lines())
    if handles:
        ax.set_yscale("log")
        ax.set_ylabel("damping ρ")
        if values and max(values) < 1.5 * min(values):  # about constant: a decade around it, not an edge
            ax.set_ylim(min(values) / 3, max(values) * 3)
    else:
        ax.set_yticks([])
        ax.text(0.02, 0.95, "no damping (PSGD)", transform=ax.transAxes, fontsize=8, va="top", color="0.4")
    if "soo/refreshes" in series:
        twin = ax.twinx()
        steps, values = series["soo/refreshes"]
        handles += twin.step(steps, values, where="post", color="tab:green", label="refreshes")
        twin.set_ylabel("refreshes", color="tab:green")
        twin.ticklabel_format(axis="y", useOffset=False, style="plain")
        twin.yaxis.set_major_locator(MaxNLocator(integer=True))
        twin.set_ylim(bottom=0)
    if "soo/frozen" in series:
        steps, values = series["soo/frozen"]
        frozen = [s for s, v in zip(steps, values, strict=True) if v > 0.5]
        if frozen:
            handles.append(ax.axvline(frozen[0], color="tab:red", ls="--", label=f"frozen at step {frozen[0]}"))
    _legend_below(ax, handles)


def plot_run(series: Series, path: Path, title: str) -> None:
    """A 2 x 2 PNG of one run's scalars; panels without data say why."""
    require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=110, layout="constrained")
    quality_missing = "no data:\ncurvature quality is measured\nby a CurvatureScheduler"
    panels = [
        (axes[0, 0], "soo/quality_index/", "quality index (1 = SGD, lower is better)", quality_missing),
        (axes[0, 1], "soo/criterion/", "curvature criterion c(P)", quality_missing),
        (axes[1, 1], "soo/ms_per_step/", "time per step in the library (ms)", "no data:\nno step timings logged"),
    ]
    for ax, prefix, label, missing in panels:
        ax.set_title(label, fontsize=10)
        if not _lines(ax, series, prefix):
            _no_data(ax, missing)
            continue
        ax.set_xlabel("step")
        if prefix != "soo/ms_per_step/":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        _legend_below(ax)
    ax = axes[1, 0]
    ax.set_title("damping, refreshes and the freeze", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    _damping_panel(ax, series)
    fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)


def report(logdir: Path, out: Path | None = None) -> list[Path]:
    """One PNG per run found under ``logdir`` that has lightning-soo scalars; returns their paths."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"{logdir} does not exist or is not a folder")
    out = Path(out or logdir)
    written, skipped = [], []
    for run in runs(logdir):
        run_name = run.relative_to(logdir).as_posix() if run != logdir else logdir.name
        series = read_scalars(run)
        if not series:
            skipped.append(run_name)
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"report_{run_name.replace('/', '_')}.png"
        plot_run(series, path, title(read_method(run), run_name))
        written.append(path)
        print(f"{run_name}: {len(series)} scalar tags -> {path}")
    if skipped:
        print(f"skipped (no lightning-soo scalars, e.g. a run without a lightning-soo callback): {', '.join(skipped)}")
    if not written:
        print(f"no lightning-soo scalars found under {logdir}")
    return written
