"""One callback per method. Each signature reads its defaults from the method's options dataclass
(``lightning_soo.options``), which also checks every value; the arguments every method shares are
``StepArguments`` (``**kwargs``)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from typing_extensions import Unpack, override

from lightning_soo.callbacks.base import SecondOrderCallback, StepArguments, training_loss_fn
from lightning_soo.diagnostics.autograd import run_guarded
from lightning_soo.diagnostics.newton import fit_hessian
from lightning_soo.options import (
    DampingFn,
    DampingMode,
    GaussNewtonOptions,
    Grafting,
    KFACOptions,
    PSGDOptions,
    ShampooOptions,
)

Damping = Union[float, DampingFn]
K, S, G, P = KFACOptions, ShampooOptions, GaussNewtonOptions, PSGDOptions


class KFACCallback(SecondOrderCallback):
    """K-FAC-preconditioned gradients (Martens & Grosse, 2015) for any LightningModule.

    Every Linear, Conv1d/2d/3d and Embedding layer is preconditioned with ``(A ⊗ B + ρI)⁻¹``; other parameters
    keep their plain gradient. Your optimizer (SGD with momentum is the reference pairing) steps on ``P·G``.

    Args:
        damping: absolute ``ρ``, a ``Damping`` rule such as ``ScaledDamping`` or ``fn(step, lr, batch_size)``.
            The seed's finding: the best value grows with batch size and learning rate.
        factor_decay: weight of the old running average of the factors (0: the current batch only).
        inverse: ``"cholesky"`` (factored damping, fast) or ``"eigen"`` (exact ``(A⊗B + ρI)⁻¹``).
        max_factor_dim: a factor side wider than this is kept diagonal (e.g. a large vocabulary).
        preconditioner_interval: recompute the inverses every this many optimizer steps.
        kl_clip: bound on ``Σ lr²⟨P·G, G⟩`` per step (kfac-pytorch's KL clipping): the preconditioned gradients are
            scaled down when a step would exceed it. None: off.
        grafting: ``"sgd"`` rescales each layer's ``P·G`` to ``‖G‖``; None (default) keeps K-FAC's step length.
        **kwargs: ``StepArguments`` (statistics_interval, exclude, weight_sharing, loss_reduction, max_update_norm,
            grad_worker_fraction, precondition_vectors, max_conv_groups).

    Raises:
        ValueError: when an argument is out of its range (the message names it and what is accepted).
    """

    method = "kfac"

    def __init__(
        self,
        damping: Damping = K.damping,  # type: ignore[assignment]  # never None for these methods
        factor_decay: float = K.factor_decay,
        inverse: Literal["cholesky", "eigen"] = K.inverse,
        max_factor_dim: int = K.max_factor_dim,
        preconditioner_interval: Optional[int] = K.preconditioner_interval,
        kl_clip: Optional[float] = K.kl_clip,
        grafting: Optional[Grafting] = K.grafting,
        **kwargs: Unpack[StepArguments],
    ) -> None:
        super().__init__(K(**{**_named(locals()), **kwargs}))


class ShampooCallback(SecondOrderCallback):
    """Shampoo-preconditioned gradients (Gupta et al., 2018) for any LightningModule.

    Every Linear, Conv1d/2d/3d and Embedding layer gets ``(L+ρI)^(-e) G (R+ρI)^(-e)``, grafted to the plain
    gradient's norm by default so the learning rate of your SGD set-up keeps its meaning. With
    ``statistics="gradient"`` the matrices outside those layers (``nn.LSTM``'s weights, bare parameters such as
    litgpt's LoRA adapters, position tables) are preconditioned too, and vectors with ``precondition_vectors=True``;
    other parameters keep their plain gradient.

    Args:
        damping: ``ρ``, relative to each factor block's largest eigenvalue (``damping_mode="relative"``) or
            absolute; a rule or callable is evaluated at every refresh.
        damping_mode: ``"relative"`` or ``"absolute"``.
        statistics: ``"per_example"`` (the seed's ``Δᵀdiag(‖h‖²)Δ`` and ``Hᵀdiag(‖δ‖²)H`` from hooks) or
            ``"gradient"`` (classic Shampoo from the mini-batch gradient, no hooks).
        exponent: the root applied to each factor (1/4: Shampoo's ``-1/4`` on each side).
        accumulate: ``"ema"`` (running average with weight ``beta`` on the old value) or ``"sum"`` (AdaGrad-style).
        beta: see ``accumulate``.
        max_factor_dim: a factor side wider than this is split into blocks of at most this size.
        preconditioner_interval: recompute the inverse roots every this many optimizer steps.
        kl_clip: bound on ``Σ lr²⟨P·G, G⟩`` per step, as for ``KFACCallback`` (after grafting). None: off.
        grafting: ``"sgd"`` rescales each layer's ``P·G`` to ``‖G‖``; None leaves it.
        **kwargs: ``StepArguments``.

    Raises:
        ValueError: when an argument is out of its range (the message names it and what is accepted).
    """

    method = "shampoo"

    def __init__(
        self,
        damping: Damping = S.damping,  # type: ignore[assignment]  # never None for these methods
        damping_mode: DampingMode = S.damping_mode,
        statistics: Literal["per_example", "gradient"] = S.statistics,
        exponent: float = S.exponent,
        accumulate: Literal["ema", "sum"] = S.accumulate,
        beta: float = S.beta,
        max_factor_dim: int = S.max_factor_dim,
        preconditioner_interval: Optional[int] = S.preconditioner_interval,
        kl_clip: Optional[float] = S.kl_clip,
        grafting: Optional[Grafting] = S.grafting,
        **kwargs: Unpack[StepArguments],
    ) -> None:
        super().__init__(S(**{**_named(locals()), **kwargs}))


class GaussNewtonCallback(SecondOrderCallback):
    """Exact layer-wise Gauss-Newton (empirical Fisher) steps for any LightningModule.

    The seed's ``C = E[g gᵀ] + ρI`` per layer, applied exactly with the Woodbury identity over the ``N x N`` Gram
    matrix of the step's per-example gradients (never materialised for Linear and Embedding layers; materialised
    per example for convolutions). Its cost grows with ``N²`` and ``N³``, so it suits moderate batches; steps with
    more than ``max_examples`` examples use an evenly spaced subset, with a warning.

    Args:
        damping: ``ρ`` (> 0: without it the empirical Fisher is singular beyond the ``N`` examples), relative to
            the largest eigenvalue of ``E[ggᵀ]`` by default. The exact curvature of one batch fits that batch
            closely and a small ``ρ`` lets each step chase it: relative 0.1–0.3 trains, 0.001 diverges.
        damping_mode: ``"relative"`` (scale-free) or ``"absolute"``.
        max_examples: largest ``N`` of the ``N x N`` solve (examples are rows: tokens under ``"expand"``).
        preconditioner_interval: refactor the Gram matrix every this many optimizer steps.
        kl_clip: bound on ``Σ lr²⟨P·G, G⟩`` per step, applied after grafting: a trust region. None: off.
        grafting: ``"sgd"`` (default) rescales each layer's ``P·G`` to ``‖G‖``; None keeps the exact step.
        **kwargs: ``StepArguments``.

    Raises:
        ValueError: when an argument is out of its range (the message names it and what is accepted).
    """

    method = "gauss_newton"

    def __init__(
        self,
        damping: Damping = G.damping,  # type: ignore[assignment]  # never None for these methods
        damping_mode: DampingMode = G.damping_mode,
        max_examples: int = G.max_examples,
        preconditioner_interval: Optional[int] = G.preconditioner_interval,
        kl_clip: Optional[float] = G.kl_clip,
        grafting: Optional[Grafting] = G.grafting,
        **kwargs: Unpack[StepArguments],
    ) -> None:
        super().__init__(G(**{**_named(locals()), **kwargs}))


class PSGDCallback(SecondOrderCallback):
    """Xi-Lin Li's Kronecker-factored PSGD for any LightningModule, fitted a little every step.

    ``P = QᵀQ`` on every Linear, Conv1d/2d/3d and Embedding layer, fitted by Li's criterion one pair at a time;
    its curvature improves with the number of fitting steps, not with the batch size (the seed's Figure 2). It fits
    from the gradient, so every other matrix parameter is preconditioned too (``nn.LSTM``'s weights, bare
    parameters such as litgpt's LoRA adapters, position tables, as Li's Kron does), and vectors and scalars (norms'
    scales and shifts) with a diagonal ``Q`` under ``precondition_vectors=True``; the rest keep their plain gradient.
    PSGD has no damping.

    Args:
        fit: ``"whitening"`` (pairs ``(v, g)`` of a random probe and the gradient: no extra pass) or ``"hessian"``
            (pairs ``(v, Hv)`` by one Hessian-vector product on the batch: re-runs your ``training_step`` with a
            double backward on update steps, automatic optimization only).
        lr_preconditioner: relative step of each fitting update (Li's normalised step; 0.1 is his default).
        init_scale: initial ``Q = s·I``; None derives ``s`` from the first pair.
        max_update_probability: probability of a fitting update during the first ``flat_steps`` steps.
        min_update_probability: the floor the probability decays to (Kron's schedule).
        update_decay: exponential decay rate of the probability after ``flat_steps``.
        flat_steps: steps at ``max_update_probability``.
        max_factor_dim: a factor side wider than this keeps a diagonal ``Q``.
        preconditioner_interval: form ``QᵀQ`` every this many steps (only when Q changed).
        kl_clip: bound on ``Σ lr²⟨P·G, G⟩`` per step. None: off.
        grafting: ``"sgd"`` (default) rescales each layer's ``P·G`` to ``‖G‖``; None uses PSGD's own scale.
        **kwargs: ``StepArguments``.

    Raises:
        ValueError: when an argument is out of its range (the message names it and what is accepted).
        RuntimeError: ``fit="hessian"`` under manual optimization (when fit starts).
    """

    method = "psgd"
    options: PSGDOptions

    def __init__(
        self,
        fit: Literal["whitening", "hessian"] = P.fit,
        lr_preconditioner: float = P.lr_preconditioner,
        init_scale: Optional[float] = P.init_scale,
        max_update_probability: float = P.max_update_probability,
        min_update_probability: float = P.min_update_probability,
        update_decay: float = P.update_decay,
        flat_steps: int = P.flat_steps,
        max_factor_dim: int = P.max_factor_dim,
        preconditioner_interval: Optional[int] = P.preconditioner_interval,
        kl_clip: Optional[float] = P.kl_clip,
        grafting: Optional[Grafting] = P.grafting,
        **kwargs: Unpack[StepArguments],
    ) -> None:
        super().__init__(P(**{**_named(locals()), **kwargs}))
        self._batch: tuple[Any, int] | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.options.fit == "hessian" and not pl_module.automatic_optimization:
            raise RuntimeError(
                "PSGDCallback(fit='hessian') re-runs training_step for its Hessian-vector products, which manual "
                "optimization does not allow; use fit='whitening'"
            )
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._batch = (batch, batch_idx)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        manager = self.manager
        due = self.options.fit == "hessian" and manager is not None and manager.collecting
        if due and manager is not None and self._batch is not None:
            loss_fn = training_loss_fn(pl_module, *self._batch)
            run_guarded("PSGD's Hessian fit", lambda: fit_hessian(manager, loss_fn, pl_module), manager.warn_once)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def _named(args: dict[str, Any]) -> dict[str, Any]:
    """A constructor's own named arguments from its ``locals()``."""
    return {k: v for k, v in args.items() if k not in ("self", "kwargs", "__class__")}
