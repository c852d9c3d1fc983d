"""An in-place op after a layer (``ReLU(inplace=True)``, as in torchvision's Swin-V2 position-bias MLP): on inputs of
three or more dimensions a layer's output is a reshaping view of its 2-d product, and a hook on that view never
fires once the op rewrote it, so the layer got no statistics (and was reported as never having run). Every method
must give the preconditioned gradients of the same model without the in-place op."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_soo import PreconditionerManager


def _net(inplace: bool, conv: bool) -> nn.Module:
    torch.manual_seed(0)
    first = nn.Conv1d(4, 8, 3, padding=1) if conv else nn.Linear(4, 8)
    return nn.Sequential(first, nn.ReLU(inplace=inplace), nn.Linear(8, 3) if not conv else nn.Conv1d(8, 3, 1))


def _grads(model: nn.Module, method: str, x: Tensor) -> tuple[PreconditionerManager, dict[str, Tensor]]:
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        manager.begin_step(batch_size=x.shape[0])
        model(x).square().mean().backward()
        manager.step(opt)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return manager, grads


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("shape", [(6, 4), (2, 5, 4), (2, 3, 3, 4), "conv"])
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton"])
def test_in_place_op_after_a_layer_changes_nothing(method: str, shape: tuple[int, ...] | str) -> None:
    conv = shape == "conv"
    x = torch.randn(*((3, 4, 7) if conv else shape), generator=torch.Generator().manual_seed(1))  # type: ignore[misc]
    ref_manager, ref = _grads(_net(False, conv), method, x)
    manager, got = _grads(_net(True, conv), method, x)
    assert set(manager.layers) == set(ref_manager.layers) == {"0", "2"}
    assert all(lay.preconditioner.ready for lay in manager.layers.values())
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12, msg=name)
