"""The interface every preconditioner implements, one instance per layer.

A preconditioner sees a layer's gradient as a matrix ``G`` (``d_out x d_in``, bias column included). Statistics
arrive either from the capture hooks (rows of layer inputs ``h̄`` and per-example output gradients ``g``) or from
the mini-batch gradient itself (``observe_grad``). The manager drives the life cycle of one optimizer step:

    observe_inputs / observe_output_grads   (hooks, any number of calls, micro-batches included)
    observe_grad(G)                         (statistics steps, for methods with ``uses_grad``)
    close_statistics(grad_scale)            (once per statistics step)
    refresh(damping)                        (when the schedule says so)
    precondition(G) -> P·G                  (every step, once ``ready``)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_soo.layers import LayerAdapter, Rows


class Preconditioner:
    """Base class: state handling and defaults shared by all methods."""

    #: the method needs layer inputs and output gradients from hooks
    uses_hooks: bool = True
    #: the method wants the mini-batch gradient on statistics steps
    uses_grad: bool = False
    #: every square matrix among ``statistics_tensors`` is symmetric (sent as its upper triangle under DDP)
    symmetric_statistics: bool = False
    #: tensor attributes persisted by ``state_dict`` (None values are skipped)
    state_tensors: tuple[str, ...] = ()
    #: plain-number attributes persisted by ``state_dict``
    state_numbers: tuple[str, ...] = ()
    #: a message for the user (e.g. an input was too large and was subsampled); the manager warns once per layer
    notice: str | None = None

    @classmethod
    def for_layer(
        cls, adapter: LayerAdapter, *, dtype: torch.dtype, device: torch.device, **options: Any
    ) -> Preconditioner:
        """Build the preconditioner of one layer; methods override this to adapt to the layer type."""
        d_out, d_in = adapter.shape
        return cls(d_out, d_in, dtype=dtype, device=device, **options)

    def __init__(self, d_out: int, d_in: int, *, dtype: torch.dtype, device: torch.device) -> None:
        self.d_out, self.d_in = d_out, d_in
        self.dtype, self.device = dtype, device
        self.ready = False  # a preconditioner exists (precondition may be called)
        self.refreshes = 0

    # -- statistics -------------------------------------------------------------------------------------
    def observe_inputs(self, rows: Rows, n_examples: int) -> Any:
        """Fold layer-input rows into this step's sums; the return value is handed to observe_output_grads."""
        return None

    def observe_output_grads(self, rows: Tensor, n_examples: int, ctx: Any) -> None:
        """Fold per-example output-gradient rows (up to the step's constant ``grad_scale``)."""

    def observe_grad(self, grad: Tensor) -> None:
        """Fold the mini-batch gradient matrix (methods with ``uses_grad``)."""

    def close_statistics(self, grad_scale: float) -> bool | None:
        """Close this step's statistics. ``grad_scale`` maps captured output gradients to per-example ones.

        Returns True when folded, False when rejected as non-finite, None when there was nothing to fold.
        """
        return None

    def statistics_tensors(self) -> list[Tensor] | None:
        """This step's statistics as tensors to be summed in place across ranks before ``close_statistics``
        (data parallelism); ``[]`` when every rank already has the same statistics (e.g. from the all-reduced
        gradient), None when the method cannot be distributed."""
        return None

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

    def precondition(self, grad: Tensor) -> Tensor:
        """``P · G``."""
        raise NotImplementedError

    def curvature_matvec(self, v: Tensor) -> Tensor:
        """``P^{-1} · V``, the curvature the preconditioner stands for (used by the quality criterion)."""
        raise NotImplementedError

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
    def _tensors(self) -> dict[str, Tensor]:
        out = {}
        for name in self.state_tensors:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def _load_tensors(self, state: dict[str, Any]) -> None:
        """Set the ``state_tensors`` attributes from ``state`` (methods with other storage override this)."""
        for name in self.state_tensors:
            value = state.get(name)
            setattr(self, name, None if value is None else value.to(self.device, self.dtype))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: v.detach().clone() for k, v in self._tensors().items()}
        for name in self.state_numbers:
            state[name] = getattr(self, name)
        state["ready"] = self.ready
        state["refreshes"] = self.refreshes
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_tensors(state)
        for name in self.state_numbers:
            if name in state:
                setattr(self, name, state[name])
        self.ready = bool(state.get("ready", False))
        self.refreshes = int(state.get("refreshes", 0))
