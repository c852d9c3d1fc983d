"""Capture: which layers can be preconditioned (discovery), how their data becomes rows (adapters), and the hooks
that hand a layer's inputs and output gradients over during training (hooks). Knows nothing of the maths."""

from lightning_soo.capture.adapters import (
    Conv1DAdapter,
    ConvAdapter,
    EmbeddingAdapter,
    IndexRows,
    LayerAdapter,
    LinearAdapter,
    Observation,
    Part,
    Rows,
    UnsupportedLayerError,
)
from lightning_soo.capture.census import Census
from lightning_soo.capture.discovery import LayerSpec, Use, discover
from lightning_soo.capture.hooks import Capture
from lightning_soo.capture.make import make_adapter

__all__ = [
    "Capture",
    "Census",
    "Conv1DAdapter",
    "ConvAdapter",
    "EmbeddingAdapter",
    "IndexRows",
    "LayerAdapter",
    "LayerSpec",
    "LinearAdapter",
    "Observation",
    "Part",
    "Rows",
    "UnsupportedLayerError",
    "Use",
    "discover",
    "make_adapter",
]
