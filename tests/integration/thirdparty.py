"""torchvision, timm and litgpt beside the CPU torch wheel, for the integration tests only.

PyPI's torchvision wheel is CUDA-built: its C ops (``nms``, ``roi_align``, ...) cannot load beside the CPU torch
wheel, and its import then fails registering a fake kernel for ``torchvision::nms``. Installed into the virtual
environment it would break ``import torchmetrics`` (and so ``import lightning``) for every process. litgpt pins
``jsonargparse<=4.41``, older than the 4.50 LightningCLI needs for the callbacks' keyword arguments. So the README's
test command installs the three into ``.thirdparty/`` (``pip install --no-deps --target``), outside the path, and
:func:`load` defines the two op schemas torchvision's import registers against (never called: the models use none
of these ops) and puts ``.thirdparty`` on the path of this test process only.
"""

from __future__ import annotations

import importlib
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
    """Import ``name`` (``torchvision``, ``timm`` or ``litgpt``), from ``.thirdparty`` unless the environment has it
    (torchvision: a matching CPU build); skip the test where neither has it. Where ``.thirdparty`` exists, a failing
    import fails the test (a missing dependency must not turn the coverage checks into skips)."""
    if "path" not in _state and FOLDER.is_dir():
        if importlib.util.find_spec("torchvision") is None:  # the folder's torchvision will be the one imported
            library = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas live as long as it
            for schema in _SCHEMAS:
                library.define(schema)
            _state["library"] = library
        _state["path"] = str(FOLDER)
        sys.path.append(str(FOLDER))  # after the environment: its own packages win
    if FOLDER.is_dir() or importlib.util.find_spec(name) is not None:
        return importlib.import_module(name)
    pytest.skip(f"{name} is not installed (README: Set-up installs it into .thirdparty)")
