"""Capture: which layers can be preconditioned (discovery), how their data becomes rows (adapters), and the hooks
that hand a layer's inputs and output gradients over during training (hooks). Knows nothing of the maths."""

from lightning_soo.capture.adapters import (
    ConvAdapter,
    EmbeddingAdapter,
    IndexRows,
    LayerAdapter,
    LinearAdapter,
    Rows,
    UnsupportedLayerError,
    make_adapter,
)
from lightning_soo.capture.discovery import discover
from lightning_soo.capture.hooks import Capture

__all__ = [
    "Capture",
    "ConvAdapter",
    "EmbeddingAdapter",
    "IndexRows",
    "LayerAdapter",
    "LinearAdapter",
    "Rows",
    "UnsupportedLayerError",
    "discover",
    "make_adapter",
]
