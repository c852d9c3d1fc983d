"""Check ``lightning-soo advise`` against reality on MNIST-1D (``examples/cli_project.py``).

For each batch size: run ``advise`` on a short budget, then the full runs (the user's SGD; the user's config plus
the ``advise.yaml`` it wrote, recommended or not, freeze included; and the same method and damping never frozen, as
in the probe), each recorded by the same probe from the same initial weights and batches, and compare the predicted
wall-clock ratio (SGD's seconds to its final loss over the method's, on the probe) with the measured one (the same
ratio over the full runs, against SGD's full-run final loss).

    OMP_NUM_THREADS=1 python examples/advise_check.py            # both settings, ~10 min on one core
    OMP_NUM_THREADS=1 python examples/advise_check.py --quick    # a smoke test: seconds of training

Writes ``examples/results/advise_b{B}.{json,png,yaml}`` (the advise outputs) and ``advise_check.json``, and prints
the predicted-vs-measured table. ``--clock cpu`` (default here) times steps by the process's CPU time, because the
machine these figures come from was shared; wall-clock figures are recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lightning_soo.app.advise.arms import Arm
from lightning_soo.app.advise.runner import cli_runner
from lightning_soo.app.advise.verdict import summarize

HERE = Path(__file__).resolve().parent
SCRIPT, CONFIG = HERE / "cli_project.py", HERE / "cli_project.yaml"
# (batch size, probe steps, full-run epochs): 8,000 examples, so batch 2048 is N/4 (4 steps per epoch)
SETTINGS = [(2048, 100, 100), (128, 200, 20)]
QUICK = [(2048, 8, 3)]


def advise(batch: int, steps: int, epochs: int, out: Path, clock: str) -> dict[str, Any]:
    """``lightning-soo advise`` on the project at this batch size; its JSON."""
    cmd = [
        sys.executable, "-m", "lightning_soo", "advise", str(SCRIPT), "--config", str(CONFIG),
        "--steps", str(steps), "--clock", clock, "--out", str(out),
        "--", f"--data.batch_size={batch}", f"--trainer.max_epochs={epochs}",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return dict(json.loads((out / "advise.json").read_text()))


def full_runs(batch: int, epochs: int, advice: Path, best: dict[str, Any], work: Path, clock: str) -> dict[str, Any]:
    """SGD alone, SGD + ``advise.yaml`` and SGD + the best arm's method never frozen, each for the full budget and
    recorded by the probe; their summary (arms in that order)."""
    extra = [f"--data.batch_size={batch}", f"--trainer.max_epochs={epochs}"]
    probe = {"steps": 10**9, "seed": 0, "weights": str(work / "initial_weights.pt")}
    sgd = cli_runner(SCRIPT, [CONFIG], work, extra)(Arm("full_sgd"), {**probe, "save_weights": True, "name": "sgd"})
    advised = cli_runner(SCRIPT, [CONFIG, advice], work, extra)(
        Arm("full_advised"), {**probe, "save_weights": False, "name": "advised"}
    )
    unfrozen = Arm("full_unfrozen", best["method"], best["damping"])
    never = cli_runner(SCRIPT, [CONFIG], work, extra)(unfrozen, {**probe, "save_weights": False, "name": "unfrozen"})
    return summarize(sgd, [advised, {**never, "method": best["method"], "damping": best["damping"]}], clock)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny setting (smoke test)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch, steps, epochs in QUICK if args.quick else SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            predicted = advise(batch, steps, epochs, work / "advise", args.clock)
            for ext in ("json", "png", "yaml"):
                shutil.copy(work / "advise" / f"advise.{ext}", args.out / f"advise_b{batch}.{ext}")
            config = (work / "advise" / "advise.yaml").read_text()
            best = predicted["best"][_method(predicted)]
            measured = full_runs(batch, epochs, work / "advise" / "advise.yaml", best, work / "full", args.clock)
        rows.append(_row(batch, steps, epochs, predicted, measured, "frequent_fraction" in config))
    name = "advise_check_quick" if args.quick else "advise_check"
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    lines = table(rows)
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    for line in lines:
        print(line)
    return rows


def _method(predicted: dict[str, Any]) -> str:
    """The method of ``advise.yaml``: the verdict's, else the lowest final loss (as ``output.config_text``)."""
    best = predicted["best"]
    return str(predicted["decision"]["method"] or min(best, key=lambda m: best[m]["final_loss"]))


KEYS = ("step_ratio", "cost_ratio", "time_ratio", "final_loss")


def _row(
    batch: int, steps: int, epochs: int, predicted: dict[str, Any], measured: dict[str, Any], freeze: bool
) -> dict[str, Any]:
    best = predicted["best"][_method(predicted)]
    advised, never = measured["arms"]
    return {
        "batch_size": batch,
        "batch_ratio": predicted["batch_ratio"],
        "probe_steps": steps,
        "full_steps": measured["steps"],
        "epochs": epochs,
        "verdict": predicted["decision"]["verdict"],
        "verdict_line": predicted["verdict_line"],
        "probe_seconds": predicted["probe_seconds"],
        "method": best["name"],
        "advised_freezes": freeze,
        "predicted": {k: best[k] for k in KEYS},
        "measured": {k: advised[k] for k in KEYS},
        "measured_unfrozen": {k: never[k] for k in KEYS},
        "sgd_final_loss": measured["target_loss"],
        "sgd_full_seconds": measured["baseline"]["seconds"][-1],
        "clock": measured["clock"],
    }


def _x(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}x"


def _cell(m: dict[str, Any]) -> str:
    return f"{_x(m['step_ratio'])}, {_x(m['cost_ratio'])}, **{_x(m['time_ratio'])}** (loss {m['final_loss']:.3g})"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The README's predicted-vs-measured table (markdown)."""
    lines = [
        "| batch (batch/dataset) | advise verdict (probe) | arm | predicted: fewer steps, cost/step, **wall-clock** "
        "| measured, advise.yaml as written | measured, same arm never frozen |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} ({r['batch_ratio']:.3g}) | {r['verdict']} ({r['probe_steps']} steps, "
            f"{r['probe_seconds']:.0f} s) | {r['method']}{' + freeze' if r['advised_freezes'] else ''} | "
            f"{_cell(r['predicted'])} | {_cell(r['measured'])} | {_cell(r['measured_unfrozen'])} |"
        )
    runs = "; ".join(
        f"batch {r['batch_size']}: {r['full_steps']} steps ({r['epochs']} epochs), SGD's final loss "
        f"{r['sgd_final_loss']:.3g}"
        for r in rows
    )
    lines += ["", f"Full runs: {runs}. Seconds: {rows[0]['clock']} time."]
    return lines


if __name__ == "__main__":
    main()
