"""Seed Fig. 2 at CPU scale: PSGD's curvature quality is set by the number of iterations, not by the batch size.

The MLP of ``lightning_soo.app.train`` (64-128-128-10) on digits (N = 1,438 training images), SGD (lr 0.1,
momentum 0.9), batch sizes 32, 64, 128, 256, 512 and 1,438 (full batch), batches drawn without a ragged last one.

* PSGD: ``PSGDCallback(fit="hessian")`` (Li's Newton form: pairs ``(v, Hv)`` from the batch, the poster's criterion
  ``c(P) = E[δĝᵀPδĝ + δθᵀP⁻¹δθ]``), update probability 1 (one fitting update per optimizer step, so iterations =
  optimizer steps), 1,000 steps per batch size.
* K-FAC: ``KFACCallback`` with its defaults (damping 1e-2, factor decay 0.95, KL clip 1e-3) but refreshed every
  step, 100 steps per batch size.

Curvature quality: the scale-free index of ``lightning_soo.measure_quality`` (``√(ab)/√(a_I b_I)`` with
``a = E[δĝᵀPδĝ]``, ``b = E[δθᵀP⁻¹δθ]``; 1 = no better than plain SGD, lower is better; α* removes the scale of P,
so batch sizes compare fairly), 16 Gaussian probes (the same probes at every measurement), joint mode. It is measured
against the Hessian of the loss on the WHOLE training set at the current parameters — the same target for every
batch size — after 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500 and 1,000 optimizer steps. (The index against
the Hessian of the batch just trained on is recorded too, in the JSON, but is not part of the criteria.)

Criteria (stated before running):

(a) PSGD: let r_b(T) be the index of batch size b after T iterations, spread(T) = max_b r_b(T) - min_b r_b(T) and
    drop(T) = mean_b r_b(1) - mean_b r_b(T) (how much quality the iterations bought; a ratio counts as infinite if
    drop(T) <= 0). Reproduced if the mean of spread(T) / drop(T) over T in {10, 30, 100, 300, 1000} is < 0.5.
(b) K-FAC: reproduced if the Spearman rank correlation between batch size and K-FAC's index after 10 iterations
    is < -0.5 (larger batches, better curvature).

Reported but not a criterion: at one epoch (the first checkpoint at or past one epoch for each batch size) PSGD's
index against batch size, which should rise with batch size if (a) holds.

Control (added after the first full run, not a criterion; the verdicts above are unchanged by it): in the runs above
each batch size follows its own trajectory, so at equal iterations the Hessians differ too (after 10 K-FAC steps the
training loss is 0.75 at batch 32 but 0.27 at full batch). The same fits are repeated with the parameters held fixed
(SGD lr 0) at the initialisation and after 30 full-batch plain-SGD steps: every batch size then sees the same Hessian
and only the curvature estimate differs. PSGD 300 steps (spread/drop as in (a) over T in {10, 30, 100, 300}), K-FAC
10 steps (Spearman after 1 and 10 steps).

    python examples/seed_psgd_iterations.py [--quick]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from seed_common import Clock, base_parser, pyplot, quiet, result_path, save, spearman, verdict
from torch.utils.data import DataLoader

from lightning_soo import measure_quality
from lightning_soo.app.data import digits
from lightning_soo.app.train import DigitsMLP, make_callback

CHECKPOINTS = [1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000]
CRITERION_AT = [10, 30, 100, 300, 1000]  # criterion (a)
KFAC_AT = 10  # criterion (b)
FIXED_AT = [0, 30]  # control: parameters held fixed after this many full-batch SGD steps
CONTROL_STEPS, CONTROL_AT = 300, [10, 30, 100, 300]
NUM_PROBES = 16
LR = 0.1


class QualityProbe(Callback):
    """After the listed optimizer steps: the preconditioner's quality index against the whole training set's
    Hessian and against the batch just trained on, and the training loss."""

    def __init__(self, target: Callback, x: torch.Tensor, y: torch.Tensor, at: list[int]) -> None:
        self.target, self.x, self.y, self.at = target, x, y, set(at)
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any):
        step = trainer.global_step  # optimizer steps done, this one included
        manager = self.target.manager
        if step not in self.at or manager is None:
            return
        xb, yb = batch
        full = measure_quality(
            manager, lambda: F.cross_entropy(pl_module(self.x), self.y), num_probes=NUM_PROBES, model=pl_module
        )
        own = measure_quality(
            manager, lambda: F.cross_entropy(pl_module(xb), yb), num_probes=NUM_PROBES, model=pl_module
        )
        with torch.no_grad():
            loss = float(F.cross_entropy(pl_module(self.x), self.y))
        updates = [getattr(layer.preconditioner, "updates", None) for layer in manager.layers.values()]
        self.rows.append(
            {
                "step": step,
                "index": full.model.index,
                "criterion": full.model.criterion,
                "alpha_star": full.model.alpha_star,
                "index_batch": own.model.index,
                "train_loss": loss,
                "psgd_updates": None if None in updates else min(updates),
            }
        )


def run(
    method: str,
    batch: int,
    steps: int,
    data,
    checkpoints: list[int],
    *,
    lr: float = LR,
    state: dict[str, torch.Tensor] | None = None,
    **options: Any,
) -> list[dict]:
    """Train for ``steps`` optimizer steps (from ``state`` if given; ``lr=0`` keeps the parameters fixed) and
    return the quality measurements."""
    L.seed_everything(0, verbose=False)
    train_set, _ = data
    x, y = train_set.tensors
    callback = make_callback(method, **options)
    probe = QualityProbe(callback, x, y, [c for c in checkpoints if c <= steps])
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        callbacks=[callback, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    loader = DataLoader(
        train_set, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    model = DigitsMLP(lr=lr)
    if state is not None:
        model.load_state_dict(state)
    trainer.fit(model, loader)
    n = len(train_set)
    for row in probe.rows:
        row["epochs"] = row["step"] * batch / n
    return probe.rows


def warm_state(data, steps: int) -> dict[str, torch.Tensor]:
    """The MLP's parameters after ``steps`` full-batch steps of plain SGD from the common initialisation."""
    L.seed_everything(0, verbose=False)
    train_set, _ = data
    model = DigitsMLP(lr=LR)
    if steps:
        trainer = L.Trainer(
            max_steps=steps,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
        )
        trainer.fit(model, DataLoader(train_set, batch_size=len(train_set)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def criterion_a(psgd: dict[int, list[dict]], at: list[int]) -> dict[str, Any]:
    index = {b: {r["step"]: r["index"] for r in rows} for b, rows in psgd.items()}
    start = sum(ix[1] for ix in index.values()) / len(index)
    per_t = []
    for t in at:
        values = [ix[t] for ix in index.values()]
        spread = max(values) - min(values)
        drop = start - sum(values) / len(values)
        ratio = spread / drop if drop > 0 else math.inf
        per_t.append({"T": t, "spread": spread, "drop": drop, "ratio": ratio})
    mean_ratio = sum(p["ratio"] for p in per_t) / len(per_t)
    return {"mean_index_at_1": start, "checkpoints": per_t, "mean_ratio": mean_ratio}


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "batch sizes 64 and 1438, 6 PSGD steps, 3 K-FAC steps")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(1)  # tiny matrices: on a shared 2-core machine two threads oversubscribe and crawl
    clock = Clock()
    data = digits()
    n = len(data[0])
    if args.quick:
        batches, psgd_steps, kfac_steps = [64, 1438], 6, 3
        checkpoints, crit_at, kfac_at = [1, 2, 3, 4, 6], [3, 6], 3
        fixed_at, control_steps, control_at = [0, 3], 4, [2, 4]
    else:
        batches, psgd_steps, kfac_steps = [32, 64, 128, 256, 512, 1438], 1000, 100
        checkpoints, crit_at, kfac_at = CHECKPOINTS, CRITERION_AT, KFAC_AT
        fixed_at, control_steps, control_at = FIXED_AT, CONTROL_STEPS, CONTROL_AT
    psgd_options = {"fit": "hessian", "max_update_probability": 1.0, "min_update_probability": 1.0}
    psgd: dict[int, list[dict]] = {}
    kfac: dict[int, list[dict]] = {}
    for b in batches:
        psgd[b] = run("psgd", b, psgd_steps, data, checkpoints, **psgd_options)
        last = psgd[b][-1]
        print(
            f"PSGD  batch {b:>5}: index "
            + " ".join(f"{r['step']}:{r['index']:.3f}" for r in psgd[b])
            + f"  (loss {last['train_loss']:.4f}, {clock.seconds}s)",
            flush=True,
        )
        kfac[b] = run("kfac", b, kfac_steps, data, checkpoints, preconditioner_interval=1)
        print(
            f"K-FAC batch {b:>5}: index "
            + " ".join(f"{r['step']}:{r['index']:.3f}" for r in kfac[b])
            + f"  ({clock.seconds}s)",
            flush=True,
        )

    # control (not a criterion): the same fits with the parameters held fixed (lr 0), so every batch size sees the
    # same Hessian and only the curvature estimate differs
    control: dict[int, dict[str, Any]] = {}
    for w in fixed_at:
        state = warm_state(data, w)
        c_psgd = {
            b: run("psgd", b, control_steps, data, checkpoints, lr=0.0, state=state, **psgd_options) for b in batches
        }
        c_kfac = {
            b: run("kfac", b, kfac_at, data, checkpoints, lr=0.0, state=state, preconditioner_interval=1)
            for b in batches
        }
        ratio = criterion_a(c_psgd, control_at)
        kfac_fixed = {
            s: {b: next(r["index"] for r in c_kfac[b] if r["step"] == s) for b in batches} for s in (1, kfac_at)
        }
        rho_fixed = {s: spearman([float(b) for b in batches], [v[b] for b in batches]) for s, v in kfac_fixed.items()}
        control[w] = {
            "psgd": {str(b): rows for b, rows in c_psgd.items()},
            "kfac": {str(b): rows for b, rows in c_kfac.items()},
            "psgd_spread_over_drop": ratio,
            "kfac_index": {str(s): {str(b): x for b, x in v.items()} for s, v in kfac_fixed.items()},
            "kfac_spearman": {str(s): r for s, r in rho_fixed.items()},
        }
        print(f"control, parameters fixed after {w} SGD steps (loss {c_psgd[batches[0]][0]['train_loss']:.3f}):")
        for b in batches:
            print(
                f"  batch {b:>5}: PSGD "
                + " ".join(f"{r['step']}:{r['index']:.3f}" for r in c_psgd[b])
                + "  K-FAC "
                + " ".join(f"{r['step']}:{r['index']:.3f}" for r in c_kfac[b])
            )
        print(
            f"  PSGD mean spread/drop over T in {control_at}: {ratio['mean_ratio']:.2f}; K-FAC Spearman with batch "
            + ", ".join(f"after {s} step(s) {r:.2f}" for s, r in rho_fixed.items())
            + f" ({clock.seconds}s)",
            flush=True,
        )

    # (a) PSGD: spread across batch sizes relative to the drop over iterations
    a = criterion_a(psgd, crit_at)
    held_a = a["mean_ratio"] < 0.5
    for p in a["checkpoints"]:
        print(f"PSGD T={p['T']:>5}: spread {p['spread']:.4f}  drop {p['drop']:.4f}  ratio {p['ratio']:.3f}")
    # (b) K-FAC: rank correlation of batch size with its index after kfac_at steps
    kfac_index = {b: next(r["index"] for r in rows if r["step"] == kfac_at) for b, rows in kfac.items()}
    rho_kfac = spearman([float(b) for b in batches], [kfac_index[b] for b in batches])
    held_b = rho_kfac < -0.5
    kfac_loss = {b: next(r["train_loss"] for r in rows if r["step"] == kfac_at) for b, rows in kfac.items()}
    # reported, not a criterion: PSGD's index at about one epoch
    one_epoch = {b: next((r for r in rows if r["epochs"] >= 1.0), rows[-1]) for b, rows in psgd.items()}
    rho_epoch = spearman([float(b) for b in batches], [one_epoch[b]["index"] for b in batches])
    rho_psgd_iter = spearman(
        [float(b) for b in batches], [next(r["index"] for r in psgd[b] if r["step"] == kfac_at) for b in batches]
    )

    suffix = " (quick smoke run)" if args.quick else ""
    detail_a = f"mean spread/drop over T in {crit_at} = {a['mean_ratio']:.2f} (criterion < 0.5); " + ", ".join(
        f"T={p['T']}: {p['spread']:.3f}/{p['drop']:.3f}" for p in a["checkpoints"]
    )
    line_a = verdict("PSGD's curvature quality depends on iterations, not batch size" + suffix, held_a, detail_a)
    detail_b = (
        f"Spearman(batch size, K-FAC index after {kfac_at} steps) = {rho_kfac:.2f} (criterion < -0.5); index "
        + ", ".join(f"{b}: {kfac_index[b]:.3f}" for b in batches)
        + f"; training loss there {min(kfac_loss.values()):.2f}-{max(kfac_loss.values()):.2f}"
        + f" (PSGD's index at the same step: Spearman {rho_psgd_iter:.2f})"
    )
    line_b = verdict("K-FAC's curvature quality improves with batch size" + suffix, held_b, detail_b)
    print(
        "PSGD index at about one epoch: "
        + ", ".join(f"{b}: {one_epoch[b]['index']:.3f} (step {one_epoch[b]['step']})" for b in batches)
        + f"; Spearman with batch size {rho_epoch:.2f}"
    )
    payload = {
        "claim": "Fig. 2",
        "quick": args.quick,
        "setup": {
            "model": "DigitsMLP 64-128-128-10",
            "optimizer": f"SGD lr {LR} momentum 0.9",
            "train_size": n,
            "batch_sizes": batches,
            "psgd": {"steps": psgd_steps, "fit": "hessian", "update_probability": 1.0, "lr_preconditioner": 0.1},
            "kfac": {"steps": kfac_steps, "damping": 1e-2, "factor_decay": 0.95, "preconditioner_interval": 1},
            "quality": f"measure_quality, joint, {NUM_PROBES} probes, Hessian of the whole training set",
            "checkpoints": [c for c in checkpoints if c <= psgd_steps],
        },
        "psgd": {str(b): rows for b, rows in psgd.items()},
        "kfac": {str(b): rows for b, rows in kfac.items()},
        "criterion_a": a,
        "criterion_b": {"at_step": kfac_at, "index": {str(b): v for b, v in kfac_index.items()}, "spearman": rho_kfac},
        "psgd_spearman_at_kfac_step": rho_psgd_iter,
        "control_fixed_parameters": {
            "what": "lr 0 from the parameters after N full-batch plain-SGD steps (keys); same measurements",
            "psgd_steps": control_steps,
            "kfac_steps": kfac_at,
            "psgd_ratio_at": control_at,
            "runs": {str(w): c for w, c in control.items()},
        },
        "psgd_one_epoch": {
            "index": {str(b): r["index"] for b, r in one_epoch.items()},
            "step": {str(b): r["step"] for b, r in one_epoch.items()},
            "spearman": rho_epoch,
        },
        "verdict": f"{line_a}\n{line_b}",
        "verdicts": {"a": line_a, "b": line_b},
        "seconds": clock.seconds,
    }
    save("psgd_iterations_quick" if args.quick else "psgd_iterations", payload, args.out)
    plot(
        psgd,
        kfac,
        control[fixed_at[-1]],
        fixed_at[-1],
        batches,
        kfac_at,
        result_path("psgd_iterations", "png", args.quick, args.out),
    )
    print(f"done in {clock.seconds}s")
    return payload


def plot(psgd: dict, kfac: dict, control: dict, fixed: int, batches: list[int], kfac_at: int, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6), dpi=100)
    colors = plt.cm.viridis([i / max(1, len(batches) - 1) for i in range(len(batches))])
    for b, c in zip(batches, colors, strict=True):
        for ax, rows, x in (
            (axes[0], psgd[b], "step"),
            (axes[1], psgd[b], "epochs"),
            (axes[3], control["psgd"][str(b)], "step"),
        ):
            ax.plot([r[x] for r in rows], [r["index"] for r in rows], marker="o", ms=3, color=c, label=f"{b}")
    iters = "iterations (optimizer steps = PSGD fitting updates)"
    for ax, xlabel in ((axes[0], iters), (axes[1], "epochs"), (axes[3], iters)):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.legend(title="batch size", fontsize=8)
    axes[0].set_title("PSGD (Hessian fit) vs iterations")
    axes[1].set_title("PSGD (Hessian fit) vs epochs")
    axes[3].set_title(f"control: PSGD, parameters fixed\n(after {fixed} full-batch SGD steps, lr 0)", fontsize=10)
    steps = sorted({r["step"] for rows in kfac.values() for r in rows})
    shown = [s for s in steps if s in (1, kfac_at, steps[-1])]
    for s, style in zip(shown, ("--", "-", ":"), strict=False):
        ys = [next(r["index"] for r in kfac[b] if r["step"] == s) for b in batches]
        axes[2].plot(batches, ys, style, marker="o", label=f"K-FAC after {s} step{'s' if s > 1 else ''}")
    for s, style in zip(sorted({1, kfac_at}), ("--", "-"), strict=False):
        ys = [control["kfac_index"][str(s)][str(b)] for b in batches]
        label = f"K-FAC, parameters fixed ({fixed} SGD steps), after {s} step{'s' if s > 1 else ''}"
        axes[2].plot(batches, ys, style, marker="^", mfc="none", color="tab:red", alpha=0.8, label=label)
    ys = [next(r["index"] for r in psgd[b] if r["step"] == kfac_at) for b in batches]
    axes[2].plot(batches, ys, "-", marker="s", color="grey", alpha=0.6, label=f"PSGD after {kfac_at} steps")
    axes[2].set_xscale("log")
    axes[2].set_xticks(batches, [str(b) for b in batches])
    axes[2].minorticks_off()
    axes[2].set_xlabel("batch size")
    axes[2].set_title("K-FAC vs batch size")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_ylabel("quality index (1 = SGD, lower is better)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Curvature quality on digits (index against the whole training set's Hessian)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
