"""A layer whose output is broadcast along the batch (nanoGPT's ``wpe(arange(t))`` added to every sequence, Hugging
Face GPT-2's positions of shape ``(1, t)``) has no per-example output gradients: each row's gradient is a sum over
the batch. The census of the first statistics step finds it, and the methods that build statistics from rows leave
it plain, naming the call; layers whose outputs keep the batch dimension are not touched."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager

V, T, C, B = 11, 5, 6, 4


class Positions(nn.Module):
    """Token and position embeddings, a per-sequence conditioning Linear, a head. ``positions``: how the position
    embedding is called: ``"1d"`` (nanoGPT), ``"row"`` (``(1, t)``, transformers' GPT-2) or ``"expanded"``."""

    def __init__(self, positions: str) -> None:
        super().__init__()
        self.positions = positions
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.cond = nn.Linear(C, C)  # one vector per sequence, broadcast over its positions (not the batch)
        self.head = nn.Linear(C, V)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        pos = torch.arange(t)
        pos = {"1d": pos, "row": pos[None], "expanded": pos.expand(b, t)}[self.positions]
        x = self.wte(tokens) + self.wpe(pos)
        x = x + self.cond(x.mean(1, keepdim=True))  # (b, 1, C) + (b, t, C)
        return self.head(torch.tanh(x))


def _run(positions: str, method: str) -> tuple[PreconditionerManager, list[dict[str, bool]]]:
    torch.manual_seed(0)
    model = Positions(positions).double()
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    rewritten = []
    for _ in range(3):
        tokens = torch.randint(0, V, (B, T), generator=gen)
        opt.zero_grad()
        manager.begin_step()
        F.cross_entropy(model(tokens).reshape(-1, V), tokens.reshape(-1)).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step(opt)
        rewritten.append({n: not torch.equal(p.grad, plain[n]) for n, p in model.named_parameters()})
        opt.step()
    return manager, rewritten


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("positions", ["1d", "row"])
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton"])
def test_position_embedding_broadcast_along_the_batch_stays_plain(method: str, positions: str) -> None:
    manager, rewritten = _run(positions, method)
    assert "wpe" not in manager.layers and set(manager.layers) == {"wte", "cond", "head"}
    shape = f"({T}, {C})" if positions == "1d" else f"(1, {T}, {C})"
    assert f"broadcast along the batch (add {shape} -> ({B}, {T}, {C})" in manager.skipped["wpe.weight"]
    for step in rewritten:  # never rewritten; the others from the first step on (the census step included)
        assert not step["wpe.weight"] and step["wte.weight"] and step["cond.weight"] and step["head.weight"]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_positions_with_a_batch_dimension_are_preconditioned(method: str) -> None:
    """The same embedding called on positions expanded to the batch: every layer is preconditioned."""
    manager, rewritten = _run("expanded", method)
    assert set(manager.layers) == {"wte", "wpe", "cond", "head"}
    assert all(rewritten[-1].values())


@pytest.mark.usefixtures("float64")
def test_psgd_keeps_a_broadcast_layer() -> None:
    """PSGD fits from the gradient, not from rows: a broadcast output changes nothing for it."""
    manager, rewritten = _run("1d", "psgd")
    assert "wpe" in manager.layers and all(rewritten[-1].values())


class SequenceFirst(nn.Module):
    """Positions first (``t x b x C``), with a per-sequence vector (``b x C``) broadcast over the positions: the
    broadcast dimension is time, not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.cond, self.head = nn.Embedding(V, C), nn.Linear(C, C), nn.Linear(C, V)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens.T)  # t x b x C
        x = x + self.cond(x.mean(0))  # (b, C) + (t, b, C)
        return self.head(torch.tanh(x)).transpose(0, 1)


@pytest.mark.usefixtures("float64")
def test_a_broadcast_over_time_is_kept_where_the_batch_size_is_known() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (B, T))
    manager = _census(SequenceFirst().double(), tokens, lambda out: _lm_loss(out, tokens))
    assert set(manager.layers) == {"wte", "cond", "head"} and not manager.skipped


@pytest.mark.parametrize("heads", [2, 4])
def test_t5_relative_position_biases_stay_plain(heads: int) -> None:
    """transformers' T5 adds its relative-position bias (an ``nn.Embedding`` of buckets, permuted, unsqueezed and
    masked) to every sequence's attention scores, inside ``scaled_dot_product_attention``. With as many heads as
    examples the decoder's bias ``(1, h, q, k)``, masked by ``torch.where``, used to be missed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=heads, decoder_start_token_id=0
    )
    model = transformers.T5ForConditionalGeneration(config)
    manager = PreconditionerManager(model, "kfac", warn=lambda m: None)
    x, y = torch.randint(1, 40, (4, 10)), torch.randint(1, 40, (4, 6))
    manager.begin_step(batch_size=4)
    model(input_ids=x, labels=y).loss.backward()
    manager.step()
    biases = {name for name in manager.skipped if "relative_attention_bias" in name}
    assert len(biases) == 2 and all("broadcast along the batch" in manager.skipped[name] for name in biases)
    assert not any("relative_attention_bias" in name for name in manager.layers)


class Through(nn.Module):
    """A position embedding's output passed through ``op`` before it is added to every sequence."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.wte, self.wpe, self.proj, self.head = (
            nn.Embedding(V, C),
            nn.Embedding(T, C),
            nn.Linear(C, C),
            nn.Linear(C, V),
        )
        self.norm, self.drop = nn.LayerNorm(C), nn.Dropout(0.1)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        p = self.wpe(torch.arange(t))
        p = {
            "scaled": lambda: p * 0.5,
            "dropout": lambda: self.drop(p),
            "normed": lambda: self.norm(p),
            "linear": lambda: self.proj(p),
            "tiled": lambda: p.repeat(b, 1, 1),
        }[self.op]()
        return self.head(torch.tanh(self.wte(tokens) + p))


@pytest.mark.parametrize("batch", [B, T])  # T: as many examples as positions, so the shapes alone cannot tell
@pytest.mark.parametrize("op", ["scaled", "dropout", "normed", "linear", "tiled"])
def test_the_census_follows_an_output_without_a_batch_dimension(op: str, batch: int) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (batch, T))
    manager = _census(Through(op), tokens, lambda out: _lm_loss(out, tokens))
    flagged = {name for name, why in manager.skipped.items() if "broadcast along the batch" in why}
    assert flagged == ({"wpe.weight", "proj.weight", "proj.bias"} if op == "linear" else {"wpe.weight"})
    assert set(manager.layers) == ({"wte", "head"} if op == "linear" else {"wte", "proj", "head"})


class Windows(nn.Module):
    """Swin-V2's continuous position bias: an MLP on a coordinate table, its output ``(1, heads, n, n)`` added to
    the scores of every window of every image, windows folded into the batch dimension (``b * windows``)."""

    def __init__(self, heads: int = 4, windows: int = 4, n: int = 3) -> None:
        super().__init__()
        self.heads, self.windows, self.n = heads, windows, n
        self.embed, self.head = nn.Linear(C, heads * n), nn.Linear(heads * n * n, V)
        self.cpb = nn.Sequential(nn.Linear(2, 8), nn.ReLU(inplace=True), nn.Linear(8, heads, bias=False))
        self.register_buffer("table", torch.randn(1, n, n, 2))

    def forward(self, x: Tensor) -> Tensor:  # x: (b, C)
        b, h, n = x.shape[0], self.heads, self.n
        q = self.embed(x).view(b, 1, h, n, 1).expand(b, self.windows, h, n, n).reshape(-1, h, n, n)
        bias = 16 * torch.sigmoid(self.cpb(self.table).permute(0, 3, 1, 2))  # (1, heads, n, n)
        scores = torch.tanh(q + bias).view(b, self.windows, -1).mean(1)
        return self.head(scores)


class NoBroadcast(nn.Module):
    """Dimensions that happen to equal the batch size, nothing broadcast along the batch: grouped-query attention
    expanding keys to ``n_rep`` query heads, a squeeze-excitation gate over a feature map as high as the batch,
    a per-sequence vector added over as many positions as examples."""

    def __init__(self, n_rep: int) -> None:
        super().__init__()
        self.n_rep = n_rep
        self.wte, self.k, self.q = nn.Embedding(V, C), nn.Linear(C, C), nn.Linear(C, C * n_rep)
        self.conv, self.gate, self.cond, self.head = (
            nn.Conv2d(1, 2, 1),
            nn.Conv2d(2, 2, 1),
            nn.Linear(C, C),
            nn.Linear(C, V),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        x = self.wte(tokens)  # (b, t, C)
        k = self.k(x).view(b, 1, t, C)[:, :, None].expand(b, 1, self.n_rep, t, C).reshape(b, self.n_rep, t, C)
        q = self.q(x).view(b, t, self.n_rep, C).transpose(1, 2)
        x = x + F.scaled_dot_product_attention(q, k, k).mean(1)
        feat = self.conv(x.unsqueeze(1))  # (b, 2, t, C)
        feat = feat * torch.sigmoid(self.gate(feat.mean((2, 3), keepdim=True)))  # (b, 2, 1, 1) over (t, C)
        x = x + feat.mean(1) + self.cond(x.mean(1, keepdim=True))  # (b, 1, C) over t positions
        return self.head(torch.tanh(x))


def _lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1))


def _census(model: nn.Module, x: Tensor, loss: Any) -> PreconditionerManager:
    """Two statistics steps of K-FAC (the census is the first) on ``x``."""
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=1, warn=lambda m: None)
    for _ in range(2):
        manager.begin_step(batch_size=x.shape[0])
        loss(model(x)).backward()
        manager.step()
    return manager


def test_a_bias_broadcast_over_windows_folded_into_the_batch_stays_plain() -> None:
    torch.manual_seed(0)
    manager = _census(Windows(), torch.randn(B, C), lambda out: out.square().mean())
    assert set(manager.layers) == {"embed", "head"}
    assert all("broadcast along the batch" in manager.skipped[f"cpb.{i}.weight"] for i in (0, 2))


@pytest.mark.parametrize("n_rep", [2, B])
def test_dimensions_equal_to_the_batch_size_are_not_taken_for_it(n_rep: int) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (B, B))  # as many positions as examples
    manager = _census(NoBroadcast(n_rep), tokens, lambda out: _lm_loss(out, tokens))
    assert set(manager.layers) == {"wte", "k", "q", "conv", "gate", "cond", "head"}, manager.skipped


class SharedRelative(nn.Module):
    """DeBERTa-v2's relative-position projections (``share_att_key``): the query projection applied to the relative
    embeddings ``(1, 2k, C)``, split into heads ``(h, 2k, C / h)`` and ``repeat(b, 1, 1)`` for the batch, as well
    as to every token."""

    def __init__(self, heads: int = 2, span: int = 8) -> None:
        super().__init__()
        self.heads, self.rel = heads, nn.Parameter(torch.randn(1, span, 2 * C))
        self.wte, self.query, self.head = nn.Embedding(V, 2 * C), nn.Linear(2 * C, 2 * C), nn.Linear(2 * C, V)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        x = self.wte(tokens)
        q = self.query(x).view(b, t, self.heads, -1).transpose(1, 2).reshape(b * self.heads, t, -1)
        pos = self.query(self.rel).view(1, -1, self.heads, C).transpose(1, 2).reshape(self.heads, -1, C)
        pos = pos.repeat(b, 1, 1)  # (b * heads, span, C)
        scores = torch.softmax(q @ pos.transpose(1, 2), -1).mean(-1, keepdim=True)  # (b * heads, t, 1)
        return self.head(x * scores.view(b, self.heads, t).mean(1, keepdim=True).transpose(1, 2))


@pytest.mark.parametrize("batch", [3, 4, 8])  # 4 and 8 divide the sizes of the repeated tensor (2, 8, 6 / 8)
def test_a_projection_repeated_for_the_batch_stays_plain(batch: int) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (batch, T))
    manager = _census(SharedRelative(), tokens, lambda out: _lm_loss(out, tokens))
    assert set(manager.layers) == {"wte", "head"}
    assert "broadcast along the batch (repeat" in manager.skipped["query.weight"]


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_a_census_on_a_batch_of_one_is_made_again_on_a_larger_batch(method: str) -> None:
    """A batch of one shows no broadcast along the batch (and its statistics are right): the census runs again at
    the first statistics step with more examples, which used to keep ``wpe`` managed from batch-summed rows."""
    torch.manual_seed(0)
    model = Positions("row")
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    for batch in (1, B, B):
        tokens = torch.randint(0, V, (batch, T))
        manager.begin_step(batch_size=batch)
        F.cross_entropy(model(tokens).reshape(-1, V), tokens.reshape(-1)).backward()
        manager.step()
        model.zero_grad()
    assert "wpe" not in manager.layers and "broadcast along the batch" in manager.skipped["wpe.weight"]


class RepeatedTokens(nn.Module):
    """Llama-4's mixture of experts: the ``(b·t, C)`` token rows (one per example's token) ``repeat(experts, 1)``,
    one copy per expert, and a position table ``(t, C)`` ``repeat(b, 1)`` to the same rows (a broadcast)."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.experts = experts
        self.wte, self.proj, self.wpe = nn.Embedding(V, C), nn.Linear(C, C), nn.Embedding(T, C)
        self.head = nn.Linear(C, V)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        rows = self.proj(self.wte(tokens)).reshape(b * t, C)
        copies = rows.repeat(self.experts, 1).view(self.experts, b * t, C).mean(0)
        positions = self.wpe(torch.arange(t)).repeat(b, 1)
        return self.head(torch.tanh(copies + positions)).view(b, t, V)


@pytest.mark.parametrize("experts", [3, 4, 8])  # 4 and 8: multiples of the batch size
def test_rows_of_the_batch_repeated_are_no_broadcast(experts: int) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (4, T))
    manager = _census(RepeatedTokens(experts), tokens, lambda out: _lm_loss(out, tokens))
    assert set(manager.layers) == {"wte", "proj", "head"}, manager.skipped
    assert "broadcast along the batch (repeat" in manager.skipped["wpe.weight"]
