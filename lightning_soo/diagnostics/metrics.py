"""What the library reports, as flat scalar dictionaries, and the TensorBoard custom-scalars layout.

Plain PyTorch: the Lightning callbacks send these dictionaries through the trainer's loggers; a plain loop can
send them to ``torch.utils.tensorboard.SummaryWriter`` (``writer.add_custom_scalars(layout())`` once).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_soo.engine.manager import PreconditionerManager

PREFIX = "soo"


def layout() -> dict[str, dict[str, list[Any]]]:
    """The "second-order" custom-scalars layout (category -> chart -> [kind, [tag regexes]]).

    Quantities of different scales get their own charts: the 0/1 freeze flag is not drawn beside the refresh
    count, and the best scale α* (tens) not beside the learning rate (tenths).
    """
    p = PREFIX
    return {
        "second-order": {
            "quality index (1 = SGD, lower is better)": ["Multiline", [rf"{p}/quality_index/.*"]],
            "curvature criterion c(P)": ["Multiline", [rf"{p}/criterion/.*"]],
            "best scale α* of P (model)": ["Multiline", [rf"{p}/alpha_star/model"]],
            "learning rate": ["Multiline", [rf"{p}/lr"]],
            "damping": ["Multiline", [rf"{p}/damping", rf"{p}/damping_applied"]],
            "refreshes (count)": ["Multiline", [rf"{p}/refreshes", rf"{p}/failed_refreshes"]],
            "curvature frozen (0 = refreshed, 1 = frozen)": ["Multiline", [rf"{p}/frozen"]],
            "time per step (ms)": ["Multiline", [rf"{p}/ms_per_step/.*"]],
            "factor memory (MB)": ["Multiline", [rf"{p}/factor_memory_mb"]],
            "condition numbers": ["Multiline", [rf"{p}/condition/.*"]],
            "KL-clip scale": ["Multiline", [rf"{p}/kl_scale"]],
        }
    }


class StepTimer:
    """Milliseconds per step spent in statistics, refresh and preconditioning since the last report."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._last_steps = 0

    def report(self, manager: PreconditionerManager) -> dict[str, float]:
        steps = manager.steps - self._last_steps
        out: dict[str, float] = {}
        if steps > 0:
            for key, total in manager.timings.items():
                out[f"{PREFIX}/ms_per_step/{key}"] = 1e3 * (total - self._last.get(key, 0.0)) / steps
        self._last, self._last_steps = dict(manager.timings), manager.steps
        return out


def manager_metrics(manager: PreconditionerManager) -> dict[str, float]:
    """Scalars describing the manager's state: damping, counters, freeze, memory, KL scale, condition numbers."""
    p = PREFIX
    # the manager counts layer refreshes; a refresh of the model is one, whatever its number of layers
    refreshes = max((layer.preconditioner.refreshes for layer in manager.layers.values()), default=0)
    out: dict[str, float] = {
        f"{p}/refreshes": float(refreshes),
        f"{p}/failed_refreshes": float(manager.counters["failed_refreshes"]),
        f"{p}/skipped_statistics": float(manager.counters["skipped_statistics"]),
        f"{p}/frozen": float(manager.frozen),
        f"{p}/kl_scale": float(manager.last_kl_scale),
    }
    if manager.last_damping is not None:
        out[f"{p}/damping"] = float(manager.last_damping)
    applied = [a for layer in manager.layers.values() if (a := layer.preconditioner.applied_damping) is not None]
    if applied:  # what the preconditioners actually use (relative damping: scaled by λ_max), averaged over layers
        out[f"{p}/damping_applied"] = sum(applied) / len(applied)
    numel = sum(layer.preconditioner.factor_numel() for layer in manager.layers.values())
    out[f"{p}/factor_memory_mb"] = numel * 4 / 2**20
    for name, layer in manager.layers.items():
        spectrum = layer.preconditioner.spectrum()
        if spectrum is not None and spectrum.numel() and float(spectrum.min()) > 0:
            out[f"{p}/condition/{name}"] = float(spectrum.max() / spectrum.min())
    return out


MAX_SPECTRUM = 1 << 18  # values per histogram


def spectra(manager: PreconditionerManager) -> dict[str, torch.Tensor]:
    """log10 of the positive eigenvalues of each layer's curvature, where the method has them at hand (for
    histograms: the spectra span decades, which a linear axis shows as one spike)."""
    out = {}
    for name, layer in manager.layers.items():
        spectrum = layer.preconditioner.spectrum()
        if spectrum is not None and spectrum.numel():
            flat = spectrum.detach().reshape(-1).float()
            flat = flat[flat > 0]
            if not flat.numel():
                continue
            if flat.numel() > MAX_SPECTRUM:  # a Kronecker spectrum of two wide sides: an even thinning is enough
                flat = flat[:: -(-flat.numel() // MAX_SPECTRUM)]
            out[f"{PREFIX}/log10_spectrum/{name}"] = flat.log10().cpu()
    return out
