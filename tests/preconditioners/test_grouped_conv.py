"""Grouped and depthwise convolutions (ConvNeXt, RegNet, EfficientNet, MobileNet) and transposed ones (GAN
generators, decoders) have a gradient that is a matrix, ``(out, in/groups · kernel)`` with the bias column. Methods
that fit from the gradient (PSGD, Shampoo with ``statistics="gradient"``) precondition it exactly as they
precondition a linear layer with that gradient matrix (float64); the others take a grouped one group by group and
leave a transposed one plain, with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager

pytestmark = pytest.mark.usefixtures("float64")
METHODS = [("psgd", {}), ("shampoo", {"statistics": "gradient"})]


class Net(nn.Module):
    """A depthwise convolution (groups = channels, with bias), a grouped one (2 groups, no bias), a transposed one
    (with bias), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(6, 2, 2, stride=2)
        self.head = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.up(torch.tanh(self.grouped(torch.tanh(self.depthwise(x))))))
        return self.head(h.mean((2, 3)))


def _matrix(conv: nn.Module) -> Tensor:
    """The convolution's gradient as the matrix ``(out, in/groups · k²)`` with the bias column (a transposed one's
    weight is stored ``(in, out, k, k)``)."""
    w = conv.weight.grad
    if isinstance(conv, nn.ConvTranspose2d):
        w = w.transpose(0, 1)
    g = w.reshape(w.shape[0], -1)
    return torch.cat([g, conv.bias.grad[:, None]], 1) if conv.bias is not None else g


@pytest.mark.parametrize(("method", "options"), METHODS)
def test_grouped_convolutions_are_preconditioned_as_their_gradient_matrix(method: str, options: dict) -> None:
    """Each convolution's preconditioned gradient equals that of a linear layer of its gradient matrix's shape
    given the same gradients (same probes, same fit), step after step."""
    torch.manual_seed(0)
    model = Net()
    manager = PreconditionerManager(model, method, options, preconditioner_interval=1, warn=lambda m: None)
    twins = nn.ModuleDict({
        "depthwise": nn.Linear(9, 4), "grouped": nn.Linear(18, 6, bias=False), "up": nn.Linear(24, 2),
        "head": nn.Linear(2, 3),
    })  # fmt: skip
    reference = PreconditionerManager(twins, method, options, preconditioner_interval=1, warn=lambda m: None)
    assert set(manager.layers) == {"depthwise", "grouped", "up", "head"} and not manager.skipped
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randn(5, 4, 6, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
        model.zero_grad()
        manager.begin_step(batch_size=5)
        F.cross_entropy(model(x), y).backward()
        for name in ("depthwise", "grouped", "up"):
            m = _matrix(getattr(model, name))
            twins[name].weight.grad = m[:, : twins[name].in_features].clone()
            if twins[name].bias is not None:
                twins[name].bias.grad = m[:, -1].clone()
        twins["head"].weight.grad = model.head.weight.grad.clone()
        twins["head"].bias.grad = model.head.bias.grad.clone()
        raw = _matrix(model.depthwise).clone()
        reference.begin_step(batch_size=5)
        manager.step()
        reference.step()
        for name in ("depthwise", "grouped", "up"):
            want = twins[name].weight.grad
            if twins[name].bias is not None:
                want = torch.cat([want, twins[name].bias.grad[:, None]], 1)
            torch.testing.assert_close(_matrix(getattr(model, name)), want, rtol=1e-10, atol=1e-13, msg=f"{name}")
        assert not torch.allclose(_matrix(model.depthwise), raw), step  # preconditioned


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton"])
@pytest.mark.parametrize("max_conv_groups", [0, 4])
def test_methods_that_need_rows_take_groups_when_asked_and_leave_transposed_plain(
    method: str, max_conv_groups: int
) -> None:
    """Grouped convolutions are plain by default and taken group by group with ``max_conv_groups``
    (``tests/capture/test_conv_groups.py``); the transposed one stays plain, with the reason."""
    manager = PreconditionerManager(Net(), method, warn=lambda m: None, max_conv_groups=max_conv_groups)
    groups = {f"depthwise.group{g}" for g in range(4)} | {"grouped.group0", "grouped.group1"}
    assert set(manager.layers) == {"head"} | (groups if max_conv_groups else set())
    for name in ("depthwise.weight", "depthwise.bias", "grouped.weight"):
        assert (name in manager.skipped) == (not max_conv_groups)
        assert max_conv_groups or ("grouped convolution" in manager.skipped[name] and "PSGD" in manager.skipped[name])
    for name in ("up.weight", "up.bias"):
        assert "transposed convolution" in manager.skipped[name] and "PSGD" in manager.skipped[name]
