"""A layer whose gradients are exactly zero or rounding noise (a dead branch; EfficientNet's last blocks at 32 px,
1x1 spatial, with gradients of 1e-30 to 1e-39), in float32: every method keeps finite weights, and Gauss-Newton's
relative damping, whose ``ρ = damping · λ_max`` underflowed to 3e-43 there and whose ``1/ρ`` overflowed float32 (a
crash in ``manager.step``), takes such a curvature as none: ``ρ`` is the damping itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager

EXACT = {"grafting": None, "kl_clip": None}  # the plain (E[ggᵀ] + ρI)⁻¹ g


class DeadBranch(nn.Module):
    """An input layer, a side layer whose output is scaled by ``scale`` (0: dead; 1e-21: gradients of about 1e-22,
    a curvature of 1e-44, below float32's normal range), and a head."""

    def __init__(self, scale: float, conv: bool) -> None:
        super().__init__()
        self.scale, self.conv = scale, conv
        self.inp = nn.Conv2d(3, 6, 3, padding=1) if conv else nn.Linear(12, 6)
        self.side = nn.Conv2d(6, 6, 1) if conv else nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = h + self.scale * self.side(h)
        return self.out(h.mean((2, 3)) if self.conv else h)


def _data(conv: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=g) if conv else torch.randn(8, 12, generator=g)
    return x, torch.randint(0, 3, (8,), generator=g)


def _train(model: DeadBranch, manager: PreconditionerManager, steps: int = 3) -> tuple[Tensor, Tensor]:
    """SGD steps; the side layer's weight gradient before and after the last ``manager.step``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(model.conv)
    for _ in range(steps):
        opt.zero_grad()
        manager.begin_step(batch_size=8)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        plain = model.side.weight.grad.clone()
        manager.step(opt)
        opt.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    return plain, model.side.weight.grad


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("scale", [0.0, 1e-21])
@pytest.mark.parametrize("method", ["gauss_newton", "kfac", "shampoo", "psgd"])
def test_a_dead_or_vanishing_layer_keeps_every_method_finite(method: str, scale: float, conv: bool) -> None:
    torch.manual_seed(0)
    model = DeadBranch(scale, conv)
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    _, written = _train(model, manager)
    assert torch.isfinite(written).all()
    if scale == 0.0:
        assert torch.equal(written, torch.zeros_like(written))  # a zero gradient stays zero
    assert manager.counters["nonfinite_updates"] == 0


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_gauss_newton_takes_a_curvature_below_float32_as_none(conv: bool) -> None:
    """The side layer's ``λ_max`` (about 1e-44) is below ``tiny / eps`` of float32: ``ρ`` is the damping, and the
    preconditioned gradient ``(E[ggᵀ] + ρI)⁻¹ g`` is ``g / ρ`` to float32 rounding, as for a zero curvature."""
    torch.manual_seed(0)
    model = DeadBranch(1e-21, conv)
    damping = 0.3
    manager = PreconditionerManager(model, "gauss_newton", damping=damping, warn=lambda m: None, **EXACT)
    plain, written = _train(model, manager, steps=2)
    pre = manager.layers["side"].preconditioner
    assert pre.damping == damping and pre.ready
    assert 0 < plain.abs().max() < 1e-20
    torch.testing.assert_close(written, plain / damping, rtol=1e-5, atol=0)
    assert manager.layers["inp"].preconditioner.damping < damping  # a resolved curvature: relative, as before


def test_gauss_newton_never_takes_a_damping_below_what_float32_resolves() -> None:
    """An absolute damping of 1e-40 (a subnormal float32, whose inverse overflows) is raised to ``tiny / eps``."""
    torch.manual_seed(0)
    model = DeadBranch(1.0, conv=False)
    manager = PreconditionerManager(model, "gauss_newton", damping=1e-40, damping_mode="absolute", warn=lambda m: None)
    x, y = _data(conv=False)
    for _ in range(2):
        model.zero_grad()
        manager.begin_step(batch_size=8)
        F.cross_entropy(model(x), y).backward()
        manager.step()
    info = torch.finfo(torch.float32)
    assert manager.layers["side"].preconditioner.damping == pytest.approx(info.tiny / info.eps, rel=1e-6)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
