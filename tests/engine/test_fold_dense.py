"""``engine.layer._fold_dense``: the usual call (a linear layer's own use, every row an example, float rows of the
statistics' dtype, on the host's path) folds its statistics in few lines (``Preconditioner.observe_dense``). It must
give exactly what the general path gives, step after step, and hand back every call it cannot take (padding, a
second call in the step, autocast, a reduced weight sharing) to the general path; and it must actually be taken
where it applies, or the saving is gone without a test noticing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager, linalg
from lightning_soo.capture.rows import Observation
from lightning_soo.engine import layer as layer_module
from lightning_soo.preconditioners.kfac import KFAC
from lightning_soo.preconditioners.shampoo import Shampoo

METHODS = {"kfac": (KFAC, ("a", "b")), "shampoo": (Shampoo, ("l", "r"))}


class _Seq(nn.Module):
    """Linear layers on ``(batch, positions, features)`` inputs: positions are further rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class _GPT2Style(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2's linear layers, the weight stored ``(in, out)``) on sequences."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.a, self.b = Conv1D(8, 6), Conv1D(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _mlp() -> nn.Module:
    """Two equal layers among them: on the accelerator's path with stacks on, they close as one bank."""
    layers: list[nn.Module] = [nn.Linear(6, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 8), nn.Linear(8, 8)]
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())], nn.Linear(8, 3))


Batch = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _flat(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(10, 6, dtype=torch.float64, generator=gen), torch.randint(0, 3, (10,), generator=gen)


def _padded(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every other step, two examples the loss ignores: their output-gradient rows are zero (the padding rule)."""
    x, y = _flat(gen)
    if torch.rand((), generator=gen) < 0.5:
        y[:2] = -100
    return x, y


def _sequence(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 5, 6, dtype=torch.float64, generator=gen), torch.randint(0, 3, (4, 5), generator=gen)


def _run(
    monkeypatch: pytest.MonkeyPatch,
    fast: bool,
    make: Callable[[], nn.Module],
    batch: Batch,
    micro: int = 1,
    method: str = "kfac",
    path: str = "host",
    **kw: object,
) -> tuple[list[torch.Tensor], int]:
    """The method's two factors of every layer after 5 steps, and how many calls ``observe_dense`` took; ``path``:
    the CPU's (the host decides), the accelerator's (on the CPU), or the accelerator's with equal layers banked."""
    cls, names = METHODS[method]
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", path == "host")
    monkeypatch.setattr(linalg, "BATCH_ON_CPU", path == "banked")
    if not fast:
        monkeypatch.setattr(layer_module, "_fast", lambda *args: False)
    taken = [0]
    dense = cls.observe_dense

    def counting(self: KFAC | Shampoo, obs: Observation) -> None:
        taken[0] += 1
        dense(self, obs)  # type: ignore[arg-type]

    monkeypatch.setattr(cls, "observe_dense", counting)
    torch.manual_seed(0)
    model = make().double()
    manager = PreconditionerManager(model, method, preconditioner_interval=2, warn=lambda m: None, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        opt.zero_grad()
        manager.begin_step()
        for _ in range(micro):
            x, y = batch(gen)
            out = model(x)
            loss = nn.functional.cross_entropy(out.reshape(-1, 3), y.reshape(-1), ignore_index=-100) / micro
            loss.backward()
        manager.step(opt, accumulation=micro)
        opt.step()
    factors = [getattr(layer.preconditioner, name) for layer in manager.layers.values() for name in names]
    if path == "banked" and make is _mlp:  # the equal layers' factors were closed as a bank
        assert any(f.bank is not None for layer in manager.layers.values() for f in _factors(layer.preconditioner))
    return [f.clone() for f in factors], taken[0]


def _factors(pre: KFAC | Shampoo) -> list:
    return [pre._a, pre._b] if isinstance(pre, KFAC) else [*pre.left.factors, *pre.right.factors]


@pytest.mark.parametrize("path", ["host", "device", "banked"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    ("make", "batch", "micro", "share"),
    [
        (_mlp, _flat, 1, 1.0),  # every call: the usual step
        (_mlp, _padded, 1, None),  # padding: K-FAC's masked rows on the host go the general way
        (_Seq, _sequence, 1, 1.0),  # positions as rows
        (_GPT2Style, _sequence, 1, 1.0),  # GPT-2's Conv1D layers
        (_mlp, _flat, 2, 0.5),  # accumulation: a layer's second call in the step goes the general way
    ],
)
def test_dense_fold_equals_the_general_path(
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    method: str,
    make: Callable[[], nn.Module],
    batch: Batch,
    micro: int,
    share: float | None,
) -> None:
    """Equal factors with and without the usual call's path, which is taken where it applies: on the host every call
    of a step without padding (K-FAC; Shampoo's rows need no mask, it takes those too), on the accelerator's path
    every first call (the count is reduced at the close)."""
    fast, taken = _run(monkeypatch, True, make, batch, micro, method, path)
    with monkeypatch.context() as m:
        general, none = _run(m, False, make, batch, micro, method, path)
    assert none == 0
    for a, b in zip(fast, general, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    calls = 5 * micro * len(fast) // 2
    if share is None and method == "kfac" and path == "host":
        assert 0 < taken < calls  # the padded steps went the general way, the others not
    else:
        assert taken == (share or 1.0) * calls


def test_dense_fold_hands_back_what_it_cannot_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast and with ``weight_sharing="reduce"`` on sequences the general path takes every call (and
    gives what it gave before: the factors equal the run without the fast path); so does Shampoo with its
    statistics from the gradient, or with a side in blocks."""
    for method, options in (("shampoo", {"statistics": "gradient"}), ("shampoo", {"max_factor_dim": 4})):
        _, taken = _run(monkeypatch, True, _mlp, _flat, 1, method, "host", **options)
        assert taken == 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=True):
        _, taken = _run(monkeypatch, True, _mlp, _flat)
    assert taken == 0
    fast, taken = _run(monkeypatch, True, _Seq, _sequence, weight_sharing="reduce")
    assert taken == 0
    with monkeypatch.context() as m:
        general, _ = _run(m, False, _Seq, _sequence, weight_sharing="reduce")
    for a, b in zip(fast, general, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
