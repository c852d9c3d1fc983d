"""Step time of lightning-soo's methods against installable peers of the same method, on the same model, data and
settings, each as a ratio over plain SGD measured in one process, interleaved (median of blocks of a whole refresh
period after warm-up; CUDA blocks timed by events).

MLP 784-512-512-10, cross-entropy, random data, SGD(momentum 0.9) wherever a method preconditions the gradient of a
plain optimizer. Two settings: ``256`` (batch 256, statistics every step, inverses / roots every 10) and ``2048``
(batch 2048, statistics every 10, inverses every 100; only contenders with separate intervals run there). Groups:

* K-FAC, empirical Fisher, damping 1e-2 split as ``√ρ·π`` / ``√ρ/π``, factor EMA 0.95 — ours (Cholesky and eigen)
  against ASDL's ``KfacGradientMaker(fisher_type="fisher_emp")`` (``ema_decay=0.05``, curvature / preconditioner
  intervals as above);
* Shampoo, statistics EMA 0.95, roots every 10, damping 1e-4 relative to the largest eigenvalue — ours from the
  gradient (``statistics="gradient"``, what the peers compute) and per example, SGD grafting — against
  pytorch-optimizer's ``Shampoo`` and ``ScalableShampoo`` and ASDL's ``ShampooGradientMaker`` (no grafting);
* SOAP (Adam in Shampoo's eigenbasis; no SOAP of ours, compare with the Shampoo rows): heavyball's and
  pytorch-optimizer's, eigenbasis every 10;
* PSGD Kron, whitening form, an update every step — ours against pytorch-optimizer's ``Kron`` and heavyball's
  ``PSGDKron`` (probability 1);
* PSGD Kron, Newton form (exact Hessian-vector products), an update every step — ours (``fit_hessian``) against
  psgd-torch's ``Kron`` and ASDL's ``KronPsgdGradientMaker``;
* torch.optim.AdamW for scale.

Every peer is first checked to precondition (loss falls over a few steps; its update is not parallel to SGD's);
one that fails, or cannot be built here, is reported with the reason instead of timed. Peers not installed
(``pip install -e .[bench]``) are reported as missing. heavyball is compile-first: it runs eagerly here unless
``--heavyball-compile on`` (``auto``: compiled on CUDA only; compiling takes minutes on a CPU). On the CPU denormals
are flushed (the runs fit the random batch, and denormal arithmetic would slow the best fitters most); on a shared
CPU, ``--threads 1`` avoids the stalls that oversubscribed threads add to every op. A row whose weights are not
finite at the end of its timing is flagged.

    python benchmarks/peers.py [--quick] [--setting 256|2048] [--device cpu|cuda|auto] [--check-only]
                               [--only LABEL-PART] [--heavyball-compile auto|on|off] [--out ...json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import StepFn, interleaved_many, machine, make_step, mlp, pick_device
from lightning_soo import PreconditionerManager
from lightning_soo.diagnostics import fit_hessian

BLOCK = 1024  # Shampoo factor blocks
LR = 0.01
KFAC_DAMPING = 1e-2
FACTOR_DECAY = 0.95  # weight of the old value in the factor EMA (ASDL's ema_decay is the weight of the new one)
SHAMPOO_DAMPING = 1e-4
QUICK_SIZES = (64, 32, 32, 10)  # --quick: a tiny model, so the smoke test takes seconds


@dataclass(frozen=True)
class Setting:
    batch: int
    statistics_interval: int
    interval: int  # inverses / roots / eigenbases
    sizes: tuple[int, ...] = (784, 512, 512, 10)


SETTINGS = {"256": Setting(256, 1, 10), "2048": Setting(2048, 10, 100)}

Build = Callable[[nn.Module, torch.Tensor, torch.Tensor, Setting], StepFn]


@dataclass(frozen=True)
class Contender:
    label: str
    group: str
    build: Build
    package: str | None = None  # import name of the peer; None: torch or ours
    intervals: bool = False  # supports a statistics interval > 1 (runs in the 2048 setting)
    check: bool = True  # verify that it preconditions before timing (not for SGD / AdamW)


class Unavailable(RuntimeError):
    """A peer that is installed but cannot run at these settings; the message says why."""


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


# -- ours ------------------------------------------------------------------------------------------------------------
def _ours(method: str, options: dict, **kwargs: object) -> Build:
    """The setting's intervals unless ``kwargs`` name others."""

    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> StepFn:
        args = {"statistics_interval": s.statistics_interval, "preconditioner_interval": s.interval, **kwargs}
        manager = PreconditionerManager(model, method, options, **args)  # type: ignore[arg-type]
        return make_step(model, manager, x, y, lr=LR)

    return build


def _ours_psgd_newton(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> StepFn:
    options = {"fit": "hessian", "min_update_probability": 1.0}
    manager = PreconditionerManager(model, "psgd", options, preconditioner_interval=1, grafting="sgd")
    opt = _sgd(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        manager.begin_step(batch_size=x.shape[0])
        _loss(model, x, y).backward()
        fit_hessian(manager, lambda: _loss(model, x, y), model)
        manager.step(opt)
        opt.step()

    return step


# -- torch and pytorch-optimizer / psgd-torch ------------------------------------------------------------------------
def _torch_opt(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Build:
    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> StepFn:
        opt = make(list(model.parameters()))

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            _loss(model, x, y).backward()
            opt.step()

        return step

    return build


def _po(name: str, **kwargs: object) -> Build:
    """pytorch-optimizer's ``name``; a value given as a callable of the setting is evaluated at build time."""

    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> StepFn:
        import pytorch_optimizer

        args = {k: v(s) if callable(v) else v for k, v in kwargs.items()}
        return _torch_opt(lambda p: getattr(pytorch_optimizer, name)(p, **args))(model, x, y, s)

    return build


def _psgd_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> StepFn:
    from psgd_torch import Kron

    opt = Kron(
        list(model.parameters()),
        preconditioner_max_skew=float("inf"),
        preconditioner_init_scale=1.0,
        lr_params=LR,
        momentum=0.9,
        preconditioner_update_probability=1.0,
        exact_hessian_vector_product=True,
        preconditioner_type="Newton",
    )

    def step() -> None:
        opt.step(lambda: _loss(model, x, y))

    return step


# -- ASDL (asdfghjkl) ------------------------------------------------------------------------------------------------
class _NoNvtx:
    """Stands in for ``torch.cuda.nvtx`` in ASDL where NVTX is not built (a CPU build of torch): ASDL wraps its
    inverses in ``nvtx.range`` (profiler annotations only), which raise there."""

    @staticmethod
    def range(msg: str, *args: object, **kwargs: object) -> contextlib.nullcontext:
        return contextlib.nullcontext()


def _nvtx_works() -> bool:
    try:
        torch.cuda.nvtx.range_push("peers")
        torch.cuda.nvtx.range_pop()
        return True
    except RuntimeError:
        return False


def _asdl(kind: str) -> Build:
    """ASDL's gradient makers drive forward and backward themselves (``forward_and_backward`` runs the curvature
    pass on curvature steps, a plain pass otherwise, refreshes on preconditioner steps and preconditions
    ``.grad`` in place); SGD(momentum) steps on the result."""

    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> StepFn:
        from asdl import (
            KfacGradientMaker,
            KronPsgdGradientMaker,
            PreconditioningConfig,
            ShampooGradientMaker,
        )
        from asdl.precondition import natural_gradient

        if not _nvtx_works():
            natural_gradient.nvtx = _NoNvtx  # type: ignore[attr-defined]

        maker: object
        if kind == "kfac":
            # ema_decay set: curvature accumulates (EMA) on its own interval and is inverted on the preconditioner
            # interval; unset, every curvature step would invert at once (one interval for both)
            config = PreconditioningConfig(
                data_size=s.batch,
                damping=KFAC_DAMPING,
                ema_decay=1.0 - FACTOR_DECAY,
                curvature_upd_interval=s.statistics_interval,
                preconditioner_upd_interval=s.interval,
            )
            maker = KfacGradientMaker(model, config, fisher_type="fisher_emp")
        elif kind == "shampoo":
            config = PreconditioningConfig(
                damping=SHAMPOO_DAMPING,  # relative: times the largest eigenvalue (power iteration) per factor
                ema_decay=1.0 - FACTOR_DECAY,
                curvature_upd_interval=s.statistics_interval,
                preconditioner_upd_interval=s.interval,
            )
            maker = ShampooGradientMaker(model, config)
        elif kind == "psgd":
            config = PreconditioningConfig(preconditioner_upd_interval=1)
            maker = KronPsgdGradientMaker(model, config, precond_lr=0.1)  # ours and psgd-torch: 0.1 (ASDL: 0.01)
        else:
            raise ValueError(kind)
        dummy_y = maker.setup_model_call(model, x)  # type: ignore[attr-defined]
        maker.setup_loss_call(nn.functional.cross_entropy, dummy_y, y)  # type: ignore[attr-defined]
        opt = _sgd(model)

        def step() -> None:
            opt.zero_grad()  # to None: ASDL's PSGD leaves graph views in .grad, which cannot be zeroed in place
            maker.forward_and_backward()  # type: ignore[attr-defined]
            opt.step()

        return step

    return build


# -- heavyball -------------------------------------------------------------------------------------------------------
HEAVYBALL_COMPILE = False  # set by main from --heavyball-compile
_heavyball_modes: list[str | None] = []  # heavyball's own compile mode, as imported


def _heavyball(name: str, **kwargs: object) -> Build:
    """heavyball's ``name``; its kernels are ``torch.compile``d unless ``heavyball.utils.compile_mode`` is None,
    which is read at every call, so each step sets it (eager here unless ``HEAVYBALL_COMPILE``)."""

    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> StepFn:
        import heavyball

        if not _heavyball_modes:
            _heavyball_modes.append(heavyball.utils.compile_mode)
        mode = _heavyball_modes[0] if HEAVYBALL_COMPILE else None
        heavyball.utils.compile_mode = mode
        args = {k: v(s) if callable(v) else v for k, v in kwargs.items()}
        opt = getattr(heavyball, name)(list(model.parameters()), **args)

        def step() -> None:
            heavyball.utils.compile_mode = mode
            opt.zero_grad(set_to_none=True)
            _loss(model, x, y).backward()
            opt.step()

        return step

    return build


def _heavyball_newton(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> StepFn:
    raise Unavailable(
        "heavyball's PSGDKron(hessian_approx=True) takes a Hessian-vector product only on steps where "
        "(step - 1) % hvp_interval != 0, so at hvp_interval=1 (an update every step) it never takes one and is the "
        "whitening form; there is no every-step Newton setting"
    )


CONTENDERS: list[Contender] = [
    Contender("sgd", "-", _torch_opt(lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9)), intervals=True, check=False),
    Contender("adamw (torch)", "-", _torch_opt(lambda p: torch.optim.AdamW(p, lr=1e-3)), intervals=True, check=False),
    # K-FAC
    Contender(
        "kfac cholesky (ours)",
        "kfac",
        _ours("kfac", {"inverse": "cholesky", "factor_decay": FACTOR_DECAY}, damping=KFAC_DAMPING, kl_clip=1e-3),
        intervals=True,
    ),
    Contender(  # ASDL's K-FAC has no KL clip: the same computation as it
        "kfac cholesky, no KL clip (ours)",
        "kfac",
        _ours("kfac", {"inverse": "cholesky", "factor_decay": FACTOR_DECAY}, damping=KFAC_DAMPING, kl_clip=None),
        intervals=True,
    ),
    Contender(
        "kfac eigen (ours)",
        "kfac",
        _ours("kfac", {"inverse": "eigen", "factor_decay": FACTOR_DECAY}, damping=KFAC_DAMPING, kl_clip=1e-3),
        intervals=True,
    ),
    Contender("K-FAC emp. Fisher (ASDL)", "kfac", _asdl("kfac"), "asdl", intervals=True),
    # Shampoo
    Contender(
        "shampoo, gradient stats (ours)",
        "shampoo",
        _ours(
            "shampoo",
            {"statistics": "gradient", "max_factor_dim": BLOCK, "beta": FACTOR_DECAY},
            damping=SHAMPOO_DAMPING,
            grafting="sgd",
        ),
        intervals=True,
    ),
    Contender(
        "shampoo, per-example stats (ours)",
        "shampoo",
        _ours("shampoo", {"max_factor_dim": BLOCK, "beta": FACTOR_DECAY}, damping=SHAMPOO_DAMPING, grafting="sgd"),
        intervals=True,
    ),
    Contender(
        "Shampoo (pytorch-optimizer)",
        "shampoo",
        _po("Shampoo", lr=LR, preconditioning_compute_steps=lambda s: s.interval),
        "pytorch_optimizer",
    ),
    Contender(
        "ScalableShampoo (pytorch-optimizer)",
        "shampoo",
        _po(
            "ScalableShampoo",
            lr=LR,
            start_preconditioning_step=1,
            preconditioning_compute_steps=lambda s: s.interval,
            statistics_compute_steps=lambda s: s.statistics_interval,
            block_size=BLOCK,
        ),
        "pytorch_optimizer",
        intervals=True,
    ),
    Contender("Shampoo (ASDL)", "shampoo", _asdl("shampoo"), "asdl", intervals=True),
    # SOAP
    Contender(
        "SOAP (heavyball)",
        "soap",
        _heavyball("SOAP", lr=1e-3, shampoo_beta=FACTOR_DECAY, precondition_frequency=lambda s: s.interval),
        "heavyball",
    ),
    Contender(
        "SOAP (pytorch-optimizer)",
        "soap",
        _po("SOAP", lr=1e-3, shampoo_beta=FACTOR_DECAY, precondition_frequency=lambda s: s.interval),
        "pytorch_optimizer",
    ),
    # PSGD, whitening form
    Contender(
        "psgd whitening (ours)",
        "psgd",
        _ours("psgd", {"min_update_probability": 1.0}, preconditioner_interval=1, grafting="sgd"),
    ),
    Contender(
        "Kron (pytorch-optimizer)",
        "psgd",
        _po("Kron", lr=LR, pre_conditioner_update_probability=1.0),
        "pytorch_optimizer",
    ),
    Contender(
        "PSGDKron (heavyball)",
        "psgd",
        _heavyball("PSGDKron", lr=1e-3, preconditioner_update_probability=1.0),
        "heavyball",
    ),
    # PSGD, Newton form
    Contender("psgd newton (ours)", "psgd-newton", _ours_psgd_newton),
    Contender("Kron newton (psgd-torch)", "psgd-newton", _psgd_torch, "psgd_torch"),
    Contender("KronPsgd newton (ASDL)", "psgd-newton", _asdl("psgd"), "asdl"),
    Contender("PSGDKron newton (heavyball)", "psgd-newton", _heavyball_newton, "heavyball"),
]


CHECKS: dict[str, dict[str, float]] = {}  # what verify measured, per contender


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def verify(c: Contender, s: Setting, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> str:
    """Empty if ``c`` preconditions, else the reason. From the benchmark's initial weights, at batch 256 at most,
    one refresh period plus three steps (every peer has refreshed by then; some start from the identity or zero)
    must lower the loss, and the move over the last three steps must not be parallel to SGD's last three."""
    s = Setting(min(s.batch, 256), s.statistics_interval, s.interval, s.sizes)
    x, y = x[: s.batch], y[: s.batch]
    steps = s.interval + 3

    def run(build: Build) -> tuple[float, float, torch.Tensor]:
        model = mlp(s.sizes, device=device)
        step = build(model, x, y, s)
        with torch.no_grad():
            before = float(_loss(model, x, y))
        for _ in range(s.interval):
            step()
        mid = _flat(model)
        for _ in range(steps - s.interval):
            step()
        with torch.no_grad():
            after = float(_loss(model, x, y))
        return before, after, _flat(model) - mid

    _, _, sgd_move = run(CONTENDERS[0].build)
    before, after, move = run(c.build)
    if not (math.isfinite(after) and bool(torch.isfinite(move).all())):
        return f"not finite after {steps} steps"
    if not after < before:
        return f"loss did not fall over {steps} steps ({before:.4f} -> {after:.4f})"
    cos = float(nn.functional.cosine_similarity(move, sgd_move, dim=0))
    CHECKS[c.label] = {"steps": steps, "loss_before": round(before, 4), "loss_after": round(after, 4), "cos_sgd": cos}
    if cos > 0.999:
        return f"last steps parallel to SGD's (cosine {cos:.5f} after {steps} steps): not preconditioning"
    return ""


def main(argv: list[str] | None = None) -> None:
    global HEAVYBALL_COMPILE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="256")
    parser.add_argument("--batch", type=int, default=None, help="override the setting's batch size")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks of one refresh period per contender")
    parser.add_argument("--warmup-blocks", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model and run for a smoke test")
    parser.add_argument("--check-only", action="store_true", help="verify the contenders, time nothing")
    parser.add_argument(
        "--only",
        default=None,
        help="only contenders whose label contains one of these |-separated parts, in any case (SGD always runs)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--heavyball-compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/peers.json (peers-2048.json)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        # several contenders fit the one random batch to a loss of 0 within a few dozen steps; without flushing,
        # the denormal numbers that follow slow every CPU op several times (K-FAC: 31 -> 150 ms a step)
        torch.set_flush_denormal(True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # on a shared CPU, fewer threads than cores avoid stalls at every op
    HEAVYBALL_COMPILE = args.heavyball_compile == "on" or (args.heavyball_compile == "auto" and device.type == "cuda")
    s = SETTINGS[args.setting]
    if args.batch is not None:
        s = Setting(args.batch, s.statistics_interval, s.interval, s.sizes)
    blocks, warmup = args.blocks, args.warmup_blocks
    if args.quick:
        s = Setting(32, s.statistics_interval, min(s.interval, 4), QUICK_SIZES)
        blocks, warmup = 2, 1
    out = args.out or Path(__file__).parent / "results" / ("peers.json" if args.setting == "256" else "peers-2048.json")
    torch.manual_seed(0)
    x = torch.randn(s.batch, s.sizes[0], device=device)
    y = torch.randint(0, s.sizes[-1], (s.batch,), device=device)

    steps: dict[str, StepFn] = {}
    models: dict[str, nn.Module] = {}
    missing: list[str] = []
    skipped: list[str] = []
    unavailable: dict[str, str] = {}
    t0 = time.perf_counter()
    for c in CONTENDERS:
        parts = args.only.lower().split("|") if args.only is not None else []
        if parts and not any(part in c.label.lower() for part in parts) and c.label != "sgd":
            continue
        if c.package is not None and importlib.util.find_spec(c.package) is None:
            missing.append(c.label)
            continue
        if s.statistics_interval > 1 and not c.intervals:
            skipped.append(c.label)
            continue
        try:
            why = verify(c, s, x, y, device) if c.check else ""
            if not why:
                models[c.label] = mlp(s.sizes, device=device)
                steps[c.label] = c.build(models[c.label], x, y, s)
        except Exception as e:  # a peer that cannot run is reported, not fatal
            why = f"{type(e).__name__}: {e}"
        if why:
            unavailable[c.label] = why
        print(f"checked {c.label:<38} {why or 'ok'}", file=sys.stderr, flush=True)
    checked = time.perf_counter()
    if args.check_only:
        for label in [*steps, *unavailable]:
            print(f"{label:<38} {unavailable.get(label, 'ok'):<12.200} {CHECKS.get(label, '')}")
        return
    ms = interleaved_many(steps, s.interval, blocks, warmup_blocks=warmup, device=device)
    rows = []
    for c in CONTENDERS:
        if c.label not in ms:
            continue
        ratio = ms[c.label] / ms["sgd"]
        finite = bool(torch.isfinite(_flat(models[c.label])).all())  # timings of NaN arithmetic would not count
        row = {"contender": c.label, "group": c.group, "ms": round(ms[c.label], 3), "ratio": round(ratio, 3)}
        rows.append({**row, "finite": finite})
        flag = "" if finite else "   (weights not finite at the end)"
        print(f"{c.label:<38} {c.group:<12} {ms[c.label]:9.2f} ms   {ratio:6.2f}x SGD{flag}", flush=True)
    for label, why in unavailable.items():
        print(f"{label:<38} unavailable: {why}")
    for label in skipped:
        print(f"{label:<38} skipped: no separate statistics interval")
    for label in missing:
        print(f"{label:<38} not installed (pip install -e .[bench])")
    result = {
        "benchmark": "peers",
        "setting": "quick" if args.quick else args.setting,
        "batch": s.batch,
        "statistics_interval": s.statistics_interval,
        "interval": s.interval,
        "sizes": list(s.sizes),
        "block_size": BLOCK,
        "steps_per_contender": blocks * s.interval,
        "heavyball_compiled": HEAVYBALL_COMPILE,
        "flush_denormal": device.type == "cpu",
        "machine": machine(device),
        "seconds_checks": round(checked - t0, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "checks": CHECKS,
        "unavailable": unavailable,
        "skipped": skipped,
        "missing": missing,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
