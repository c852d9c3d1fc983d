"""``KFACCallback``: K-FAC-preconditioned gradients for any LightningModule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Optional, Union

from lightning_soo import validation as v
from lightning_soo.callbacks.base import SecondOrderCallback


class KFACCallback(SecondOrderCallback):
    """K-FAC (Martens & Grosse, 2015) on every Linear, Conv1d/2d/3d and Embedding layer; other parameters keep
    their plain gradient. Your optimizer (SGD with momentum is the reference pairing) steps on ``P·G``.

    Args:
        damping: ``ρ`` (constant) or ``fn(step, lr) -> ρ``. The seed's finding: the best value grows with batch
            size and learning rate.
        factor_decay: weight of the old running average of the factors (0: the current batch only).
        statistics_interval: capture factor statistics every this many optimizer steps.
        preconditioner_interval: recompute the inverses every this many optimizer steps.
        inverse: ``"cholesky"`` (factored damping, fast) or ``"eigen"`` (exact ``(A⊗B + ρI)^{-1}``).
        max_factor_dim: a factor side wider than this is kept diagonal (e.g. a large vocabulary).
        exclude: module-name patterns (``fnmatch``, e.g. ``"decoder"``, ``"*.out_proj"``) left plain.
        weight_sharing: ``"expand"`` (every position a row) or ``"reduce"`` (positions averaged) for sequence and
            spatial dimensions.
        loss_reduction: ``"mean"`` if your loss averages over examples, ``"sum"`` if it sums.
        kl_clip: bound on ``Σ lr²⟨P·G, G⟩`` per step (kfac-pytorch's KL clipping): the preconditioned gradients are
            scaled down when a step would exceed it, so the learning rate of your SGD setup stays safe. None: off.
        grad_worker_fraction: under DDP each layer's inverse is computed by one owner rank; 1.0 broadcasts the
            inverses at refreshes, 1/world_size lets the owner precondition and broadcast the gradient every step.
        max_update_norm: cap on the Frobenius norm of each layer's preconditioned gradient (None: no cap).
    """

    method = "kfac"

    def __init__(
        self,
        damping: Union[float, Callable[[int, Optional[float]], float]] = 1e-2,
        factor_decay: float = 0.95,
        statistics_interval: int = 1,
        preconditioner_interval: int = 10,
        inverse: Literal["cholesky", "eigen"] = "cholesky",
        max_factor_dim: int = 4096,
        exclude: Sequence[str] = (),
        weight_sharing: Literal["expand", "reduce"] = "expand",
        loss_reduction: Literal["mean", "sum"] = "mean",
        kl_clip: Optional[float] = 1e-3,
        grad_worker_fraction: float = 1.0,
        max_update_norm: Optional[float] = None,
    ) -> None:
        v.check_float("factor_decay", factor_decay, 0.0, 1.0, high_open=True)
        v.check_choice("inverse", inverse, ("cholesky", "eigen"))
        v.check_int("max_factor_dim", max_factor_dim)
        super().__init__(
            damping=damping,
            statistics_interval=statistics_interval,
            preconditioner_interval=preconditioner_interval,
            exclude=exclude,
            weight_sharing=weight_sharing,
            loss_reduction=loss_reduction,
            method_options={"factor_decay": factor_decay, "inverse": inverse, "max_factor_dim": max_factor_dim},
            kl_clip=kl_clip,
            grad_worker_fraction=grad_worker_fraction,
            max_update_norm=max_update_norm,
        )
        self.factor_decay, self.inverse, self.max_factor_dim = factor_decay, inverse, max_factor_dim
