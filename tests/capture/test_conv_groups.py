"""Grouped convolutions under the methods that take rows (K-FAC, per-example Shampoo, Gauss-Newton), with
``max_conv_groups``: each group is a convolution of its own (``GroupConvAdapter``: its input channels, its output
channels, its block of the weight's rows and of the bias), so the layer's curvature is block-diagonal over its
groups, as the layer itself is. Checked in float64 against the same network written with one ``groups=1``
convolution per group on channel slices: every preconditioned gradient equals, step after step. A convolution of
more groups (by default, any) stays with the methods that fit from the gradient, which take the layer whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager, linalg

pytestmark = pytest.mark.usefixtures("float64")
METHODS = [("kfac", {}), ("kfac", {"inverse": "eigen"}), ("shampoo", {}), ("gauss_newton", {})]


class Grouped(nn.Module):
    """A grouped 2-d convolution (2 groups, bias), a depthwise one (6 groups, channel multiplier 2, strided), a
    grouped 1-d one along the rows (3 groups, no bias), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.b = nn.Conv2d(6, 12, 3, stride=2, groups=6)
        self.c = nn.Conv1d(12, 6, 2, groups=3, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))  # (n, 12, 2, 2)
        h = torch.tanh(self.c(h.flatten(2)))  # (n, 6, 3)
        return self.head(h.mean(2))


class Split(nn.Module):
    """``Grouped`` with one ``groups=1`` convolution per group, on its slice of the channels."""

    def __init__(self, grouped: Grouped) -> None:
        super().__init__()
        self.a = nn.ModuleList(_split(grouped.a))
        self.b = nn.ModuleList(_split(grouped.b))
        self.c = nn.ModuleList(_split(grouped.c))
        self.head = nn.Linear(6, 3)
        self.head.load_state_dict(grouped.head.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(_apply(self.a, x))
        h = torch.tanh(_apply(self.b, h))
        h = torch.tanh(_apply(self.c, h.flatten(2)))
        return self.head(h.mean(2))


def _split(conv: nn.Module) -> list[nn.Module]:
    g = conv.groups
    o, c = conv.out_channels // g, conv.in_channels // g
    kind = type(conv)
    parts = []
    for i in range(g):
        part = kind(c, o, conv.kernel_size, stride=conv.stride, padding=conv.padding, bias=conv.bias is not None)
        with torch.no_grad():
            part.weight.copy_(conv.weight[i * o : (i + 1) * o])
            if conv.bias is not None:
                part.bias.copy_(conv.bias[i * o : (i + 1) * o])
        parts.append(part)
    return parts


def _apply(parts: nn.ModuleList, x: Tensor) -> Tensor:
    c = parts[0].in_channels
    return torch.cat([p(x[:, i * c : (i + 1) * c]) for i, p in enumerate(parts)], 1)


def _grads(model: Grouped) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _split_grads(model: Split) -> dict[str, Tensor]:
    out = {}
    for name in ("a", "b", "c"):
        parts = getattr(model, name)
        out[f"{name}.weight"] = torch.cat([p.weight.grad for p in parts])
        if parts[0].bias is not None:
            out[f"{name}.bias"] = torch.cat([p.bias.grad for p in parts])
    out.update({f"head.{k}": v.grad.clone() for k, v in model.head.named_parameters()})
    return out


@pytest.mark.parametrize("device_path", [False, True], ids=["host", "device"])
@pytest.mark.parametrize(("method", "options"), METHODS)
def test_groups_are_preconditioned_as_separate_convolutions(
    method: str, options: dict, device_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the host's path and on the accelerator's (flags on the device, a convolution's equal groups closed as one
    bank, as on a GPU)."""
    if device_path:
        monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", False)
        monkeypatch.setattr(linalg, "BATCH_ON_CPU", True)
    torch.manual_seed(0)
    grouped = Grouped()
    split = Split(grouped)
    kw = {"preconditioner_interval": 1, "warn": lambda m: None}
    manager = PreconditionerManager(grouped, method, options, max_conv_groups=6, **kw)
    reference = PreconditionerManager(split, method, options, **kw)
    assert not manager.skipped and len(manager.layers) == len(reference.layers) == 2 + 6 + 3 + 1
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randn(5, 4, 5, 5, generator=gen), torch.randint(0, 3, (5,), generator=gen)
        for model, man in ((grouped, manager), (split, reference)):
            model.zero_grad()
            man.begin_step(batch_size=5)
            F.cross_entropy(model(x), y).backward()
        raw = _grads(grouped)
        torch.testing.assert_close(raw, _split_grads(split), rtol=1e-12, atol=1e-15)  # the same network
        manager.step()
        reference.step()
        got, want = _grads(grouped), _split_grads(split)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13, msg=f"step {step}")
        assert not torch.allclose(got["b.weight"], raw["b.weight"]), step  # preconditioned
        for model in (grouped, split):
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.1 * p.grad)


def test_more_groups_than_asked_for_stay_with_the_gradient_methods() -> None:
    """By default, and past ``max_conv_groups``: plain under the methods taking rows (the reason names the option),
    whole under PSGD; the option is checked at construction."""
    model = nn.Sequential(nn.Conv1d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8, 2))
    for limit in (0, 7):
        kfac = PreconditionerManager(model, "kfac", warn=lambda m: None, max_conv_groups=limit)
        assert set(kfac.layers) == {"2"}
        assert "groups=8" in kfac.skipped["0.weight"] and "max_conv_groups >= 8" in kfac.skipped["0.weight"]
    assert len(PreconditionerManager(model, "kfac", max_conv_groups=8).layers) == 9
    assert set(PreconditionerManager(model, "psgd", warn=lambda m: None, max_conv_groups=8).layers) == {"0", "2"}
    with pytest.raises(ValueError, match="max_conv_groups"):
        PreconditionerManager(model, "kfac", max_conv_groups=-1)


def test_checkpoint_of_the_groups_resumes_the_same_run() -> None:
    """The groups' factors are saved per group (plain tensors, ``weights_only``) and a fresh manager continues
    exactly where the first one was."""
    import io

    torch.manual_seed(0)
    model = Grouped()
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=2, max_conv_groups=6, warn=lambda m: None)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 4, 5, 5, generator=gen), torch.randint(0, 3, (5,), generator=gen)) for _ in range(4)]

    def step(m: nn.Module, man: PreconditionerManager, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        m.zero_grad()
        man.begin_step(batch_size=5)
        F.cross_entropy(m(batch[0]), batch[1]).backward()
        man.step()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    for batch in batches[:3]:
        step(model, manager, batch)
    buffer = io.BytesIO()
    torch.save(manager.state_dict(), buffer)
    buffer.seek(0)
    twin = Grouped()
    twin.load_state_dict(model.state_dict())
    other = PreconditionerManager(twin, "kfac", preconditioner_interval=2, max_conv_groups=6, warn=lambda m: None)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(step(twin, other, batches[3]), step(model, manager, batches[3]), rtol=1e-12, atol=0)
