"""A layer whose weight is computed from other parameters (``torch.nn.utils.parametrizations.weight_norm`` and
``spectral_norm``, and their older hook-based forms: a GAN discriminator's, an audio model's convolutions) has no
rows capture can take: K-FAC, Gauss-Newton and per-example Shampoo leave it plain with that reason, every
parameter of it named. PSGD (and Shampoo with ``statistics="gradient"``) precondition each of those parameters
from its own gradient, the matrices by default, the vectors (a bias, weight_norm's magnitudes) with
``precondition_vectors``. The rest of the model is preconditioned as usual."""

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

# wrap -> (its matrices, its vectors), besides the layer's bias (a vector)
WRAPS: dict[str, tuple[Callable[[nn.Module], nn.Module], set[str], set[str]]] = {
    "weight_norm": (
        parametrizations.weight_norm,
        {"parametrizations.weight.original1"},
        {"parametrizations.weight.original0"},
    ),
    "spectral_norm": (parametrizations.spectral_norm, {"parametrizations.weight.original"}, set()),
    "hooked_weight_norm": (hooked_weight_norm, {"weight_v"}, {"weight_g"}),
    "hooked_spectral_norm": (hooked_spectral_norm, {"weight_orig"}, set()),
}
METHODS = [("kfac", {}), ("shampoo", {}), ("gauss_newton", {}), ("psgd", {}), ("psgd", {"precondition_vectors": True})]


@pytest.mark.parametrize(("method", "options"), METHODS)
@pytest.mark.parametrize("wrap", list(WRAPS))
def test_parametrized_weight_is_named_plain_or_taken_from_its_gradient(wrap: str, method: str, options: dict) -> None:
    make, matrices, vectors = WRAPS[wrap]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hooked forms are deprecated
        model = nn.Sequential(make(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 2))
    messages: list[str] = []
    manager = PreconditionerManager(model, method, options, preconditioner_interval=1, warn=messages.append)
    every = {f"0.{name}" for name in {"bias", *matrices, *vectors}}
    taken = set() if method != "psgd" else {f"0.{n}" for n in matrices | (vectors | {"bias"} if options else set())}
    assert set(manager.layers) == {"2"} | taken
    assert set(manager.skipped) == every - taken
    why = "weight is computed from other parameters" if method != "psgd" else "precondition_vectors=True"
    assert all(why in manager.skipped[name] for name in every - taken)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        manager.begin_step()
        model(torch.randn(6, 3, 4)).pow(2).mean().backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step(opt)
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, plain[name]) == (name.startswith("0.") and name not in taken), name
        opt.step()
    assert all(manager.layers[name].preconditioner.ready for name in {"2"} | taken)
    assert not any("never ran" in m or "exactly zero" in m for m in messages)
