"""Activation checkpointing (``torch.utils.checkpoint`` either way, as Hugging Face's
``gradient_checkpointing_enable`` uses it): the recomputed forward runs the layers' hooks again, yet every method's
preconditioned gradient equals the one without checkpointing, and each layer's statistics are folded once a step.
Statistics are folded where a call's output gradient arrives, and only one of the two calls of a checkpointed layer
gets one (the original call without reentrancy, the recomputed one with it)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_soo import PreconditionerManager, linalg
from lightning_soo.engine import layer as layer_module

pytestmark = pytest.mark.usefixtures("float64")


class Net(nn.Module):
    """A sequence model whose two middle blocks (Linear, tanh, Conv1d over positions, Linear) may be checkpointed."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant  # None: no checkpointing
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(8, 12), "conv": nn.Conv1d(12, 12, 3, padding=1), "down": nn.Linear(12, 8)})
            for _ in range(2)
        )
        self.head = nn.Linear(8, 3)

    @staticmethod
    def _block(block: nn.ModuleDict, x: Tensor) -> Tensor:
        h = torch.tanh(block["up"](x))
        h = torch.tanh(block["conv"](h.mT).mT)
        return x + block["down"](h)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.inp(x))
        for block in self.blocks:
            if self.reentrant is None:
                x = self._block(block, x)
            else:
                x = checkpoint(self._block, block, x, use_reentrant=self.reentrant)
        return self.head(x)


def _gradients(reentrant: bool | None, method: str, calls: list[int]) -> list[dict[str, Tensor]]:
    """The preconditioned gradients of 3 steps (statistics and refresh every step)."""
    torch.manual_seed(0)
    model = Net(reentrant).double()
    up = model.blocks[0]["up"]
    up.register_forward_hook(lambda *_: calls.append(1))
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        x, y = torch.randn(4, 6, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (4, 6), generator=gen)
        opt.zero_grad()
        manager.begin_step()
        nn.functional.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step(opt)
        rewritten = {n: p.grad.clone() for n, p in model.named_parameters()}
        if method != "psgd" or manager.steps > 1:  # PSGD's first step initialises Q from the gradient's scale
            assert all(not torch.equal(plain[n], rewritten[n]) for n in rewritten if n.endswith("weight")), method
        out.append(rewritten)
        opt.step()
    return out


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_checkpointed_blocks_precondition_as_plain_ones(
    monkeypatch: pytest.MonkeyPatch, method: str, reentrant: bool, path: str
) -> None:
    """Equal preconditioned gradients, step by step, with and without checkpointing, on the CPU's path and the
    accelerator's; the checkpointed layer's forward did run twice a step."""
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", path == "host")
    folds = [0]
    fold = layer_module._fold_eager

    def counting(*args: object) -> None:
        folds[0] += 1
        fold(*args)

    monkeypatch.setattr(layer_module, "_fold_eager", counting)
    plain_calls: list[int] = []
    checkpointed_calls: list[int] = []
    expected = _gradients(None, method, plain_calls)
    plain_folds, folds[0] = folds[0], 0
    got = _gradients(reentrant, method, checkpointed_calls)
    assert len(checkpointed_calls) == 2 * len(plain_calls) == 6  # the recomputation ran the hooks again
    assert folds[0] == plain_folds == (0 if method == "psgd" else 3 * 8)  # yet each call's rows were folded once
    for step, (e, g) in enumerate(zip(expected, got, strict=True)):
        for name in e:
            torch.testing.assert_close(g[name], e[name], rtol=1e-10, atol=1e-13, msg=f"step {step}: {name}")
