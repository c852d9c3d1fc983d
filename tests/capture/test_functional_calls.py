"""A layer whose own module never runs, its weight and bias passed to ``F.linear`` by its parent (torchvision's
Swin: ``shifted_window_attention(x, self.qkv.weight, self.proj.weight, qkv_bias=..., proj_bias=...)``). The
census finds the calls and captures them from the next statistics step; every method then gives the gradients of
the same model calling its modules. A call with another bias (Swin-V2 zeroes a block of a copy of it) or none
leaves the layer plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager

C, V = 6, 5


class Attention(nn.Module):
    """Two layers used through their parameters in one forward (``bias``: what the qkv call gets)."""

    def __init__(self, functional: bool, bias: str = "own") -> None:
        super().__init__()
        self.functional, self.bias = functional, bias
        self.qkv, self.proj, self.head = nn.Linear(C, 3 * C), nn.Linear(C, C), nn.Linear(C, V)

    def forward(self, x: Tensor) -> Tensor:
        if not self.functional:
            q, k, v = self.qkv(x).chunk(3, -1)
        else:
            bias = {"own": self.qkv.bias, "copy": self.qkv.bias.clone(), "none": None}[self.bias]
            q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, -1)
        y = F.scaled_dot_product_attention(q, k, v)
        y = F.linear(y, self.proj.weight, self.proj.bias) if self.functional else self.proj(y)
        return self.head(torch.tanh(y))


def _batch(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, C, generator=gen), torch.randint(0, V, (4, 3), generator=gen)


def _step(model: nn.Module, manager: PreconditionerManager | None, seed: int) -> dict[str, Tensor]:
    """One step on batch ``seed``: the (preconditioned, unless ``manager`` is None) gradients."""
    x, y = _batch(seed)
    model.zero_grad()
    if manager is not None:
        manager.begin_step(batch_size=4)
    F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).backward()
    if manager is not None:
        manager.step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton"])
def test_linear_calls_with_the_layers_own_bias_are_captured(method: str) -> None:
    """The census step finds the calls; from the next statistics step on they are the layers' statistics, so that
    step's preconditioned gradients equal those of the model calling its modules, same weights, same batch (the
    layers' first statistics either way; no KL clip, which couples the layers)."""
    torch.manual_seed(0)
    calls = Attention(functional=True)
    modules = Attention(functional=False)
    modules.load_state_dict(calls.state_dict())
    manager = PreconditionerManager(calls, method, preconditioner_interval=1, kl_clip=None, warn=lambda m: None)
    _step(calls, manager, seed=0)  # the census step (the weights do not move: no optimizer)
    got = _step(calls, manager, seed=1)
    reference = PreconditionerManager(modules, method, preconditioner_interval=1, kl_clip=None, warn=lambda m: None)
    ref = _step(modules, reference, seed=1)
    assert set(manager.layers) == {"qkv", "proj", "head"} and not manager.skipped
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
        assert not torch.equal(got[name], _step(calls, None, seed=1)[name]), name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("bias", ["copy", "none"])
def test_a_call_with_another_bias_leaves_the_layer_plain(bias: str) -> None:
    torch.manual_seed(0)
    model = Attention(functional=True, bias=bias)
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=1, warn=lambda m: None)
    for seed in range(3):
        _step(model, manager, seed)
    assert set(manager.layers) == {"proj", "head"}
    assert "outside its modules" in manager.skipped["qkv.weight"]


class First(nn.Module):
    """A layer called as ``F.linear`` on the model's input (no grad): frozen, its call's output has none either."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(C, C), nn.Linear(C, V)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(F.linear(x, self.proj.weight, self.proj.bias)))


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_a_call_of_a_layer_frozen_at_the_census_is_found_once_it_is_unfrozen(method: str) -> None:
    """The census ran once, while the layer was frozen, and never saw its call: unfrozen, it kept its plain gradient
    for good (reported as never having run). The census runs again once a frozen layer becomes trainable."""
    torch.manual_seed(0)
    model = First()
    model.proj.requires_grad_(False)
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    for seed in range(2):
        _step(model, manager, seed)
    model.proj.requires_grad_(True)
    for seed in range(2, 5):
        got = _step(model, manager, seed)
    assert not torch.equal(got["proj.weight"], _step(model, None, 4)["proj.weight"])
    assert set(manager.layers) == {"proj", "head"}
    assert all(why.startswith("frozen") for why in manager.skipped.values())  # the set-up listing
