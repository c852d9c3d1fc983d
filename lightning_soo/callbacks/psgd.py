"""``PSGDCallback``: Kronecker-factored PSGD preconditioning, fitted a little every step, for any LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch

from lightning_soo import validation as v
from lightning_soo.callbacks.base import SecondOrderCallback
from lightning_soo.callbacks.quality_pass import training_loss_fn
from lightning_soo.preconditioners.psgd import fit_hessian


class PSGDCallback(SecondOrderCallback):
    """Xi-Lin Li's PSGD with a Kronecker-factored ``P = QᵀQ`` on every Linear, Conv1d/2d/3d and Embedding layer,
    fitted by his criterion one pair at a time. Its curvature improves with the number of fitting steps, not with
    the batch size (the seed's Figure 2). Other parameters keep their plain gradient.

    Args:
        fit: ``"whitening"`` (pairs ``(v, g)`` of a random probe and the gradient: no extra pass, ``P`` whitens the
            gradients) or ``"hessian"`` (pairs ``(v, Hv)`` by one Hessian-vector product on the batch: ``P`` tends
            to ``|H|⁻¹``; re-runs your ``training_step`` with a double backward on update steps, automatic
            optimization only).
        lr_preconditioner: relative step of each fitting update (Li's normalised step; 0.1 is his default).
        init_scale: initial ``Q = s·I``; None derives ``s`` from the first pair.
        max_update_probability: probability of a fitting update during the first ``flat_steps`` steps.
        min_update_probability: the floor the probability decays to (Kron's schedule).
        update_decay: exponential decay rate of the probability after ``flat_steps``.
        flat_steps: steps at ``max_update_probability``.
        max_factor_dim: a factor side wider than this keeps a diagonal ``Q``.
        grafting: ``"sgd"`` (default) rescales each layer's ``P·G`` to ``‖G‖`` so your SGD learning rate keeps its
            meaning; None uses PSGD's own scale (pair with a small learning rate).
        preconditioner_interval: form ``QᵀQ`` every this many steps (only when Q changed).
        exclude: module-name patterns (``fnmatch``) left plain.
        kl_clip: bound on ``Σ lr²⟨P·G, G⟩`` per step. None: off.
        grad_worker_fraction: DDP inverse sharing, as for ``KFACCallback``.
        max_update_norm: cap on the Frobenius norm of each layer's preconditioned gradient (None: no cap).
    """

    method = "psgd"

    def __init__(
        self,
        fit: Literal["whitening", "hessian"] = "whitening",
        lr_preconditioner: float = 0.1,
        init_scale: Optional[float] = None,
        max_update_probability: float = 1.0,
        min_update_probability: float = 0.03,
        update_decay: float = 0.001,
        flat_steps: int = 500,
        max_factor_dim: int = 4096,
        grafting: Optional[Literal["sgd"]] = "sgd",
        preconditioner_interval: int = 1,
        exclude: Sequence[str] = (),
        kl_clip: Optional[float] = None,
        grad_worker_fraction: float = 1.0,
        max_update_norm: Optional[float] = None,
    ) -> None:
        v.check_choice("fit", fit, ("whitening", "hessian"))
        v.check_float("lr_preconditioner", lr_preconditioner, 0.0, 1.0, low_open=True)
        v.check_float("init_scale", init_scale, 0.0, low_open=True, allow_none=True)
        v.check_float("max_update_probability", max_update_probability, 0.0, 1.0, low_open=True)
        v.check_float("min_update_probability", min_update_probability, 0.0, max_update_probability, low_open=True)
        v.check_float("update_decay", update_decay, 0.0)
        v.check_int("flat_steps", flat_steps, 0)
        v.check_int("max_factor_dim", max_factor_dim)
        options = {
            "fit": fit,
            "lr_preconditioner": lr_preconditioner,
            "init_scale": init_scale,
            "max_update_probability": max_update_probability,
            "min_update_probability": min_update_probability,
            "update_decay": update_decay,
            "flat_steps": flat_steps,
            "max_factor_dim": max_factor_dim,
        }
        super().__init__(
            damping=0.0,  # PSGD has no damping: its fit is regularised by the probes
            statistics_interval=1,
            preconditioner_interval=preconditioner_interval,
            exclude=exclude,
            weight_sharing="expand",
            loss_reduction="mean",
            method_options=options,
            kl_clip=kl_clip,
            grad_worker_fraction=grad_worker_fraction,
            max_update_norm=max_update_norm,
            grafting=grafting,
        )
        self.fit, self.lr_preconditioner, self.init_scale = fit, lr_preconditioner, init_scale
        self.max_update_probability, self.min_update_probability = max_update_probability, min_update_probability
        self.update_decay, self.flat_steps, self.max_factor_dim = update_decay, flat_steps, max_factor_dim
        self._batch: tuple[Any, int] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fit == "hessian" and not pl_module.automatic_optimization:
            raise RuntimeError(
                "PSGDCallback(fit='hessian') re-runs training_step for its Hessian-vector products, which manual "
                "optimization does not allow; use fit='whitening'"
            )
        super().on_fit_start(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._batch = (batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        manager = self.manager
        if self.fit == "hessian" and manager is not None and manager.collecting and self._batch is not None:
            fit_hessian(manager, training_loss_fn(trainer, pl_module, *self._batch), pl_module)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
