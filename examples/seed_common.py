"""Shared pieces of the seed-figure scripts: quiet Lightning, results files, verdict lines."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def base_parser(doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """``--quick`` (a smoke run in seconds) and ``--out`` (where JSON and PNG go), shared by every script."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: examples/results)")
    return parser


def add_dataset(parser: argparse.ArgumentParser) -> None:
    """``--dataset digits|mnist1d|both`` (default both)."""
    parser.add_argument(
        "--dataset",
        choices=["digits", "mnist1d", "both"],
        default="both",
        help="digits (1,438 training images) and/or MNIST-1D (generated locally: 8,000 train, 2,000 test)",
    )


def load_datasets(choice: str, quick: bool) -> dict[str, Any]:
    """``{name: (train, test)}`` for ``--dataset``; ``--quick`` generates a 1,000-example MNIST-1D (800 train)."""
    from lightning_soo.app.data import digits, mnist1d

    names = ["digits", "mnist1d"] if choice == "both" else [choice]
    loaders = {"digits": digits, "mnist1d": lambda: mnist1d(num_samples=1_000 if quick else 10_000, seed=0)}
    return {name: loaders[name]() for name in names}


def command(script: str, argv: list[str] | None) -> str:
    """The command line that produced a result (recorded in its JSON)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["OMP_NUM_THREADS=1", "python", f"examples/{script}", *args])


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def out_dir(out: Path | None) -> Path:
    return out or RESULTS


def result_path(name: str, suffix: str, quick: bool, out: Path | None) -> Path:
    """Where a result goes: ``name_quick.suffix`` for ``--quick`` runs, so a smoke run never overwrites the
    committed full-run results beside it."""
    folder = out_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}{'_quick' if quick else ''}.{suffix}"


def quiet() -> None:
    """Silence Lightning's per-run banners (hundreds of short runs)."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def save(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def verdict(claim: str, held: bool, detail: str) -> str:
    line = f"VERDICT [{'REPRODUCED' if held else 'NOT REPRODUCED'}] {claim} — {detail}"
    print(line, flush=True)
    return line


class Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx > 0 and sy > 0 else math.nan
