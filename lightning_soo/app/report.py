"""``lightning-soo report LOGDIR``: PNG plots from the TensorBoard logs of a run with the library's callbacks.

Reads every event file under LOGDIR (one run per folder) and plots the "second-order" scalars: quality index and
criterion per layer and for the model, damping and the refresh timeline with the freeze, and time per step.
"""

from __future__ import annotations

from pathlib import Path

from lightning_soo.app.data import require

Series = dict[str, tuple[list[int], list[float]]]


def read_scalars(run_dir: Path, prefix: str = "soo/") -> Series:
    """Every scalar tag under ``prefix`` in the event files of ``run_dir``: tag -> (steps, values)."""
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    out: Series = {}
    for tag in events.Tags().get("scalars", []):
        if tag.startswith(prefix):
            points = events.Scalars(tag)
            out[tag] = ([p.step for p in points], [p.value for p in points])
    return out


def runs(logdir: Path) -> list[Path]:
    """Folders under ``logdir`` that hold event files."""
    return sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")})


def plot_run(series: Series, path: Path, title: str) -> None:
    require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110)
    panels = [
        (axes[0, 0], "soo/quality_index/", "quality index (1 = SGD, lower is better)", True),
        (axes[0, 1], "soo/criterion/", "curvature criterion c(P)", True),
        (axes[1, 0], "soo/damping", "damping, refreshes, freeze", False),
        (axes[1, 1], "soo/ms_per_step/", "time per step in the library (ms)", False),
    ]
    for ax, prefix, label, log in panels:
        tags = sorted(t for t in series if t.startswith(prefix))
        for tag in tags:
            steps, values = series[tag]
            name = tag.removeprefix(prefix) or tag.rsplit("/", 1)[-1]
            ax.plot(steps, values, label=name, lw=2 if "model" in tag else 1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        if log and tags:
            ax.set_yscale("log")
        if tags:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes[1, 0]
    if "soo/refreshes" in series:
        twin = ax.twinx()
        steps, values = series["soo/refreshes"]
        twin.step(steps, values, where="post", color="tab:green", label="refreshes")
        twin.set_ylabel("refreshes", color="tab:green")
    if "soo/frozen" in series:
        steps, values = series["soo/frozen"]
        frozen = [s for s, v in zip(steps, values, strict=True) if v > 0.5]
        if frozen:
            ax.axvline(frozen[0], color="tab:red", ls="--", label=f"frozen at {frozen[0]}")
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(logdir: Path, out: Path | None = None) -> list[Path]:
    """One PNG per run found under ``logdir``; returns their paths."""
    out = Path(out or logdir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs(logdir):
        series = read_scalars(run)
        if not series:
            continue
        name = "_".join(run.relative_to(logdir).parts) or "run"
        path = out / f"report_{name}.png"
        plot_run(series, path, f"{run}")
        written.append(path)
        print(f"{run}: {len(series)} scalar tags -> {path}")
    if not written:
        print(f"no lightning-soo scalars found under {logdir}")
    return written
