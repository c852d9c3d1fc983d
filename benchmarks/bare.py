"""A bare K-FAC, for reference only: the products K-FAC cannot avoid and nothing else.

Forward hooks keep each Linear layer's input; a hook on its output forms the two Grams in the backward pass and
folds them into running averages (``lerp_``); a refresh inverts the damped factors by Cholesky; the step writes
``B⁻¹ [W | b] A⁻¹`` into the gradients. No padding rule, no finiteness checks, no KL clip, no π-damping, no
accumulation, mixed precision or DDP, no checkpoints. ``benchmarks/overhead.py`` times it beside the library's K-FAC
(row ``kfac-bare``): the gap between the two is what the library's safety and generality cost a step, and the gap
between this and the FLOP floor is what a Python implementation of the same products costs on the machine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class BareKFAC:
    """The manager's step interface (``begin_step``, ``step``, ``timings``, ``steps``) over a bare K-FAC."""

    def __init__(
        self, model: nn.Module, statistics_interval: int, preconditioner_interval: int, damping: float = 0.1
    ) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
        self.every, self.refresh_every, self.damping = statistics_interval, preconditioner_interval, damping
        self.decay = 0.95
        self.steps = 0
        self.timings: dict[str, float] = {}
        self._collecting = False
        self._state: dict[nn.Module, dict[str, Tensor]] = {}
        for layer in self.layers:
            d_out, d_in = layer.weight.shape
            kw: dict[str, Any] = {"dtype": layer.weight.dtype, "device": layer.weight.device}
            eye_a, eye_b = torch.eye(d_in + 1, **kw), torch.eye(d_out, **kw)
            self._state[layer] = {"a": eye_a, "b": eye_b, "a_inv": eye_a, "b_inv": eye_b}
            layer.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if not self._collecting or not output.requires_grad:
            return
        x = args[0].detach()
        state = self._state[module]

        def backward(g: Tensor) -> None:
            n = x.shape[0]
            h = torch.cat([x, x.new_ones(n, 1)], dim=1)
            state["a"].lerp_(h.mT @ h / n, 1 - self.decay)
            state["b"].lerp_(g.mT @ g * n, 1 - self.decay)  # the 1/N of a mean loss undone

        output.register_hook(backward)

    def begin_step(self, batch_size: int | None = None) -> None:
        self._collecting = self.steps % self.every == 0

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._collecting = False
        if self.steps % self.refresh_every == 0:
            for state in self._state.values():
                for side in ("a", "b"):
                    damped = state[side].clone()
                    damped.diagonal().add_(self.damping**0.5)
                    state[side + "_inv"] = torch.cholesky_inverse(torch.linalg.cholesky(damped))
        for layer in self.layers:
            state, w, b = self._state[layer], layer.weight, layer.bias
            assert w.grad is not None and b is not None and b.grad is not None
            out = state["b_inv"] @ torch.cat([w.grad, b.grad.unsqueeze(1)], dim=1) @ state["a_inv"]
            w.grad.copy_(out[:, :-1])
            b.grad.copy_(out[:, -1])
        self.steps += 1
