"""``ShampooCallback``: Shampoo-preconditioned gradients for any LightningModule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Optional, Union

from lightning_soo import validation as v
from lightning_soo.callbacks.base import SecondOrderCallback


class ShampooCallback(SecondOrderCallback):
    """Shampoo (Gupta et al., 2018) on every Linear, Conv1d/2d/3d and Embedding layer:
    ``P·G = (L+ρI)^(-e) G (R+ρI)^(-e)``, grafted to the plain gradient's norm by default so the learning rate of your
    SGD set-up keeps its meaning. Other parameters keep their plain gradient.

    Args:
        damping: ``ρ`` — relative to each factor block's largest eigenvalue by default (``damping_mode``), or
            absolute; a callable ``fn(step, lr) -> ρ`` is evaluated at every refresh.
        statistics: ``"per_example"`` (the seed's ``Δᵀdiag(‖h‖²)Δ`` and ``Hᵀdiag(‖δ‖²)H`` from hooks) or
            ``"gradient"`` (classic Shampoo from the mini-batch gradient, no hooks).
        exponent: the root applied to each factor (1/4: Shampoo's ``-1/4`` on each side).
        damping_mode: ``"relative"`` or ``"absolute"``.
        accumulate: ``"ema"`` (running average with weight ``beta`` on the old value) or ``"sum"`` (AdaGrad-style).
        beta: see ``accumulate``.
        grafting: ``"sgd"`` rescales each layer's ``P·G`` to ``‖G‖``; None leaves it.
        statistics_interval: capture statistics every this many optimizer steps.
        preconditioner_interval: recompute the inverse roots every this many optimizer steps.
        max_factor_dim: a factor side wider than this is split into blocks of at most this size (block-diagonal
            statistic: memory ``dim·max_factor_dim``, refresh ``dim·max_factor_dim²``).
        exclude: module-name patterns (``fnmatch``) left plain.
        weight_sharing: ``"expand"`` (every position a row) or ``"reduce"``.
        loss_reduction: ``"mean"`` or ``"sum"`` (how your loss reduces over examples).
        kl_clip: bound on ``Σ lr²⟨P·G, G⟩`` per step, as for ``KFACCallback`` (after grafting). None: off.
        grad_worker_fraction: DDP inverse sharing, as for ``KFACCallback``.
        max_update_norm: cap on the Frobenius norm of each layer's preconditioned gradient (None: no cap).
    """

    method = "shampoo"

    def __init__(
        self,
        damping: Union[float, Callable[[int, Optional[float]], float]] = 1e-4,
        statistics: Literal["per_example", "gradient"] = "per_example",
        exponent: float = 0.25,
        damping_mode: Literal["absolute", "relative"] = "relative",
        accumulate: Literal["ema", "sum"] = "ema",
        beta: float = 0.95,
        grafting: Optional[Literal["sgd"]] = "sgd",
        statistics_interval: int = 1,
        preconditioner_interval: int = 10,
        max_factor_dim: int = 1024,
        exclude: Sequence[str] = (),
        weight_sharing: Literal["expand", "reduce"] = "expand",
        loss_reduction: Literal["mean", "sum"] = "mean",
        kl_clip: Optional[float] = None,
        grad_worker_fraction: float = 1.0,
        max_update_norm: Optional[float] = None,
    ) -> None:
        v.check_choice("statistics", statistics, ("per_example", "gradient"))
        v.check_float("exponent", exponent, 0.0, 1.0, low_open=True)
        v.check_choice("damping_mode", damping_mode, ("absolute", "relative"))
        v.check_choice("accumulate", accumulate, ("ema", "sum"))
        v.check_float("beta", beta, 0.0, 1.0, high_open=True)
        v.check_int("max_factor_dim", max_factor_dim)
        options = {
            "statistics": statistics,
            "exponent": exponent,
            "damping_mode": damping_mode,
            "accumulate": accumulate,
            "beta": beta,
            "max_factor_dim": max_factor_dim,
        }
        super().__init__(
            damping=damping,
            statistics_interval=statistics_interval,
            preconditioner_interval=preconditioner_interval,
            exclude=exclude,
            weight_sharing=weight_sharing,
            loss_reduction=loss_reduction,
            method_options=options,
            kl_clip=kl_clip,
            grad_worker_fraction=grad_worker_fraction,
            max_update_norm=max_update_norm,
            grafting=grafting,
        )
        self.statistics, self.exponent, self.damping_mode = statistics, exponent, damping_mode
        self.accumulate, self.beta, self.max_factor_dim = accumulate, beta, max_factor_dim
