"""torchvision and timm beside the CPU torch wheel, for the integration tests only.

PyPI's torchvision wheel is CUDA-built: its C ops (``nms``, ``roi_align``, ...) cannot load beside the CPU torch
wheel, and its import then fails registering a fake kernel for ``torchvision::nms``. Installed into the virtual
environment it would break ``import torchmetrics`` (and so ``import lightning``) for every process. So the README's
test command installs it, with timm, into ``.thirdparty/`` (``pip install --no-deps --target``), outside the path,
and :func:`load` defines the two op schemas torchvision's import registers against (never called: the models use
none of these ops) and puts ``.thirdparty`` on the path of this test process only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

FOLDER = Path(__file__).resolve().parents[2] / ".thirdparty"
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")  # fmt: skip
_state: dict[str, object] = {}


def load(name: str) -> ModuleType:
    """Import ``name`` (``torchvision`` or ``timm``), from ``.thirdparty`` unless the environment has its own
    torchvision (a matching CPU build); skip the test where neither is there."""
    if "path" not in _state and FOLDER.is_dir() and importlib.util.find_spec("torchvision") is None:
        library = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas live as long as it
        for schema in _SCHEMAS:
            library.define(schema)
        _state["library"], _state["path"] = library, str(FOLDER)
        sys.path.insert(0, str(FOLDER))
    return pytest.importorskip(name)
