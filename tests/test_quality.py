"""The curvature-quality estimator: exact on a quadratic, ranks preconditioners, and leaves no trace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager
from lightning_soo.preconditioners.base import Preconditioner
from lightning_soo.quality import measure_quality


class DenseP(Preconditioner):
    """A fixed dense preconditioner on vec(G) (row-major), for tests."""

    uses_hooks = False

    def set(self, p: Tensor) -> None:
        self.p, self.ready = p, True

    def refresh(self, damping: float) -> bool | None:
        return None

    def precondition(self, grad: Tensor) -> Tensor:
        return (self.p @ grad.reshape(-1)).reshape(grad.shape)

    def curvature_matvec(self, v: Tensor) -> Tensor:
        return torch.linalg.solve(self.p, v.reshape(-1)).reshape(v.shape)


def _quadratic(seed: int = 0) -> tuple[nn.Linear, Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(3, 2, bias=False).double()
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    h = (q * torch.tensor([0.05, 0.2, 1.0, 3.0, 10.0, 40.0], dtype=torch.float64)) @ q.T
    return lin, h


def _criterion(lin: nn.Linear, h: Tensor, p: Tensor, probes: int = 3000) -> tuple[float, float]:
    manager = PreconditionerManager(lin, DenseP)
    manager.layers[""].preconditioner.set(p)

    def loss_fn() -> Tensor:
        w = lin.weight.reshape(-1)
        return 0.5 * w @ h @ w

    report = measure_quality(manager, loss_fn, num_probes=probes, generator=torch.Generator().manual_seed(1))
    exact = float(torch.trace(p @ h @ h) + torch.trace(torch.linalg.inv(p)))
    return report.model.criterion, exact


def test_criterion_matches_exact_value_on_quadratic() -> None:
    lin, h = _quadratic()
    for p in (torch.eye(6, dtype=h.dtype), torch.diag(1 / h.diagonal()), torch.linalg.inv(h)):
        estimate, exact = _criterion(lin, h, p)
        assert estimate == pytest.approx(exact, rel=0.05)


def test_criterion_ranks_identity_diagonal_exact() -> None:
    lin, h = _quadratic()
    c_identity, _ = _criterion(lin, h, torch.eye(6, dtype=h.dtype), 500)
    c_diag, _ = _criterion(lin, h, torch.diag(1 / h.diagonal()), 500)
    c_exact, exact_min = _criterion(lin, h, torch.linalg.inv(h), 500)
    assert c_identity > c_diag > c_exact
    assert exact_min == pytest.approx(2 * float(h.trace()))


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _trained(steps: int = 8) -> tuple[nn.Module, PreconditionerManager, Tensor, Tensor]:
    torch.manual_seed(0)
    model = _BNNet()
    manager = PreconditionerManager(model, damping=1e-2, preconditioner_interval=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    for _ in range(steps):
        opt.zero_grad()
        manager.begin_step()
        F.cross_entropy(model(x), y).backward()
        manager.step(opt)
        opt.step()
    return model, manager, x, y


def test_diagnostic_leaves_no_trace() -> None:
    model, manager, x, y = _trained()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    factors = {
        n: (layer.preconditioner.a.clone(), layer.preconditioner.b.clone()) for n, layer in manager.layers.items()
    }
    rng = torch.get_rng_state()
    report = measure_quality(manager, lambda: F.cross_entropy(model(x), y), num_probes=3, model=model)
    assert report.seconds > 0 and set(report.layers) == set(manager.layers)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k])
    assert torch.equal(torch.get_rng_state(), rng)
    for n, layer in manager.layers.items():
        assert torch.equal(layer.preconditioner.a, factors[n][0]) and torch.equal(layer.preconditioner.b, factors[n][1])
        assert not layer.preconditioner._a.pending and not layer.preconditioner._b.pending


def test_kfac_beats_identity() -> None:
    """Measured (32 probes): damping 1e-2 gives model index 0.84 (layers 0.76, 0.91) after 5 steps; at damping 1e-3
    the layers are still below 1 (0.89, 1.11 -> 0.85, 0.59 after 50 steps) but the model index is 1.07-1.11, the
    two layers wanting different scales."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    manager = PreconditionerManager(model, damping=1e-2, preconditioner_interval=1, kl_clip=1e-2)
    x = torch.randn(256, 10) * torch.linspace(0.1, 3.0, 10)  # badly scaled inputs: curvature matters
    y = (x @ torch.randn(10, 4)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        manager.begin_step()
        F.cross_entropy(model(x), y).backward()
        manager.step(opt)
        opt.step()
    report = measure_quality(manager, lambda: F.cross_entropy(model(x), y), num_probes=32)
    assert report.model.index < 0.95
    assert all(q.index < 1.0 for q in report.layers.values())
