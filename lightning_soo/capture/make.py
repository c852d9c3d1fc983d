"""Which adapter a module gets (``make_adapter``)."""

from __future__ import annotations

from torch import nn

from lightning_soo.capture.adapters import (
    Conv1DAdapter,
    ConvAdapter,
    EmbeddingAdapter,
    LayerAdapter,
    LinearAdapter,
    UnsupportedLayerError,
)
from lightning_soo.capture.calls import CONV_TYPES, functional_linear
from lightning_soo.capture.gradient_only import ConvTransposeAdapter
from lightning_soo.options import WeightSharing


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` by structure (no transformers import): a 2-d ``(nx, nf)`` weight and ``nf``."""
    w, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(w, nn.Parameter)
        and w.dim() == 2
        and isinstance(nf, int)
        and w.shape[1] == nf
    )


def make_adapter(module: nn.Module, weight_sharing: WeightSharing = "expand") -> LayerAdapter | None:
    """The adapter for ``module``, None for unsupported types; raises ``UnsupportedLayerError`` for refused
    configurations of supported types."""
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    supported = isinstance(module, (nn.Linear, nn.Embedding, *CONV_TYPES)) or is_conv1d(module) or transposed
    if supported and not isinstance(module._parameters.get("weight"), nn.Parameter):
        raise UnsupportedLayerError(
            "its weight is computed from other parameters (a parametrization such as weight_norm or spectral_norm): "
            "their gradients are not the weight's, which the preconditioner would rewrite"
        )
    if isinstance(module, nn.Linear):
        return LinearAdapter(module, weight_sharing)
    if isinstance(module, CONV_TYPES):
        return ConvAdapter(module, weight_sharing)
    if transposed:
        return ConvTransposeAdapter(module, weight_sharing)
    if isinstance(module, nn.Embedding):
        return EmbeddingAdapter(module, weight_sharing)
    if is_conv1d(module):
        return Conv1DAdapter(module, weight_sharing)
    if functional_linear(module):  # a router: captured at its F.linear call, if the census finds only that one
        return LinearAdapter(module, weight_sharing)
    return None
