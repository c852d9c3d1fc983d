"""Plain fp16 loops: with a real ``torch.amp.GradScaler`` passed to ``manager.step``, every method rewrites the
gradient as in the unscaled run (the captured output gradients carry the loss scale; the manager undoes it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_soo import PreconditionerManager

METHODS = ["kfac", "shampoo", "gauss_newton", "psgd"]


def _rewritten(method: str, scale: float | None, steps: int = 3) -> list[torch.Tensor]:
    """The rewritten gradients of the last of ``steps`` steps under fp16 autocast, with a GradScaler of
    ``scale`` (None: no scaler, the loss as it is)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    manager = PreconditionerManager(model, method, preconditioner_interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale is not None else None
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 10, generator=g), torch.randint(0, 4, (32,), generator=g)
        opt.zero_grad()
        manager.begin_step()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        manager.step(opt, grad_scaler=scaler)
        grads = [p.grad.clone() for p in model.parameters()]
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return grads


@pytest.mark.parametrize("method", METHODS)
def test_grad_scaler_gives_the_unscaled_update(method: str) -> None:
    plain = _rewritten(method, None)
    scaled = _rewritten(method, 2.0**16)
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


def test_without_the_scaler_kfac_would_stall() -> None:
    """What the scaler argument prevents: B inflated by scale² shrinks K-FAC's step by orders of magnitude."""
    plain = _rewritten("kfac", None, steps=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 10, generator=g), torch.randint(0, 4, (32,), generator=g)
    manager.begin_step()
    (F.cross_entropy(model(x), y) * 2.0**16).backward()
    for p in model.parameters():
        p.grad /= 2.0**16  # unscaled, as GradScaler.unscale_ does, but the manager is not told
    manager.step()
    assert model[0].weight.grad.norm() < 1e-2 * plain[0].norm()
