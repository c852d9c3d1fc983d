"""The interface every preconditioner implements, one instance per layer.

A preconditioner sees a layer's gradient as a matrix ``G`` (``d_out x d_in``, bias column included). Statistics
arrive either from the capture hooks (rows of layer inputs ``h̄`` and per-example output gradients ``g``) or from
the mini-batch gradient itself (``observe_grad``). The manager drives the life cycle of one optimizer step:

    observe_inputs / observe_output_grads   (hooks, any number of calls, micro-batches included)
    observe_grad(G)                         (statistics steps, for methods with ``uses_grad``)
    close_statistics(output_scale)          (once per statistics step)
    refresh(damping)                        (when the schedule says so)
    precondition(G) -> P·G                  (every step, once ``ready``)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from lightning_soo.capture.adapters import Count, EmbeddingAdapter, LayerAdapter, Observation, Rows
from lightning_soo.capture.rows import RowCount
from lightning_soo.options import StepOptions

if TYPE_CHECKING:
    from lightning_soo.preconditioners.statistics import Factor


class Preconditioner:
    """Base class: state handling shared by all methods. Options (and their defaults) come from ``options_type``."""

    #: the options dataclass of the method (its defaults and checks)
    options_type: ClassVar[type[StepOptions]] = StepOptions

    #: the method needs layer inputs and output gradients from hooks
    uses_hooks: bool = True
    #: the method wants the mini-batch gradient on statistics steps
    uses_grad: bool = False
    #: every square matrix among ``statistics_tensors`` is symmetric (sent as its upper triangle under DDP)
    symmetric_statistics: bool = False
    #: ``observe_output_grads`` takes rows not yet multiplied by a mean loss's count when the count is a tensor (the
    #: padding rule's), and that tensor as ``scale``: the method applies it inside its statistics (a pass fewer)
    count_scaled_rows: bool = False
    #: the statistics weight every row by its output gradient's norm, which is zero for a row that is not an example:
    #: the adapter hands such a method unmasked rows and the norms (``Observation.norms``, read in ``observe``)
    row_norms: bool = False
    #: takes an ``Observation``'s ``RowCount`` as it is (``Factor`` reduces it when the statistics close); for the
    #: others ``observe`` reduces it first (per-example Shampoo's own ``observe`` hands it to its factors as it is)
    lazy_counts: bool = False
    #: the output-gradient statistics take the loss's count of examples (``engine.examples``) as their ``N``, not
    #: each call's own: K-FAC-expand's ``B = (1/N) Σ_rows b bᵀ`` (False: each call's examples are its own)
    loss_examples: bool = False
    #: statistics accumulate across steps; False: a refresh reads the last statistics step's alone (Gauss-Newton's
    #: examples), so a statistics step after which another comes before any refresh is not collected
    running_statistics: bool = True
    #: tensor attributes persisted by ``state_dict`` (None values are skipped)
    state_tensors: tuple[str, ...] = ()
    #: plain-number attributes persisted by ``state_dict``
    state_numbers: tuple[str, ...] = ()
    #: the attributes among ``state_tensors`` and ``state_numbers`` computed at refresh from the statistics: a
    #: checkpoint's are used only when ``config()`` is unchanged, and rebuilt from its statistics otherwise
    derived: tuple[str, ...] = ()
    #: a message for the user (e.g. an input was too large and was subsampled); the manager warns once per layer
    notice: str | None = None
    #: the method can take uses of the weight in the swapped orientation (a tied embedding and head)
    supports_transposed: ClassVar[bool] = False
    #: a vector parameter (``ParameterAdapter``, the matrix ``(1, d)``) keeps a diagonal input-side factor
    vectors_diagonal: ClassVar[bool] = False

    @classmethod
    def one_hot_diagonal(cls, options: StepOptions) -> bool:
        """The input side of an embedding (one-hot rows) is kept as an exact diagonal under these options."""
        return False

    @classmethod
    def for_layer(
        cls,
        adapter: LayerAdapter,
        *,
        dtype: torch.dtype,
        device: torch.device,
        options: StepOptions | None = None,
        transposed_uses: bool = False,
    ) -> Preconditioner:
        """Build the preconditioner of one layer (``transposed_uses``: the weight also has uses in the swapped
        orientation, see ``observe_transposed``)."""
        d_out, d_in = adapter.shape
        opts = options if options is not None else cls.options_type()
        diagonal = isinstance(adapter, EmbeddingAdapter) and cls.one_hot_diagonal(opts)
        diagonal = diagonal or (adapter.vector and cls.vectors_diagonal)
        return cls(
            d_out,
            d_in,
            dtype=dtype,
            device=device,
            options=opts,
            input_diagonal=diagonal,
            transposed_uses=transposed_uses,
        )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        options: StepOptions | None = None,
        input_diagonal: bool = False,
        transposed_uses: bool = False,
        **overrides: Any,
    ) -> None:
        """``options`` (default: the method's defaults) with ``overrides`` applied, e.g. ``KFAC(4, 3, dtype=...,
        device=..., factor_decay=0.9)``; checked by the options dataclass. ``input_diagonal``: the input side's
        statistic is exactly diagonal (one-hot rows). Methods set up their state in ``build``."""
        base = options if options is not None else self.options_type()
        self.options = base.updated(**overrides) if overrides else base
        self.d_out, self.d_in = d_out, d_in
        self.dtype, self.device = dtype, device
        self.input_diagonal = input_diagonal
        self.transposed_uses = transposed_uses
        self.ready = False  # a preconditioner exists (precondition may be called)
        self.applied_damping: float | None = None  # the damping in the current preconditioner (for the dashboard)
        self.refreshes = 0
        self._spectrum: Tensor | None = None  # a method's cached spectrum, dropped at every refresh
        self.build()

    def build(self) -> None:
        """Allocate the method's state from ``self.options`` (called once by ``__init__``)."""

    def refreshed(self) -> bool:
        """Mark a successful refresh (``ready``, counted, cached spectrum dropped); returns True for ``refresh``."""
        self._spectrum = None
        self.ready = True
        self.refreshes += 1
        return True

    # -- statistics -------------------------------------------------------------------------------------
    def observe_inputs(self, rows: Rows, count: Count) -> Any:
        """Fold layer-input rows (``count``: how many rows the input statistic averages over; rows dropped by the
        padding rule are zero) into this step's sums; the return value is handed to observe_output_grads."""
        return None

    def observe_output_grads(self, rows: Tensor, n_examples: Count, ctx: Any, scale: float | Tensor = 1.0) -> None:
        """Fold per-example output-gradient rows ``scale · rows`` (up to the step's constant ``output_scale``);
        ``scale`` is the ``N`` of a mean loss, which a method whose statistics are quadratic in the rows applies as
        ``scale²`` inside its products instead of a pass over the rows."""

    def observe(self, obs: Observation, rows: Tensor, scale: float | Tensor | RowCount = 1.0) -> None:
        """Fold one call's ``Observation`` (``rows``: its output-gradient rows, a mean loss's count applied or to
        be applied as ``scale``): its input rows, then its output-gradient rows. A method that asked for the rows'
        norms (``row_norms``) takes them from ``obs.norms``."""
        n, count, lazy = obs.n, obs.rows, self.lazy_counts
        n, count = (c.tensor() if isinstance(c, RowCount) and not lazy else c for c in (n, count))
        scale = scale.tensor() if isinstance(scale, RowCount) and not lazy else scale
        self.observe_output_grads(rows, n, self.observe_inputs(obs.h, count), scale)  # type: ignore[arg-type]

    def dense_ready(self) -> bool:
        """``observe_dense`` can take this step's next call (its statistics hold no rows yet); False: the default."""
        return False

    def observe_dense(self, obs: Observation) -> None:
        """``observe`` of the usual call, where ``dense_ready``, in as few lines as the method can make of it: a
        linear layer's dense rows of a mean loss, ``obs.n`` a number of examples above zero (the host's path) or a
        ``RowCount`` (the accelerator's)."""
        raise NotImplementedError(f"{type(self).__name__} has no dense path")

    def observe_transposed(self, inputs: Rows, grads: Tensor, count: Count, n_examples: Count) -> None:
        """Fold a use in the swapped orientation: its input rows lie on this layer's output side (``d_out``) and
        its per-example output-gradient rows on the input side (``d_in``); methods with ``supports_transposed``."""
        raise NotImplementedError(f"{type(self).__name__} does not take uses in the swapped orientation")

    def observe_grad(self, grad: Tensor) -> None:
        """Fold the mini-batch gradient matrix (methods with ``uses_grad``)."""

    def close_statistics(self, output_scale: float | Tensor) -> Tensor | bool | None:
        """Close this step's statistics. ``output_scale`` (accumulation / loss scale, see ``engine.layer``) maps
        the captured output-gradient rows to per-example gradients of the loss; a method applies it to its
        statistics as their degree in the output gradient says (K-FAC's B and Shampoo's factors: squared;
        Gauss-Newton's kept rows: linearly; statistics from the unscaled gradient: not at all).

        Returns None when there was nothing to fold, else a flag, True where the step's statistics were kept, False
        where they were rejected as non-finite (the last good ones stay): a 0-d bool tensor on the device (the flag
        the method computed anyway: no negation to launch), or a bool where the host decides
        (``linalg.host_decides``). The manager reads every device flag of a step at once: no method synchronises
        with the device here (beyond a first value's check).
        """
        return None

    @classmethod
    def close_many(cls, pres: list[Preconditioner], output_scale: float | Tensor) -> list[Tensor | bool | None]:
        """``[p.close_statistics(output_scale) for p in pres]``; methods close equally shaped factors of many layers
        as one stack (``banks``: a handful of operations per stack instead of per layer)."""
        return [p.close_statistics(output_scale) for p in pres]

    def statistics_tensors(self) -> list[Tensor] | None:
        """This step's statistics as tensors to be summed in place across ranks before ``close_statistics``
        (data parallelism); ``[]`` when every rank already has the same statistics (e.g. from the all-reduced
        gradient), None when the method cannot be distributed."""
        return None

    def statistics_factors(self) -> list[tuple[Factor, bool]]:
        """The factors behind ``statistics_tensors``, each with whether its count is the loss's ``N``
        (``loss_examples``): on a rank where the layer saw no call in a step, those count the rank's examples, and
        every factor that had rows on another rank folds them (``distributed.reduce_statistics``); [] for none."""
        return []

    def gather_tensors(self) -> list[Tensor] | None:
        """This step's statistics as tensors to be concatenated along dim 0 across ranks (methods that keep the
        examples themselves, such as Gauss-Newton); None when the method's statistics are sums instead."""
        return None

    def gathered(self, tensors: list[Tensor]) -> None:
        """Receive the concatenation over ranks of ``gather_tensors``, before ``close_statistics``."""

    def discard_statistics(self) -> None:
        """Drop this step's partial sums (a skipped or failed step)."""

    # -- preconditioner ---------------------------------------------------------------------------------
    def refresh(self, damping: float) -> bool | None:
        """Recompute the preconditioner from the statistics. True on success, False on numerical failure
        (the last good preconditioner is kept), None when there are no statistics yet."""
        raise NotImplementedError

    @classmethod
    def refresh_many(cls, pres: list[Preconditioner], damping: float) -> list[bool | None]:
        """``[p.refresh(damping) for p in pres]``; methods batch the decompositions of equally shaped factors
        (one ``torch.linalg`` call for every block of a transformer)."""
        return [p.refresh(damping) for p in pres]

    def precondition(self, grad: Tensor) -> Tensor:
        """``P · G``."""
        raise NotImplementedError

    def curvature_matvec(self, v: Tensor) -> Tensor:
        """``P^{-1} · V``, the curvature the preconditioner stands for (used by the quality criterion)."""
        raise NotImplementedError

    def kronecker_operands(self) -> tuple[Tensor, Tensor] | None:
        """Dense symmetric ``(L, R)`` with ``precondition(G) == L @ G @ R`` for the current state, or None (the
        manager then stacks equally shaped layers that have them into one batched product, ``engine.batched``, and
        factors the product through the step's rows where that is cheaper, ``engine.factored``)."""
        return None

    def stack_operands(self) -> tuple[Tensor, ...] | None:
        """Tensors whose stacks over equally shaped layers give their ``P·G`` in one go (``precondition_stacked``;
        the manager stacks such layers on accelerators, ``engine.batched``), or None; replaced, not modified in place,
        when the preconditioner changes. Default: the Kronecker operands."""
        return self.kronecker_operands()

    @classmethod
    def precondition_stacked(cls, operands: tuple[Tensor, ...], g: Tensor) -> Tensor:
        """``P·G`` of a stack of gradients ``g`` (``n x d_out x d_in``) from the stacked ``stack_operands``;
        default: ``L · G · R`` in two ``bmm``."""
        left, right = operands
        return torch.bmm(torch.bmm(left, g), right)

    def refresh_cost(self) -> float:
        """Relative cost of a refresh (the n³ of dense factors), used to split inverse work across ranks."""
        return float(self.d_in**3 + self.d_out**3)

    def inverse_tensors(self) -> list[Tensor]:
        """The tensors that define the current preconditioner (allocated with their shapes if there is none yet),
        which a layer's owner rank broadcasts after a refresh; ``inverse_tensors_loaded`` is called once they
        were overwritten in place."""
        raise NotImplementedError(f"{type(self).__name__} cannot share its preconditioner across ranks")

    def inverse_tensors_loaded(self) -> None:
        """Hook after ``inverse_tensors`` were received from the owner rank."""

    def spectrum(self) -> Tensor | None:
        """Eigenvalues of the damped curvature when the method has them at hand (None otherwise)."""
        return None

    def curvature_state(self) -> list[Tensor]:
        """The tensors the preconditioner is computed from; their relative change between refreshes drives the
        adaptive freeze."""
        return list(self._tensors().values())

    def factor_numel(self) -> int:
        """Number of stored statistic and preconditioner entries (memory reporting)."""
        return sum(t.numel() for t in self._tensors().values())

    # -- persistence ------------------------------------------------------------------------------------
    def _header_tensor(self, *values: float) -> Tensor:
        """A small tensor of numbers (``ready`` first) sent beside ``inverse_tensors``; read by ``_read_header``."""
        self._header = torch.tensor([float(self.ready), *values], dtype=self.dtype, device=self.device)
        return self._header

    def _shareable(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """Attribute ``name`` as a contiguous tensor (zeros of ``shape`` when unset), stored back: the same memory
        layout on every rank, so the products of ``P·G`` round identically everywhere."""
        t = getattr(self, name)
        t = torch.zeros(shape, dtype=self.dtype, device=self.device) if t is None else t.contiguous()
        setattr(self, name, t)
        return t

    def _read_header(self) -> list[float]:
        """Set ``ready`` from the received header and return the other numbers."""
        ready, *rest = (float(v) for v in self._header)
        self.ready = ready > 0.5
        return rest

    def config(self) -> dict[str, Any]:
        """The options the derived state depends on (plain values); a checkpoint saved under another ``config``
        has its derived state rebuilt from its statistics instead of loaded."""
        keys = self.config_keys + (("damping",) if isinstance(self.options.damping, (int, float)) else ())
        return {key: getattr(self.options, key) for key in keys}

    #: the option names ``config`` reports (a constant damping is added)
    config_keys: tuple[str, ...] = ()

    def _tensors(self) -> dict[str, Tensor]:
        out = {}
        for name in self.state_tensors:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def _load_tensors(self, state: dict[str, Any], derived: bool) -> None:
        """Set the ``state_tensors`` attributes from ``state`` (the ``derived`` ones only when ``derived``);
        statistics are fitted to this layer's storage by ``fit_statistic`` (methods with other storage override
        this)."""
        for name in self.state_tensors:
            value = state.get(name) if derived or name not in self.derived else None
            if value is not None and name not in self.derived:
                value = self.fit_statistic(name, value)
            setattr(self, name, None if value is None else value.to(self.device, self.dtype, copy=True))

    def fit_statistic(self, name: str, saved: Tensor) -> Tensor:
        """A saved statistic in the form this layer stores it now; raises ValueError when it cannot fit."""
        return saved

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: v.detach().clone() for k, v in self._tensors().items()}
        for name in self.state_numbers:
            state[name] = getattr(self, name)
        state["ready"] = self.ready
        state["refreshes"] = self.refreshes
        state["config"] = self.config()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Load a ``state_dict``; returns False when its derived state was dropped (saved under another
        ``config``): the preconditioner is then not ``ready`` until it is refreshed from the loaded statistics.

        Raises:
            ValueError: when a saved statistic does not fit this layer (its shape), naming both shapes.
        """
        same = state.get("config", self.config()) == self.config()
        self._load_tensors(state, same)
        for name in self.state_numbers:
            if name in state and (same or name not in self.derived):
                setattr(self, name, state[name])
        self.ready = bool(state.get("ready", False)) and same
        self.refreshes = int(state.get("refreshes", 0))
        self._spectrum = None
        return same


def fit_square(name: str, saved: Tensor, dim: int, diagonal: bool) -> Tensor:
    """A saved ``dim x dim`` statistic (dense, or its diagonal as a vector) in the requested form: a dense one
    keeps its diagonal when the layer now stores a diagonal, a diagonal becomes a diagonal matrix otherwise."""
    if saved.shape[0] != dim or (saved.dim() == 2 and saved.shape[1] != dim) or saved.dim() not in (1, 2):
        want = (dim,) if diagonal else (dim, dim)
        raise ValueError(f"saved `{name}` has shape {tuple(saved.shape)}, this layer needs {want}")
    if diagonal:
        return saved.diagonal().clone() if saved.dim() == 2 else saved
    return torch.diag(saved) if saved.dim() == 1 else saved
