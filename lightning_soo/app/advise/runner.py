"""Running the arms: the user's LightningCLI script in one subprocess per arm (zero code), or a LightningModule in
this process (``advise()``). Both put the same ``ProbeCallback`` first and the method's callbacks after it, and both
hand the records to ``verdict.summarize``.

Why a subprocess per arm for LightningCLI: the user's script, configs and command-line stay exactly theirs (the
probe is one more config with ``callbacks+:``), each arm starts from a fresh interpreter (no state, compiled kernels
or allocator warm-up carried from one arm to the next), and a crashing arm cannot take the others down.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_soo.app.advise.arms import Arm, callback_specs, plan
from lightning_soo.app.advise.verdict import summarize

Runner = Callable[[Arm, dict[str, Any]], dict[str, Any]]


def run_arms(
    runner: Runner, methods: list[str], steps: int, grid: int, seed: int, work: Path, say: Callable[[str], None]
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """The baseline first (it saves the initial weights and tells the batch size and learning rate the damping grid
    is scaled to), then every method arm from those weights; returns (baseline, arm records, arms run)."""
    weights = str(work / "initial_weights.pt")
    probe = {"steps": steps, "seed": seed, "weights": weights}
    say(f"advise: baseline (your optimizer), {steps} steps")
    baseline = runner(Arm("baseline"), {**probe, "save_weights": True, "name": "baseline"})
    arms = plan(methods, grid, baseline.get("lr"), baseline.get("batch_size"))
    records = []
    for i, arm in enumerate(arms, 1):
        say(f"advise: arm {i}/{len(arms)} {arm.name}")
        record = runner(arm, {**probe, "save_weights": False, "name": arm.name})
        records.append({**record, "method": arm.method, "damping": arm.damping})
    return baseline, records, len(arms) + 1


# -- LightningCLI: one subprocess per arm --------------------------------------------------------------------------
def cli_runner(
    script: Path, configs: Sequence[Path], work: Path, extra_args: Sequence[str] = (), keep_validation: bool = False
) -> Runner:
    """Runs ``python SCRIPT fit --config ... <arm config>`` and reads the probe's JSON back."""

    def run(arm: Arm, probe: dict[str, Any]) -> dict[str, Any]:
        work.mkdir(parents=True, exist_ok=True)
        record_path = work / f"{arm.name}.json"
        specs = [
            {
                "class_path": "lightning_soo.app.advise.probe.ProbeCallback",
                "init_args": {**probe, "out": str(record_path)},
            },
            *callback_specs(arm, probe["steps"]),
        ]
        config = work / f"{arm.name}.yaml"
        config.write_text(json.dumps({"trainer": {"callbacks+": specs}}), encoding="utf-8")  # JSON is YAML
        validation = [] if keep_validation else ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]
        cmd = [
            sys.executable, str(script), "fit",
            *[arg for c in configs for arg in ("--config", str(c))],
            *extra_args,
            f"--seed_everything={probe['seed']}",
            f"--trainer.default_root_dir={work / arm.name}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            *validation,
            "--config", str(config),
        ]  # fmt: skip
        log = work / f"{arm.name}.log"
        with log.open("w", encoding="utf-8") as handle:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=script.parent, check=False)
        if proc.returncode != 0 or not record_path.is_file():
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            raise RuntimeError(
                f"advise: arm '{arm.name}' failed (exit {proc.returncode}); command:\n  {' '.join(cmd)}\n"
                f"last lines of {log}:\n{tail}"
            )
        return dict(json.loads(record_path.read_text(encoding="utf-8")))

    return run


# -- in this process -----------------------------------------------------------------------------------------------
def module_runner(model: Any, data: Any, trainer_kwargs: dict[str, Any], work: Path) -> Runner:
    """Fits a fresh copy of ``model`` per arm (copied before any arm trains) with ``L.Trainer(**trainer_kwargs)``
    plus the arm's callbacks; ``data`` is a LightningDataModule or a training DataLoader. Records go to ``work``."""
    import lightning as L

    from lightning_soo.app.advise.arms import build_callbacks
    from lightning_soo.app.advise.probe import ProbeCallback

    pristine = copy.deepcopy(model)
    user_callbacks = list(trainer_kwargs.get("callbacks") or [])

    def run(arm: Arm, probe: dict[str, Any]) -> dict[str, Any]:
        recorder = ProbeCallback(**probe, out=str(work / f"{arm.name}.json"))
        callbacks = [*copy.deepcopy(user_callbacks), recorder, *build_callbacks(arm, probe["steps"])]
        kwargs = {
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            **trainer_kwargs,
            "callbacks": callbacks,
        }
        trainer = L.Trainer(**kwargs)
        module = copy.deepcopy(pristine)
        if isinstance(data, L.LightningDataModule):
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, train_dataloaders=data)
        return dict(recorder.record)

    return run


def probe(
    runner: Runner,
    methods: list[str],
    steps: int,
    grid: int,
    seed: int,
    out: Path,
    say: Callable[[str], None],
    clock: str = "wall",
) -> dict[str, Any]:
    """Run every arm, summarise, write the outputs, print the report; returns the summary (plus ``report``)."""
    from lightning_soo.app.advise.output import write

    work = out / "arms"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    baseline, records, count = run_arms(runner, methods, steps, grid, seed, work, say)
    seconds = time.perf_counter() - start
    summary = summarize(baseline, records, clock)
    summary["probe_seconds"] = seconds
    summary["checks"] = {
        "init_checksums": [baseline["init_checksum"], *(r["init_checksum"] for r in records)],
        "same_batches": all(
            r["batch_checksums"] == baseline["batch_checksums"][: len(r["batch_checksums"])] for r in records
        ),
    }
    lines = write(summary, out, seconds, count)
    summary["report"] = lines
    for line in lines:
        say(line)
    say(f"advise: wrote {out / 'advise.json'}, {out / 'advise.png'} and {out / 'advise.yaml'}")
    return summary
