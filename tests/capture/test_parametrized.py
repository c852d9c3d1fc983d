"""A layer whose weight is computed from other parameters (``torch.nn.utils.parametrizations.weight_norm`` and
``spectral_norm``, and their older hook-based forms) is left plain with that reason, every parameter of it named;
the rest of the model is preconditioned as usual."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as hooked_spectral_norm
from torch.nn.utils import weight_norm as hooked_weight_norm

from lightning_soo import PreconditionerManager

WRAPS: dict[str, tuple[Callable[[nn.Module], nn.Module], set[str]]] = {
    "weight_norm": (
        parametrizations.weight_norm,
        {"parametrizations.weight.original0", "parametrizations.weight.original1"},
    ),
    "spectral_norm": (parametrizations.spectral_norm, {"parametrizations.weight.original"}),
    "hooked_weight_norm": (hooked_weight_norm, {"weight_g", "weight_v"}),
    "hooked_spectral_norm": (hooked_spectral_norm, {"weight_orig"}),
}


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
@pytest.mark.parametrize("wrap", list(WRAPS))
def test_parametrized_weight_is_named_plain(wrap: str, method: str) -> None:
    make, originals = WRAPS[wrap]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hooked forms are deprecated
        model = nn.Sequential(make(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 2))
    messages: list[str] = []
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=messages.append)
    assert list(manager.layers) == ["2"]
    expected = {f"0.{name}" for name in {"bias", *originals}}
    assert set(manager.skipped) == expected
    assert all("weight is computed from other parameters" in manager.skipped[name] for name in expected)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        manager.begin_step()
        model(torch.randn(6, 3, 4)).pow(2).mean().backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step(opt)
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, plain[name]) == name.startswith("0."), name
        opt.step()
    assert manager.layers["2"].preconditioner.ready
    assert not any("never ran" in m or "exactly zero" in m for m in messages)
