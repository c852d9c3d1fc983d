"""Layer adapters: a managed layer seen as one matrix, and the rows its calls contribute.

Every managed layer is a matrix weight ``W`` of shape ``d_out x d_in`` in the orientation of ``nn.Linear``
(bias appended as a last column, the homogeneous coordinate). The weight may be a whole parameter, a block of rows
of one (``nn.MultiheadAttention``'s packed ``in_proj_weight`` is one layer, its separate ``q/k/v_proj_weight`` are
three, their bias a block of ``in_proj_bias``), one expert's matrix ``param[e]`` of a 3-d parameter (a
mixture-of-experts layer), or a parameter stored transposed (``nn.Embedding``: ``W = weightᵀ``; Hugging Face's
``Conv1D``: ``W = weightᵀ``). An adapter knows how to

* turn one call's input and output gradient into an ``Observation``: input rows ``h̄`` (``rows x d_in``, a trailing
  1 when the call adds a bias), output-gradient rows ``δ`` (``rows x d_out``), and how many rows and examples they
  stand for (the ``N`` of the loss average, used to undo the ``1/N`` of a mean loss);
* read the parameters' gradients as one matrix ``G`` and write a matrix back.

Weight sharing (sequence positions, spatial positions) follows K-FAC-expand by default: every position is a row.
``weight_sharing="reduce"`` averages inputs and sums output gradients over the shared positions instead
(Eschenhagen et al., 2023). For token layers (``nn.Linear`` and the other linear-like calls, ``nn.Embedding``) under
expand every row (every token) counts as an example, the convention of token-averaged language-model losses; for
convolutions the batch dimension is the example.

Padding rule (token layers): a row whose output gradient is exactly zero is not an example. It enters neither the
input statistic, nor the output-gradient statistic, nor the count ``N`` (a tensor, so the rule costs no device
sync). Padding masked by the loss (``ignore_index``, a masked mean), and positions that causal or key-masked
attention hides from every real position, are dropped, so padding a batch further changes nothing. A row whose
gradient is zero for another reason (every unit after it inactive, a loss term already satisfied) contributes
nothing to the exact Fisher ``E[g gᵀ]`` either; the rule then only removes it from K-FAC's input factor and from
``N`` (the undo of a mean loss then takes such rows as if the loss had not counted them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo.capture.rows import (
    Count,
    IndexRows,
    Observation,
    RowCount,
    Rows,
    matrix_rows,
    row_peaks,
    token_mask,
    with_ones,
)
from lightning_soo.linalg import host_decides
from lightning_soo.options import WeightSharing

#: the methods that take a layer from its gradient alone, named where a layer is left to them
GRADIENT_METHODS = "PSGD and Shampoo with statistics='gradient'"


class UnsupportedLayerError(ValueError):
    """A module of a supported type whose configuration cannot be preconditioned."""


@dataclass
class Part:
    """A parameter, or the block ``rows`` of its first dimension (an index: one expert's matrix of a 3-d one)."""

    param: nn.Parameter
    rows: slice | int | None = None

    def of(self, t: Tensor) -> Tensor:
        return t if self.rows is None else t[self.rows]

    def full(self, block: Tensor) -> Tensor:
        """``block`` placed in a zero tensor shaped like the parameter."""
        if self.rows is None:
            return block
        out = block.new_zeros(self.param.shape)
        out[self.rows] = block
        return out


class LayerAdapter:
    """Base adapter: a linear-like layer (``nn.Linear`` and calls of ``F.linear``), weight plus optional bias."""

    module: nn.Module
    #: the weight is stored transposed (``d_in x d_out``)
    transposed = False
    #: why the layer's rows cannot be captured ("": they can): only a method that fits from the gradient takes it
    hooks_refused = ""
    #: the matrix is one row (a vector parameter): methods that keep vectors' factors diagonal do (``ParameterAdapter``)
    vector = False
    #: only the methods that take rows use this layer (one group of a convolution: ``GroupConvAdapter``)
    hooks_only = False
    #: the methods that take rows precondition this layer by other specs, its parts (a convolution's groups, set by
    #: discovery for ``max_conv_groups``); the methods fitting from the gradient take it whole
    split_for_hooks = False

    def __init__(
        self,
        module: nn.Module,
        weight_sharing: WeightSharing = "expand",
        *,
        weight: Part | None = None,
        bias: Part | None = None,
    ) -> None:
        self.module = module
        self.weight_sharing = weight_sharing
        self._weight = weight if weight is not None else Part(module.weight)
        if bias is None and weight is None and getattr(module, "bias", None) is not None:
            bias = Part(module.bias)
        self.bias = bias  # sets ``parts`` and ``params`` too

    @property
    def weight(self) -> Part:
        return self._weight

    @property
    def bias(self) -> Part | None:
        return self._bias

    @bias.setter
    def bias(self, part: Part | None) -> None:
        """Set (or drop: a tied module's bias stays plain) the bias; ``parts`` and ``params`` follow. They are kept
        as lists, not rebuilt per access: the step reads them about six times per layer."""
        self._bias = part
        self.parts: list[Part] = [self._weight] if part is None else [self._weight, part]
        self.params: list[nn.Parameter] = [p.param for p in self.parts]

    @property
    def has_bias(self) -> bool:
        return self._bias is not None

    def weight_matrix(self, w: Tensor) -> Tensor:
        """A weight-shaped tensor (the block of this layer) as ``d_out x d_in_weight``."""
        w = self.weight.of(w)
        if self.transposed:
            return w.t()
        return w if w.dim() == 2 else w.reshape(w.shape[0], -1)  # no view op for a matrix (the hot path counts them)

    @cached_property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the gradient matrix, bias column included in d_in (fixed: computed once)."""
        d_out, d_in = self.weight_matrix(self.weight.param.detach()).shape
        return d_out, d_in + int(self.has_bias)

    # -- rows -------------------------------------------------------------------------------------------
    def input_rows(self, x: Tensor) -> tuple[Rows, int]:
        if self.weight_sharing == "reduce" and x.dim() > 2:
            h = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        else:
            h = x.reshape(-1, x.shape[-1])
        return (with_ones(h) if self.has_bias else h), h.shape[0]

    def output_rows(self, g: Tensor) -> tuple[Tensor, int]:
        if self.weight_sharing == "reduce" and g.dim() > 2:
            d = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        else:
            d = g.reshape(-1, g.shape[-1])
        return d, d.shape[0]

    def observe(self, x: Tensor, g: Tensor, norms: bool = False) -> Observation:
        """The statistics of one call with input ``x`` and output gradient ``g``, padding rule applied; ``norms``:
        unmasked rows and their norms, for a method that weights each row by them (``_weighted``)."""
        if self.weight_sharing == "reduce" and x.dim() > 2:
            gs = g.reshape(g.shape[0], -1, g.shape[-1])
            xs = x.reshape(x.shape[0], -1, x.shape[-1])
            real = (gs.abs().amax(2) > 0).to(xs.dtype)  # (examples, positions); see _token_mask
            count = real.sum(1, keepdim=True)
            h = (xs * real.unsqueeze(2)).sum(1) / count.clamp(min=1)  # mean over the real positions
            d = gs.sum(1)
            mask = (count.squeeze(1) > 0).to(d.dtype)
            n: Count = mask.sum()
        else:
            # with a bias the rows are a fresh ``[h | 1]``; without, the input itself, as a view: the mark of borrowed
            # rows, which a method keeping them past the step copies (Gauss-Newton's ``_owned``)
            h = matrix_rows(x) if self.has_bias else x.reshape(-1, x.shape[-1])
            d = matrix_rows(g)
            if host_decides(d):  # no padding (the usual batch), read on the host: no peaks, no mask
                every = self._every_row_real(h, d, norms)
                if every is not None:
                    return every
            peaks = row_peaks(d)
            if norms:
                return self._weighted(h, d, peaks)
            mask = token_mask(peaks)
            # on an accelerator the count is reduced where it is needed (``RowCount``: per bank, as it closes)
            n = mask.sum() if host_decides(d) else RowCount(peaks)
        column = mask.unsqueeze(1)
        h = torch.cat([h * column, column], dim=1) if self.has_bias else h * column  # the mask is the ones column
        return Observation(h, d, n, n)

    def _every_row_real(self, h: Tensor, d: Tensor, norms: bool) -> Observation | None:
        """The observation of rows that are all examples, known on the host from their Euclidean norms (on the CPU
        one fast reduction, where the row peaks take two passes, or an ``inf`` norm 8x slower); None when some norm
        is zero: padding, or a real row whose squares underflow, which the row peaks then tell apart."""
        row_norms = torch.linalg.vector_norm(d, dim=1, keepdim=True)
        real = int(torch.count_nonzero(row_norms))
        if real != d.shape[0]:
            return None
        return Observation(with_ones(h) if self.has_bias else h, d, real, real, row_norms if norms else None)

    def _weighted(self, h: Tensor, d: Tensor, peaks: Tensor) -> Observation:
        """Rows for statistics that weight every row by its output gradient's norm (per-example Shampoo,
        ``Preconditioner.row_norms``): a row that is not an example has weight zero, so no mask. The count is of the
        non-zero peaks, not norms: a real row below 1e-19 has a norm that underflows to zero. On an accelerator the
        count is reduced when the statistics close (``RowCount``: one reduction per bank of equal layers)."""
        count: Count = int(torch.count_nonzero(peaks)) if host_decides(d) else RowCount(peaks)
        norms = torch.linalg.vector_norm(d, dim=1, keepdim=True)
        return Observation(with_ones(h) if self.has_bias else h, d, count, count, norms)

    # -- gradient matrix --------------------------------------------------------------------------------
    def to_matrix(self, tensors: list[Tensor]) -> Tensor:
        """Parameter-shaped tensors (weight, bias) as one ``d_out x d_in`` matrix (this layer's block)."""
        m = self.weight_matrix(tensors[0])
        return torch.cat([m, self.bias.of(tensors[1]).unsqueeze(1)], dim=1) if self.bias is not None else m

    def _blocks(self, m: Tensor) -> list[Tensor]:
        """A matrix as blocks shaped like this layer's part of each parameter."""
        w = m[:, :-1] if self.bias is not None else m
        if self.transposed:
            w = w.t()
        elif self.weight.param.dim() != 2:
            w = w.reshape(self.weight.of(self.weight.param).shape)
        return [w, m[:, -1]] if self.bias is not None else [w]

    def from_matrix(self, m: Tensor) -> list[Tensor]:
        """The inverse of ``to_matrix``: tensors shaped like the parameters (zero outside this layer's block)."""
        return [part.full(block) for part, block in zip(self.parts, self._blocks(m), strict=True)]

    def grad_matrix(self) -> Tensor | None:
        """The parameters' gradient as one ``d_out x d_in`` matrix, or None when a part has no gradient."""
        grads = [p.grad for p in self.params]
        if any(g is None or g.is_sparse for g in grads):
            return None
        return self.to_matrix(grads)  # type: ignore[arg-type]

    def set_grad_matrix_where(self, ok: Tensor, g: Tensor) -> None:
        """``p.grad ← g`` (this layer's block of each parameter) where the 0-d flag ``ok`` holds, else unchanged: one
        ``torch.where`` per part, written in place, with no intermediate matrix and no host read."""
        for part, block in zip(self.parts, self._blocks(g), strict=True):
            dest = part.of(part.param.grad)
            torch.where(ok, block if block.dtype == dest.dtype else block.to(dest.dtype), dest, out=dest)

    def set_grad_matrix(self, g: Tensor, scale: float = 1.0) -> None:
        """``p.grad ← scale · g`` (this layer's block of each parameter), one pass per part."""
        for part, block in zip(self.parts, self._blocks(g), strict=True):
            dest = part.of(part.param.grad)
            if scale == 1.0:
                dest.copy_(block)
            else:
                torch.mul(block, scale, out=dest)


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` with any number of leading dimensions."""


class Conv1DAdapter(LayerAdapter):
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)`` and applied with
    ``torch.addmm``; recognised by its structure (``nf`` attribute, 2-d weight of ``(nx, nf)``, bias of ``nf``)."""

    transposed = True


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d/2d/3d``: input patches by unfolding; stride, padding (any mode), dilation honoured.

    A grouped convolution is taken whole, its gradient as the matrix ``(out, in/groups · kernel)`` with the bias
    column, only by the methods that fit from the gradient (``hooks_refused``); the methods that take rows take it
    group by group (``GroupConvAdapter``) where it has at most ``max_conv_groups`` groups. Every spatial
    position is a row and the batch dimension the example; the padding rule does not apply (positions with a zero
    gradient come from pooling and activations, not from padding).
    """

    def __init__(self, module: nn.Module, weight_sharing: WeightSharing = "expand") -> None:
        super().__init__(module, weight_sharing)
        groups = module.groups
        if groups != 1:  # its gradient is a matrix all the same: (out, in/groups * kernel) with the bias
            self.hooks_refused = (
                f"grouped convolution (groups={groups}): preconditioned only by methods that fit from the gradient "
                f"({GRADIENT_METHODS}), or group by group with max_conv_groups >= {groups}"
            )

    def patches(self, x: Tensor) -> Tensor:
        """Input patches, shape (N, L, C*k1*k2*...), ordered as the flattened weight."""
        m = self.module
        nd = len(m.kernel_size)
        if x.dim() == nd + 1:  # unbatched input
            x = x.unsqueeze(0)
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        if nd == 2:
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride)  # (N, C*k*k, L)
            return cols.transpose(1, 2)
        for i in range(nd):  # generic path: unfold each spatial dim, then keep every dilation-th tap
            k, s, d = m.kernel_size[i], m.stride[i], m.dilation[i]
            x = x.unfold(2 + i, d * (k - 1) + 1, s)
            if d > 1:
                x = x[..., ::d]
        # x: (N, C, L1..Lnd, k1..knd) -> (N, L1..Lnd, C, k1..knd)
        n, c = x.shape[:2]
        perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
        x = x.permute(perm)
        return x.reshape(n, -1, c * m.weight[0, 0].numel())

    def input_rows(self, x: Tensor) -> tuple[Rows, int]:
        p = self.patches(x)
        n = p.shape[0]
        h = p.mean(1) if self.weight_sharing == "reduce" else p.reshape(-1, p.shape[-1])
        return (with_ones(h) if self.has_bias else h), n

    def output_rows(self, g: Tensor) -> tuple[Tensor, int]:
        nd = len(self.module.kernel_size)
        if g.dim() == nd + 1:
            g = g.unsqueeze(0)
        n = g.shape[0]
        g = g.reshape(n, g.shape[1], -1)
        d = g.sum(2) if self.weight_sharing == "reduce" else g.transpose(1, 2).reshape(-1, g.shape[1])
        return d, n

    def observe(self, x: Tensor, g: Tensor, norms: bool = False) -> Observation:
        h, _ = self.input_rows(x)
        d, n = self.output_rows(g)
        return Observation(h, d, h.shape[0], n)


class GroupConvAdapter(ConvAdapter):
    """One group of a grouped convolution, for the methods that take rows (K-FAC, Gauss-Newton, per-example
    Shampoo): output channels ``[g·o, (g+1)·o)`` computed from input channels ``[g·c, (g+1)·c)`` alone, so the
    group is a convolution of its own (its weight rows and bias entries a block of the parameters) and the whole
    layer's curvature block-diagonal over the groups, as the layer's own structure is."""

    hooks_only = True

    def __init__(self, module: nn.Module, group: int, weight_sharing: WeightSharing = "expand") -> None:
        o, c = module.out_channels // module.groups, module.in_channels // module.groups
        outputs = slice(group * o, (group + 1) * o)
        bias = Part(module.bias, outputs) if module.bias is not None else None
        LayerAdapter.__init__(self, module, weight_sharing, weight=Part(module.weight, outputs), bias=bias)
        self.inputs, self.outputs = (group * c, c), (group * o, o)

    def _channels(self, t: Tensor, span: tuple[int, int]) -> Tensor:
        return t.narrow(0 if t.dim() == len(self.module.kernel_size) + 1 else 1, *span)  # unbatched: channels first

    def input_rows(self, x: Tensor) -> tuple[Rows, int]:
        return super().input_rows(self._channels(x, self.inputs))

    def output_rows(self, g: Tensor) -> tuple[Tensor, int]:
        return super().output_rows(self._channels(g, self.outputs))


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding``: inputs are one-hot (kept as indices); W is seen transposed, ``d_out`` = embedding dim."""

    transposed = True

    def __init__(self, module: nn.Module, weight_sharing: WeightSharing = "expand") -> None:
        super().__init__(module, "expand")  # an embedding has no shared positions to reduce over
        if module.sparse:
            raise UnsupportedLayerError("sparse embedding gradients are not preconditioned")

    def input_rows(self, x: Tensor) -> tuple[Rows, int]:
        idx = x.reshape(-1)
        return IndexRows(idx, self.module.num_embeddings), idx.numel()

    def observe(self, x: Tensor, g: Tensor, norms: bool = False) -> Observation:
        d = g.reshape(-1, g.shape[-1])
        mask = token_mask(row_peaks(d))
        n = mask.sum()
        return Observation(IndexRows(x.reshape(-1), self.weight.param.shape[0], mask), d, n, n)
