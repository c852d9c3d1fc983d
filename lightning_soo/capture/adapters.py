"""Layer adapters: one per module type, turning hook data into row matrices.

Every supported layer is seen as a matrix weight ``W`` of shape ``d_out x d_in`` (bias appended as a last
column, the homogeneous coordinate). An adapter knows how to

* turn the layer input into rows ``h̄`` (``rows x d_in``, a trailing 1 when there is a bias),
* turn the gradient w.r.t. the layer output into rows ``δ`` (``rows x d_out``) and say how many examples they
  stand for (the ``N`` of the loss average, used to undo the ``1/N`` of a mean loss),
* read the parameter gradients as one matrix ``G`` and write a matrix back.

Weight sharing (sequence positions, spatial positions) follows K-FAC-expand by default: every position is a row.
``weight_sharing="reduce"`` averages inputs and sums output gradients over the shared positions instead
(Eschenhagen et al., 2023). For ``nn.Linear`` under expand every row (every token) counts as an example, the
convention of token-averaged language-model losses; for convolutions the batch dimension is the example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo.options import WeightSharing


class UnsupportedLayerError(ValueError):
    """A module of a supported type whose configuration cannot be preconditioned."""


@dataclass
class IndexRows:
    """Rows that are one-hot vectors, stored as their indices (embedding inputs)."""

    index: Tensor  # (rows,) int64
    size: int  # length of each one-hot vector

    @property
    def shape(self) -> tuple[int, int]:
        return (self.index.numel(), self.size)


Rows = Tensor | IndexRows


class LayerAdapter:
    """Base adapter: grad matrix read/write for a weight plus optional bias."""

    module: nn.Module

    def __init__(self, module: nn.Module, weight_sharing: WeightSharing = "expand") -> None:
        self.module = module
        self.weight_sharing = weight_sharing

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def params(self) -> list[nn.Parameter]:
        ps = [self.module.weight]
        if self.has_bias:
            ps.append(self.module.bias)
        return ps

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the gradient matrix, bias column included in d_in."""
        w = self.module.weight
        return w.shape[0], w[0].numel() + int(self.has_bias)

    def input_rows(self, x: Tensor) -> tuple[Rows, int]:
        raise NotImplementedError

    def output_rows(self, g: Tensor) -> tuple[Tensor, int]:
        raise NotImplementedError

    def to_matrix(self, tensors: list[Tensor]) -> Tensor:
        """Parameter-shaped tensors (weight, bias) as one ``d_out x d_in`` matrix."""
        m = tensors[0].reshape(tensors[0].shape[0], -1)
        return torch.cat([m, tensors[1].unsqueeze(1)], dim=1) if self.has_bias else m

    def from_matrix(self, m: Tensor) -> list[Tensor]:
        """The inverse of ``to_matrix``: views shaped like the parameters."""
        w = self.module.weight
        if self.has_bias:
            return [m[:, :-1].reshape(w.shape), m[:, -1]]
        return [m.reshape(w.shape)]

    def grad_matrix(self) -> Tensor | None:
        """The parameters' gradient as one ``d_out x d_in`` matrix, or None when a part has no gradient."""
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return None
        return self.to_matrix(grads)  # type: ignore[arg-type]

    def set_grad_matrix(self, g: Tensor) -> None:
        for p, part in zip(self.params, self.from_matrix(g), strict=True):
            p.grad.copy_(part)


def _with_ones(h: Tensor) -> Tensor:
    return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` with any number of leading dimensions."""

    def input_rows(self, x: Tensor) -> tuple[Rows, int]:
        if self.weight_sharing == "reduce" and x.dim() > 2:
            h = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        else:
            h = x.reshape(-1, x.shape[-1])
        n = h.shape[0]
        return (_with_ones(h) if self.has_bias else h), n

    def output_rows(self, g: Tensor) -> tuple[Tensor, int]:
        if self.weight_sharing == "reduce" and g.dim() > 2:
            d = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        else:
            d = g.reshape(-1, g.shape[-1])
        return d, d.shape[0]


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d/2d/3d``: input patches by unfolding; stride, padding (any mode), dilation honoured.

    Grouped convolutions are refused (``UnsupportedLayerError``) and left to the plain gradient.
    """

    def __init__(self, module: nn.Module, weight_sharing: WeightSharing = "expand") -> None:
        super().__init__(module, weight_sharing)
        if module.groups != 1:
            raise UnsupportedLayerError(f"grouped convolution (groups={module.groups}) is not preconditioned")
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise UnsupportedLayerError("transposed convolutions are not preconditioned")

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
        return (_with_ones(h) if self.has_bias else h), n

    def output_rows(self, g: Tensor) -> tuple[Tensor, int]:
        nd = len(self.module.kernel_size)
        if g.dim() == nd + 1:
            g = g.unsqueeze(0)
        n = g.shape[0]
        g = g.reshape(n, g.shape[1], -1)
        d = g.sum(2) if self.weight_sharing == "reduce" else g.transpose(1, 2).reshape(-1, g.shape[1])
        return d, n


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding``: inputs are one-hot (kept as indices); W is seen transposed, ``d_out`` = embedding dim."""

    def __init__(self, module: nn.Module, weight_sharing: WeightSharing = "expand") -> None:
        super().__init__(module, weight_sharing)
        if module.sparse:
            raise UnsupportedLayerError("sparse embedding gradients are not preconditioned")

    @property
    def has_bias(self) -> bool:
        return False

    @property
    def shape(self) -> tuple[int, int]:
        v, d = self.module.weight.shape
        return d, v

    def input_rows(self, x: Tensor) -> tuple[Rows, int]:
        idx = x.reshape(-1)
        return IndexRows(idx, self.module.num_embeddings), idx.numel()

    def output_rows(self, g: Tensor) -> tuple[Tensor, int]:
        d = g.reshape(-1, g.shape[-1])
        return d, d.shape[0]

    def to_matrix(self, tensors: list[Tensor]) -> Tensor:
        return tensors[0].t()

    def from_matrix(self, m: Tensor) -> list[Tensor]:
        return [m.t()]

    def grad_matrix(self) -> Tensor | None:
        g = self.module.weight.grad
        if g is None or g.is_sparse:
            return None
        return g.t()


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def make_adapter(module: nn.Module, weight_sharing: WeightSharing = "expand") -> LayerAdapter | None:
    """The adapter for ``module``, None for unsupported types; raises ``UnsupportedLayerError`` for refused
    configurations of supported types."""
    if isinstance(module, nn.Linear):
        return LinearAdapter(module, weight_sharing)
    if isinstance(module, _CONV):
        return ConvAdapter(module, weight_sharing)
    if isinstance(module, nn.Embedding):
        if weight_sharing == "reduce":
            weight_sharing = "expand"  # an embedding has no shared positions to reduce over
        return EmbeddingAdapter(module, weight_sharing)
    return None
