"""``engine.factored``: on statistics steps with fewer examples than the width, ``L·G·R`` is computed as
``(L·Δᵀ)(H̄·R)`` from the captured rows, checked by random probes. Written gradients must be those of the plain
products, whenever the identity ``G = ΔᵀH̄`` holds and (through the probes) whenever something else wrote into
the gradient; the user's random stream is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager
from lightning_soo.engine import factored

MARGIN, AGREE = factored.MARGIN, factored.agree


def _run(
    monkeypatch: pytest.MonkeyPatch, plain: bool, l2: float = 0.0, micro: int = 1, method: str = "kfac", **options
) -> tuple:
    """Gradients written at the last of 4 steps, and what the probes said."""
    monkeypatch.setattr(factored, "MARGIN", 0.0 if plain else MARGIN)  # 0: never worth it, the plain products
    verdicts: list[bool] = []

    def recording(direct: torch.Tensor, through: torch.Tensor) -> bool:
        verdicts.append(AGREE(direct, through))
        return verdicts[-1]

    monkeypatch.setattr(factored, "agree", recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 24, bias=False), nn.Tanh(), nn.Linear(24, 5))
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    manager = PreconditionerManager(model, method, preconditioner_interval=2, warn=lambda m: None, **options)
    for _ in range(4):
        model.zero_grad()
        manager.begin_step()
        for _ in range(micro):
            x = torch.randn(6, 40, dtype=torch.float64, generator=gen)
            y = torch.randint(0, 5, (6,), generator=gen)
            (nn.functional.cross_entropy(model(x), y) / micro).backward()
        for p in model.parameters():  # weight decay added to the gradient by hand (an on_after_backward hook)
            p.grad.add_(p.detach(), alpha=l2)
        manager.step()
    return [p.grad.clone() for p in model.parameters()], verdicts


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
@pytest.mark.parametrize("options", [{}, {"kl_clip": 1e-3, "grafting": "sgd", "max_update_norm": 0.05}])
def test_factored_products_write_the_plain_gradients(
    method: str, options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, none = _run(monkeypatch, plain=True, method=method, **options)
    written, verdicts = _run(monkeypatch, plain=False, method=method, **options)
    assert not none and verdicts and all(verdicts)  # the factored path ran, and the identity held
    for a, b in zip(written, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decay", [1e-3, 1e-9])
def test_a_gradient_the_rows_do_not_make(decay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weight decay added into ``p.grad`` by hand is what the rows miss: the probes see it and the plain products
    run; a residual far below ``TOLERANCE`` of the preconditioned gradient may pass, and changes the update by
    about that much at most. (An L2 term in the loss is caught before: the census leaves a weight used outside
    its module plain.)"""
    reference, _ = _run(monkeypatch, plain=True, l2=decay)
    written, verdicts = _run(monkeypatch, plain=False, l2=decay)
    assert verdicts and not any(verdicts) if decay > 1e-6 else all(verdicts)
    for a, b in zip(written, reference, strict=True):
        assert torch.linalg.vector_norm(a - b) <= (1e-10 if decay > 1e-6 else factored.TOLERANCE) * b.norm()


def test_gradient_accumulation_keeps_no_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    _, verdicts = _run(monkeypatch, plain=False, micro=2)
    assert verdicts == []  # a second call of each layer in the step: nothing kept, nothing probed


def test_the_probes_leave_the_users_random_stream_alone() -> None:
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 5))
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=1)
    x, y = torch.randn(6, 40), torch.randint(0, 5, (6,))
    for _ in range(2):
        manager.begin_step()
        nn.functional.cross_entropy(model(x), y).backward()
        state = torch.random.get_rng_state()
        manager.step()
        assert torch.equal(torch.random.get_rng_state(), state)
        model.zero_grad()


def test_worth_it_only_below_about_two_thirds_of_the_width() -> None:
    assert factored.worth(256, 512, 785) and not factored.worth(256, 128, 129)
    assert not factored.worth(2048, 512, 785) and factored.worth(8, 30, 40)


class _Tied(nn.Module):
    """A head tied to the embedding, the head registered first (so the layer is the head's orientation and the
    embedding's use is the transposed one): the head's gradient is its own rows' ``ΔᵀH̄`` plus the embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(30, 40, bias=False)
        self.wte = nn.Embedding(40, 30)
        self.wte.weight = self.head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.wte(idx)))


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_a_tied_weights_other_use_keeps_the_plain_products(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedding's use writes into the tied head's gradient too, so ``G = ΔᵀH̄`` of the head's rows fails: the
    factored form is not even tried (no probe), and the update is the plain products'."""
    written = {}
    for plain in (True, False):
        monkeypatch.setattr(factored, "MARGIN", 0.0 if plain else MARGIN)
        probed: list[bool] = []

        def recording(a: torch.Tensor, b: torch.Tensor, probed: list[bool] = probed) -> bool:
            probed.append(AGREE(a, b))
            return probed[-1]

        monkeypatch.setattr(factored, "agree", recording)
        torch.manual_seed(0)
        model = _Tied().double()
        gen = torch.Generator().manual_seed(1)
        manager = PreconditionerManager(model, method, preconditioner_interval=2, warn=lambda m: None)
        for _ in range(4):
            model.zero_grad()
            manager.begin_step()
            idx = torch.randint(0, 40, (6,), generator=gen)
            nn.functional.cross_entropy(model(idx), torch.randint(0, 40, (6,), generator=gen)).backward()
            manager.step()
        assert [u.role for u in manager.layers["head"].uses] == ["normal", "transposed"]
        written[plain] = [p.grad.clone() for p in model.parameters()]
        assert probed == []
    for a, b in zip(written[False], written[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
