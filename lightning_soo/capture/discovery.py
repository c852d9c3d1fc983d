"""Which layers of a model can be preconditioned, and why the other parameters cannot."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from lightning_soo.capture.adapters import LayerAdapter, UnsupportedLayerError, WeightSharing, make_adapter


def eager_name(name: str) -> str:
    """The name without ``torch.compile``'s ``_orig_mod`` segments, so that ``exclude`` patterns, warnings and
    checkpoints use the names of the eager model."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def discover(
    model: nn.Module, exclude: Sequence[str] = (), weight_sharing: WeightSharing = "expand"
) -> tuple[dict[str, LayerAdapter], dict[str, str]]:
    """(module name -> adapter for every preconditionable layer, parameter name -> reason it stays plain).

    Layers whose name matches an ``exclude`` pattern (``fnmatch``) are left out silently; tied parameters (one
    tensor in several modules) and refused configurations are listed with their reason; frozen layers are managed
    (and listed): they cost nothing while frozen and are preconditioned once unfrozen (fine-tuning).
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    adapters: dict[str, LayerAdapter] = {}
    plain: dict[str, str] = {}
    covered: set[int] = set()

    def skip(mname: str, module: nn.Module, reason: str) -> None:
        for pname, _ in module.named_parameters(recurse=False):
            plain[f"{mname}.{pname}" if mname else pname] = reason

    for raw_name, module in model.named_modules():
        mname = eager_name(raw_name)
        try:
            adapter = make_adapter(module, weight_sharing)
        except UnsupportedLayerError as err:
            skip(mname, module, str(err))
            continue
        if adapter is None:
            continue
        params = list(module.parameters(recurse=False))
        if any(fnmatch.fnmatchcase(mname, pat) for pat in exclude):
            covered.update(id(p) for p in params)
        elif any(owners[id(p)] > 1 for p in params):
            skip(mname, module, "tied to another module")
        else:
            if not all(p.requires_grad for p in adapter.params):  # managed, so it is preconditioned once unfrozen
                skip(mname, module, "frozen (requires_grad=False); preconditioned once unfrozen")
            covered.update(id(p) for p in params)
            adapters[mname] = adapter
    for raw_name, p in model.named_parameters():
        pname = eager_name(raw_name)
        if id(p) not in covered and p.requires_grad and pname not in plain:
            plain[pname] = "not in a supported module"
    return adapters, plain
