"""Every option of the library, its default and its check, in one place.

``StepOptions`` holds what the manager does around the per-layer maths (intervals, damping, clipping, grafting,
DDP sharing, the adaptive freeze); one subclass per method adds that method's own options and sets the defaults
that suit it. The dataclasses are frozen and ``__post_init__`` is the only place a value is checked, so a bad
value fails at construction with a message naming the argument, the value and what is accepted. The manager, the
preconditioners and the Lightning callbacks all take or build these objects; the callbacks' signatures read their
defaults from here (``tests`` hold the shipped YAML configs and the README table to them).

What ``damping`` means, per method (the value actually applied is logged as ``soo/damping_applied``):

* K-FAC: absolute ``ρ`` of ``(A ⊗ B + ρI)``; ``inverse="cholesky"`` splits it as ``ρ_A = √ρ·π``, ``ρ_B = √ρ/π``.
* Shampoo: per factor block, ``ρ`` times the block's largest eigenvalue (``damping_mode="relative"``) or ``ρ``.
* Gauss-Newton: ``ρ`` times the largest eigenvalue of ``E[ggᵀ]`` (``"relative"``) or ``ρ``.
* PSGD: none (its fit is regularised by the probes); ``damping`` must stay None.

A damping may be a number, a ``Damping`` rule such as ``ScaledDamping``, or a callable ``fn(step, lr, batch_size)``
(``fn(step, lr)`` is accepted too); the manager evaluates it at every refresh and checks the value (finite, > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal, Optional, Union

from lightning_soo import checks

WeightSharing = Literal["expand", "reduce"]
LossReduction = Literal["mean", "sum"]
Grafting = Literal["sgd"]
DampingMode = Literal["absolute", "relative"]
DampingFn = Callable[..., float]
#: a constant, ``fn(step, lr, batch_size)`` (or ``fn(step, lr)``), or a ``Damping`` rule (which is such a callable)
DampingSpec = Union[float, DampingFn]


@dataclass(frozen=True)
class StepOptions:
    """Options of the step around the per-layer maths, shared by every method.

    Args:
        damping: see the module docstring for its meaning per method.
        statistics_interval: collect statistics every this many optimizer steps.
        preconditioner_interval: refresh preconditioners every this many steps; None: only at step 0, then frozen.
        exclude: module-name patterns (``fnmatch``) left to the plain gradient: a layer is excluded when its name
            or the name of a module it lies in matches (``"decoder"``: everything under it).
        weight_sharing: ``"expand"`` (every sequence / spatial position a row) or ``"reduce"`` (positions merged).
        loss_reduction: ``"mean"`` if the loss averages over examples (its 1/N is undone), ``"sum"`` otherwise.
        kl_clip: scale all preconditioned gradients of a step by ``min(1, √(kl_clip / Σ lr²⟨P·G, G⟩))``
            (kfac-pytorch's KL clipping), so a learning rate tuned for SGD cannot take a huge step. None: off.
        grafting: ``"sgd"`` rescales each layer's ``P·G`` to the norm of ``G`` (layer-wise grafting). None: off.
        max_update_norm: cap on the Frobenius norm of each layer's preconditioned gradient. None: no cap.
        grad_worker_fraction: under DDP, 1.0 broadcasts refreshed preconditioners to every rank; 1/world_size lets
            each layer's owner precondition and broadcast ``P·G`` every step.
        freeze_tolerance: adaptive freeze once the curvature changes by less than this (relative, between
            refreshes) ``freeze_patience`` refreshes in a row. None: off.
        freeze_patience: see ``freeze_tolerance``.
        max_failures: consecutive failed refreshes of one layer before an error is raised.
        precondition_vectors: the methods that fit from the gradient (PSGD, Shampoo with ``statistics="gradient"``)
            also precondition vector and scalar parameters outside the layers capture knows (norms' scales and
            shifts, biases of ``nn.LSTM``), each a layer of its own with diagonal factors (PSGD's Q, Shampoo's
            right side). Off by default: they are a few per cent of a model's elements, and on an accelerator each
            costs about 14 operations a step (vectors of one length fit as one stack; their products and
            post-processing are per layer): GPT-2's 50 norm vectors take PSGD's step from 2.2x to 2.8x the
            operations of SGD's.
            Matrices outside layers (litgpt's bare LoRA adapters, ``nn.LSTM``'s weights, position tables) are
            preconditioned by those methods either way.
        max_conv_groups: the methods that take rows (K-FAC, Gauss-Newton, per-example Shampoo) precondition a
            convolution of 2 to this many groups group by group, each group a layer of its own (its curvature
            block-diagonal over the groups, as the layer is). 0 (default): grouped convolutions are left to the
            methods that fit from the gradient. Each group costs what a layer costs: torchvision's
            ``regnet_y_400mf`` (531 groups in 16 convolutions, 7.8% of its weights) takes K-FAC's step from 1.8x to
            3.2x SGD's on a CPU, ``resnext50_32x4d`` (512 groups) from 2.4x to 3.0x; on an accelerator each group
            adds about 16 operations a step (regnet_y_400mf: 3.3x to 17x SGD's operation count).
    """

    #: the method has a damping (PSGD has none)
    uses_damping: ClassVar[bool] = True

    damping: Optional[DampingSpec] = 1e-2
    statistics_interval: int = 1
    preconditioner_interval: Optional[int] = 10
    exclude: tuple[str, ...] = ()
    weight_sharing: WeightSharing = "expand"
    loss_reduction: LossReduction = "mean"
    kl_clip: Optional[float] = None
    grafting: Optional[Grafting] = None
    max_update_norm: Optional[float] = None
    grad_worker_fraction: float = 1.0
    freeze_tolerance: Optional[float] = None
    freeze_patience: int = 3
    max_failures: int = 5
    precondition_vectors: bool = False
    max_conv_groups: int = 0

    def __post_init__(self) -> None:
        if self.uses_damping:
            checks.check_damping("damping", self.damping)
        elif self.damping is not None:
            raise ValueError(f"{type(self).__name__[:-7]} has no damping: `damping` must be None, got {self.damping!r}")
        checks.check_int("statistics_interval", self.statistics_interval)
        checks.check_int("preconditioner_interval", self.preconditioner_interval, allow_none=True)
        checks.check_patterns("exclude", self.exclude)
        object.__setattr__(self, "exclude", tuple(self.exclude))
        checks.check_choice("weight_sharing", self.weight_sharing, ("expand", "reduce"))
        checks.check_choice("loss_reduction", self.loss_reduction, ("mean", "sum"))
        checks.check_float("kl_clip", self.kl_clip, 0.0, low_open=True, allow_none=True)
        checks.check_choice("grafting", self.grafting, ("sgd", None))
        checks.check_float("max_update_norm", self.max_update_norm, 0.0, low_open=True, allow_none=True)
        checks.check_float("grad_worker_fraction", self.grad_worker_fraction, 0.0, 1.0, low_open=True)
        checks.check_float("freeze_tolerance", self.freeze_tolerance, 0.0, low_open=True, allow_none=True)
        checks.check_int("freeze_patience", self.freeze_patience)
        checks.check_int("max_failures", self.max_failures)
        checks.check_choice("precondition_vectors", self.precondition_vectors, (True, False))
        checks.check_int("max_conv_groups", self.max_conv_groups, 0)

    def updated(self, **changes: Any) -> StepOptions:
        """A copy with ``changes`` (checked); an unknown name raises ValueError listing the accepted ones."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no option(s) {unknown}; accepted: {sorted(names)}")
        return replace(self, **changes)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{name: default}`` of every option (what the callbacks and configs must agree with)."""
        return {f.name: f.default for f in fields(cls)}


@dataclass(frozen=True)
class KFACOptions(StepOptions):
    """K-FAC (Martens & Grosse, 2015): ``C ≈ A ⊗ B``; ``damping`` is the absolute ``ρ``. Each field is
    described where users set it, in ``KFACCallback``'s docstring."""

    kl_clip: Optional[float] = 1e-3
    factor_decay: float = 0.95
    inverse: Literal["cholesky", "eigen"] = "cholesky"
    max_factor_dim: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.check_float("factor_decay", self.factor_decay, 0.0, 1.0, high_open=True)
        checks.check_choice("inverse", self.inverse, ("cholesky", "eigen"))
        checks.check_int("max_factor_dim", self.max_factor_dim)


@dataclass(frozen=True)
class ShampooOptions(StepOptions):
    """Shampoo (Gupta et al., 2018): ``(L+ρI)^(-e) G (R+ρI)^(-e)``, grafted to the plain gradient's norm;
    ``damping`` relative to each factor block's largest eigenvalue by default. Each field is described in
    ``ShampooCallback``'s docstring."""

    damping: Optional[DampingSpec] = 1e-4
    grafting: Optional[Grafting] = "sgd"
    kl_clip: Optional[float] = 1e-3  # a trust region after grafting: a ResNet at SGD's lr 0.1 diverged without it
    damping_mode: DampingMode = "relative"
    statistics: Literal["per_example", "gradient"] = "per_example"
    exponent: float = 0.25
    accumulate: Literal["ema", "sum"] = "ema"
    beta: float = 0.95
    max_factor_dim: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.check_choice("damping_mode", self.damping_mode, ("absolute", "relative"))
        checks.check_choice("statistics", self.statistics, ("per_example", "gradient"))
        checks.check_float("exponent", self.exponent, 0.0, 1.0, low_open=True)
        checks.check_choice("accumulate", self.accumulate, ("ema", "sum"))
        checks.check_float("beta", self.beta, 0.0, 1.0, high_open=True)
        checks.check_int("max_factor_dim", self.max_factor_dim)


@dataclass(frozen=True)
class GaussNewtonOptions(StepOptions):
    """Layer-wise Gauss-Newton ``(E[ggᵀ] + ρI)⁻¹ g``, exact by Woodbury over the step's ``N x N`` Gram matrix.

    The defaults (relative damping 0.3, SGD grafting with a KL clip of 1e-2 as trust region) are the only
    combination measured to train all three test problems: grafting alone overshoots at small batch (digits,
    batch 32, lr 0.2: loss 1.8 against SGD's 0.31; 0.15 with the clip), the clip alone stalls the CNN.

    Args:
        damping_mode: ``"relative"`` (``ρ`` times the largest eigenvalue of ``E[ggᵀ]``) or ``"absolute"``.
        max_examples: largest ``N`` of the ``N x N`` solve; larger steps use an evenly spaced subset.
    """

    damping: Optional[DampingSpec] = 0.3
    preconditioner_interval: Optional[int] = 1
    kl_clip: Optional[float] = 1e-2
    grafting: Optional[Grafting] = "sgd"
    damping_mode: DampingMode = "relative"
    max_examples: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.check_choice("damping_mode", self.damping_mode, ("absolute", "relative"))
        checks.check_int("max_examples", self.max_examples)


@dataclass(frozen=True)
class PSGDOptions(StepOptions):
    """Li's Kronecker PSGD, ``P = QᵀQ`` fitted one pair per statistics step; no damping. Each field is described
    in ``PSGDCallback``'s docstring; ``seed`` seeds the private probe generator."""

    uses_damping: ClassVar[bool] = False

    damping: Optional[DampingSpec] = None
    preconditioner_interval: Optional[int] = 1
    grafting: Optional[Grafting] = "sgd"
    fit: Literal["whitening", "hessian"] = "whitening"
    lr_preconditioner: float = 0.1
    init_scale: Optional[float] = None
    max_update_probability: float = 1.0
    min_update_probability: float = 0.03
    update_decay: float = 0.001
    flat_steps: int = 500
    max_factor_dim: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.check_choice("fit", self.fit, ("whitening", "hessian"))
        checks.check_float("lr_preconditioner", self.lr_preconditioner, 0.0, 1.0, low_open=True)
        checks.check_float("init_scale", self.init_scale, 0.0, low_open=True, allow_none=True)
        checks.check_float("max_update_probability", self.max_update_probability, 0.0, 1.0, low_open=True)
        checks.check_float(
            "min_update_probability", self.min_update_probability, 0.0, self.max_update_probability, low_open=True
        )
        checks.check_float("update_decay", self.update_decay, 0.0)
        checks.check_int("flat_steps", self.flat_steps, 0)
        checks.check_int("max_factor_dim", self.max_factor_dim)
        checks.check_int("seed", self.seed, 0)
