"""A supported layer type whose subclass overrides ``forward`` (transformers' position embeddings that compute the
positions from a mask, scaled word embeddings, timm-style "same"-padding convolutions): the module call's input and
output are not the layer's own, so capture takes the functional call made inside (``F.embedding``, ``F.linear``,
``F.conv*d`` on the module's weight with its settings). Each is checked here against the same model written with
the plain layer and the extra computation outside it, which must give the same preconditioned gradients. A
subclass that uses its weight another way inside (Whisper's positions sliced from the weight, a standardised
weight, other settings, a functional bound by name) is left plain with the reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager

V, T, C, B = 11, 5, 6, 4
METHODS = ["kfac", "shampoo", "gauss_newton", "psgd"]


class MaskPositions(nn.Embedding):
    """OPT's form: called on the attention mask, the positions computed inside."""

    def forward(self, mask: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(torch.cumsum(mask, 1) * mask + 1)


class Scaled(nn.Embedding):
    """BART's and Gemma's form: the looked-up rows times a scale."""

    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(tokens) * 4.0


class SamePad(nn.Conv1d):
    """timm's ``Conv2dSame`` form: padding added inside, outside the module's own ``padding``."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(F.pad(x, (1, 1)))


class Casted(nn.Linear):
    """modded-nanoGPT's ``CastedLinear`` form: ``F.linear`` written out, the output clamped."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return F.linear(x, self.weight.type_as(x), self.bias).clamp(-3, 3)


class Net(nn.Module):
    """Overridden layers (``plain=False``) or plain layers with the same computation around them (``plain=True``);
    the word embedding tied to the head (Gemma)."""

    def __init__(self, plain: bool) -> None:
        super().__init__()
        self.plain = plain
        self.tok = nn.Embedding(V, C) if plain else Scaled(V, C)
        self.pos = nn.Embedding(T + 2, C) if plain else MaskPositions(T + 2, C)
        self.conv = nn.Conv1d(C, C, 3) if plain else SamePad(C, C, 3)
        self.mix = nn.Linear(C, C) if plain else Casted(C, C)
        self.head = nn.Linear(C, V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, tokens: Tensor) -> Tensor:
        mask = torch.ones_like(tokens)
        if self.plain:
            x = self.tok(tokens) * 4.0 + self.pos(torch.cumsum(mask, 1) * mask + 1)
            x = self.conv(F.pad(x.mT, (1, 1))).mT
            return self.head(torch.tanh(self.mix(torch.tanh(x)).clamp(-3, 3)))
        x = self.tok(tokens) + self.pos(mask)
        return self.head(torch.tanh(self.mix(torch.tanh(self.conv(x.mT).mT))))


def _train(model: nn.Module, method: str, steps: int = 3) -> tuple[PreconditionerManager, dict[str, Tensor]]:
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, V, (B, T), generator=gen)
        opt.zero_grad()
        manager.begin_step(batch_size=B)
        F.cross_entropy(model(tokens).reshape(-1, V), tokens.reshape(-1)).backward()
        manager.step(opt)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return manager, grads


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("method", METHODS)
def test_overridden_forwards_are_captured_at_their_own_call(method: str) -> None:
    torch.manual_seed(0)
    plain = Net(plain=True)
    torch.manual_seed(0)
    overridden = Net(plain=False)
    if method == "gauss_newton":  # a weight tied in two orientations is plain under Gauss-Newton: untie
        for net in (plain, overridden):
            net.head.weight = nn.Parameter(net.tok.weight.detach().clone())
    ref_manager, ref = _train(plain, method)
    manager, got = _train(overridden, method)
    assert set(manager.layers) == set(ref_manager.layers) >= {"pos", "conv", "mix"}
    assert not any("overrides" in why for why in manager.skipped.values())
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)


class SlicedPositions(nn.Embedding):
    """Whisper's form: rows sliced from the weight, no ``F.embedding`` call."""

    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]
        return self.weight[: tokens.shape[1]].expand(tokens.shape[0], -1, -1)


class Standardised(nn.Conv1d):
    """timm's ``StdConv`` form: the call's weight is computed from the parameter."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        w = self.weight - self.weight.mean(dim=(1, 2), keepdim=True)
        return F.conv1d(x, w, self.bias, self.stride, self.padding)


class OtherPadding(nn.Conv1d):
    """The call's settings differ from the module's (padding 1 against the module's 0)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return F.conv1d(x, self.weight, self.bias, padding=1)


_bound_embedding = F.embedding  # bound by name before the model was built: capture's replacement is not it


class BoundByName(nn.Embedding):
    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]
        return _bound_embedding(tokens, self.weight) * 2.0


class Awkward(nn.Module):
    def __init__(self, emb: Callable[[], nn.Embedding], conv: Callable[[], nn.Conv1d]) -> None:
        super().__init__()
        self.emb, self.conv, self.head = emb(), conv(), nn.Linear(C, V)

    def forward(self, tokens: Tensor) -> Tensor:
        x = torch.tanh(self.conv(self.emb(tokens).mT))
        return self.head(x.mT)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    ("emb", "conv", "reasons"),
    [
        (lambda: SlicedPositions(T, C), lambda: Standardised(C, C, 1), ("__getitem__", "mean")),
        (lambda: BoundByName(V, C), lambda: OtherPadding(C, C, 3), ("bound before", "conv1d")),
    ],
    ids=["sliced-standardised", "bound-otherpadding"],
)
@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_other_uses_inside_an_override_stay_plain(method: str, emb: Any, conv: Any, reasons: tuple[str, str]) -> None:
    torch.manual_seed(0)
    model = Awkward(emb, conv)
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, min(T, V), (B, T))
    for _ in range(3):
        opt.zero_grad()
        manager.begin_step(batch_size=B)
        F.cross_entropy(model(tokens).reshape(-1, V), tokens.reshape(-1)).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step(opt)
        opt.step()
    assert set(manager.layers) == {"head"}
    for name, reason in zip(("emb.weight", "conv.weight"), reasons, strict=True):
        assert "overrides" in manager.skipped[name] and reason in manager.skipped[name], manager.skipped[name]
    for n, p in model.named_parameters():  # the last step's gradients: plain except the head's
        assert torch.equal(p.grad, plain[n]) != n.startswith("head"), n
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bart_embeddings_are_preconditioned() -> None:
    """transformers' BART: its learned positions (called on token ids, positions computed inside) and its scaled word
    embedding (tied to the head) used to crash in the backward pass, then were left plain; now preconditioned."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
        scale_embedding=True,
    )  # fmt: skip
    model = transformers.BartForConditionalGeneration(config)
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randint(3, 40, (3, 7)), torch.randint(3, 40, (3, 5))
    for _ in range(2):
        opt.zero_grad()
        manager.begin_step(batch_size=3)
        model(input_ids=x, labels=y).loss.backward()
        manager.step(opt)
        opt.step()
    assert {"model.encoder.embed_positions", "model.shared"} <= set(manager.layers)
    assert not any("overrides" in why for why in manager.skipped.values())
    # the decoder's positions are ``(1, t)``: broadcast along the batch, found by the census through the own call
    assert "broadcast along the batch" in manager.skipped["model.decoder.embed_positions.weight"]
    assert all(lay.preconditioner.ready for lay in manager.layers.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
