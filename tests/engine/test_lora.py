"""LoRA fine-tuning as people write it. PEFT's form (``lora_A``, ``lora_B`` as ``nn.Linear``, ``B`` starting at zero)
is preconditioned from the second step: ``A`` sees no rows at the first refresh (its output gradient is zero behind
``B = 0``) and is refreshed again at the next statistics step instead of waiting a whole interval. litgpt's form
(bare ``lora_A``/``lora_B`` parameters used with ``@``) cannot be captured: under the methods that need rows one
warning at set-up says that nothing trainable is preconditioned (PSGD takes them from their gradient:
``tests/capture/test_parameter_layers.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager


class PeftLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A, self.lora_B = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + 2.0 * self.lora_B(self.lora_A(x))


class BareLinear(nn.Module):
    """litgpt's form: the adapters are parameters of the module, used with ``@``."""

    def __init__(self, d_in: int, d_out: int, r: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A, self.lora_B = nn.Parameter(torch.randn(r, d_in)), nn.Parameter(torch.zeros(d_out, r))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + 2.0 * (x @ self.lora_A.T @ self.lora_B.T)


def _train(model: nn.Module, method: str, steps: int, **kw: object) -> tuple[PreconditionerManager, list, list[str]]:
    messages: list[str] = []
    manager = PreconditionerManager(model, method, warn=messages.append, **kw)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    rewritten = []
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        manager.begin_step()
        F.cross_entropy(model(x), y).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        manager.step(opt)
        rewritten.append({n for n, p in model.named_parameters() if n in plain and not torch.equal(p.grad, plain[n])})
        opt.step()
    return manager, rewritten, messages


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton"])
def test_peft_lora_is_preconditioned_from_the_second_step(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(PeftLinear(6, 8), nn.Tanh(), PeftLinear(8, 3))
    manager, rewritten, messages = _train(model, method, 4, preconditioner_interval=10)
    adapters = {f"{i}.lora_{s}.weight" for i in (0, 2) for s in "AB"}
    assert rewritten[0] == {"0.lora_B.weight", "2.lora_B.weight"}  # A's output gradient is zero behind B = 0
    assert all(step == adapters for step in rewritten[1:])  # retried at step 1, not at step 10
    assert manager.counters["refreshes"] == 4  # the B layers at step 0, the A layers at step 1, nothing after
    [report] = [m for m in messages if "keep their plain gradient" in m]
    assert "lora_A" not in report and "0.base.weight: frozen" in report


def test_a_layer_the_loss_never_reaches_is_retried_once_then_reported() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x) + 0.0 * self.unused(x)  # zero output gradient, every step

    manager, _, messages = _train(Branch(), "kfac", 12)
    assert manager.counters["refreshes"] == 2  # used at steps 0 and 10; unused retried at step 1, never ready
    [report] = [m for m in messages if "keep their plain gradient" in m]
    assert "unused.weight: Linear: no preconditioner yet: every output-gradient row was exactly zero" in report


def test_nothing_trainable_preconditioned_is_said_at_set_up() -> None:
    model = nn.Sequential(BareLinear(6, 8), nn.Tanh(), BareLinear(8, 3))
    manager, rewritten, messages = _train(model, "kfac", 2)
    assert len(manager.layers) == 2 and not any(rewritten)
    [warning] = [m for m in messages if "preconditions none of the trainable parameters" in m]
    assert "its 2 layer(s) are frozen" in warning and "4 trainable parameter tensor(s)" in warning
    assert "0.lora_A: BareLinear: not in a supported module" in warning
