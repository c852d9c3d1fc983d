"""A supported layer type whose subclass overrides ``forward`` (transformers' position embeddings that compute the
positions from a mask, scaled word embeddings, timm-style "same"-padding convolutions): the call capture sees is not
the layer's own computation, so it is left plain with that reason, where it used to crash in the backward pass
(BART, Whisper, LED) or get silently wrong statistics (OPT's positions, Gemma's and BART's scaled embeddings)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager


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


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = Scaled(11, 6), MaskPositions(12, 6)
        self.conv, self.head = SamePad(6, 6, 3), nn.Linear(6, 11)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens) + self.pos(torch.ones_like(tokens))
        return self.head(torch.tanh(self.conv(x.mT).mT))


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton"])
def test_overridden_forwards_stay_plain_with_the_reason(method: str) -> None:
    torch.manual_seed(0)
    model = Net()
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    assert list(manager.layers) == ["head"]
    for name, base in (("tok", "Embedding"), ("pos", "Embedding"), ("conv", "Conv1d")):
        assert f"overrides {base}.forward" in manager.skipped[f"{name}.weight"]
    tokens = torch.randint(0, 11, (4, 5))
    for _ in range(2):
        manager.begin_step(batch_size=4)
        F.cross_entropy(model(tokens).reshape(-1, 11), tokens.reshape(-1)).backward()
        manager.step()
    assert manager.layers["head"].preconditioner.ready


def test_bart_trains_with_its_own_embeddings_plain() -> None:
    """transformers' BART crashed in the first statistics step's backward pass (its decoder's position embedding is
    called on the token ids and returns rows for positions)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
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
    assert "overrides Embedding.forward" in manager.skipped["model.decoder.embed_positions.weight"]
    assert any(name.endswith("fc1") for name in manager.layers)
    assert all(torch.isfinite(p).all() for p in model.parameters())
