"""The padding rule: padding a batch further, with a loss that ignores padding, changes no method's ``P·G``; and
what the rule does to rows whose gradient is zero for another reason."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager
from tests.reference import with_ones

pytestmark = pytest.mark.usefixtures("float64")
VOCAB, LENGTHS = 11, (3, 5, 8, 2)


class TokenModel(nn.Module):
    """Embedding, causal self-attention (nn.MultiheadAttention), a per-token MLP and a head."""

    def __init__(self, attention: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True) if attention else None
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens)
        if self.attn is not None:
            t = tokens.shape[1]
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return self.head(torch.tanh(self.fc(x)))


def _batch(length: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(len(LENGTHS), length, dtype=torch.long)
    labels = torch.full((len(LENGTHS), length), -100)
    for i, n in enumerate(LENGTHS):
        tokens[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        labels[i, :n] = torch.randint(0, VOCAB, (n,), generator=g)
    return tokens, labels


def _step(manager: PreconditionerManager, model: nn.Module, length: int) -> tuple[Tensor, dict[str, Tensor]]:
    tokens, labels = _batch(length)
    manager.begin_step()
    loss = F.cross_entropy(model(tokens).reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    manager.step()
    assert manager.layers and all(layer.preconditioner.ready for layer in manager.layers.values())
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _preconditioned(model: nn.Module, length: int, method: str, **options) -> tuple[Tensor, dict[str, Tensor]]:
    return _step(PreconditionerManager(model, method, kl_clip=None, warn=lambda m: None, **options), model, length)


METHODS = [
    ("kfac", {"inverse": "cholesky", "factor_decay": 0.0}),
    ("kfac", {"inverse": "eigen", "factor_decay": 0.0}),
    ("kfac", {"inverse": "cholesky", "factor_decay": 0.0, "weight_sharing": "reduce"}),
    ("kfac", {"inverse": "eigen", "factor_decay": 0.0, "weight_sharing": "reduce"}),
    ("shampoo", {"statistics": "per_example"}),
    ("gauss_newton", {}),
]


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize(("method", "options"), METHODS)
def test_padding_to_8_or_24_gives_the_same_update(method: str, options: dict, attention: bool) -> None:
    torch.manual_seed(0)
    model = TokenModel(attention)
    short, long = copy.deepcopy(model), copy.deepcopy(model)
    loss8, g8 = _preconditioned(short, 8, method, **options)
    loss24, g24 = _preconditioned(long, 24, method, **options)
    torch.testing.assert_close(loss8, loss24)
    for name in g8:
        error = float((g8[name] - g24[name]).norm() / g8[name].norm())
        assert error < 1e-5, (name, error)


def test_legitimately_zero_rows_leave_the_factors_and_the_count() -> None:
    """An example whose output gradient is exactly zero (its target already met) is not an example for K-FAC:
    A and B average over the other rows, and the 1/N undo of the mean loss counts N' = N − 1 rows."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    y = torch.randn(6, 3)
    manager = PreconditionerManager(lin, "kfac", factor_decay=0.0, kl_clip=None, warn=lambda m: None)
    manager.begin_step()
    out = lin(x)
    y[2] = out[2].detach()  # example 2: zero loss, zero gradient
    (0.5 * (out - y).square().sum(1)).mean().backward()
    manager.step()
    pre = manager.layers[""].preconditioner
    keep = torch.tensor([0, 1, 3, 4, 5])
    h = with_ones(x)[keep]
    g = (lin(x) - y).detach()[keep]  # per-example output gradients of the kept rows
    torch.testing.assert_close(pre.a, h.T @ h / 5)
    torch.testing.assert_close(pre.b, (5 / 6) ** 2 * g.T @ g / 5)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device-path"])  # the device's one-reduction form
@pytest.mark.parametrize("rows", [64, 512])  # below and above ``PEAKS_SPLIT`` entries (x 256 columns)
def test_row_peaks_of_every_form(rows: int, host: bool, monkeypatch) -> None:
    """Zero exactly for padding rows (not for a constant or negative row), NaN for a row holding NaN."""
    from lightning_soo import linalg
    from lightning_soo.capture.rows import PEAKS_SPLIT, row_peaks

    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)

    d = torch.randn(rows, 256)
    d[1], d[2], d[3] = 0.0, -2.0, 5.0
    d[4, 7] = math.nan
    d[5, 0] = -math.inf
    assert (d.numel() >= PEAKS_SPLIT) == (rows == 512)
    peaks = row_peaks(d)
    expected = d.abs().amax(1)
    torch.testing.assert_close(peaks, expected, equal_nan=True)
    assert peaks[1] == 0 and peaks[2] == 2 and peaks[3] == 5 and peaks[5] == math.inf and math.isnan(peaks[4])


@pytest.mark.parametrize("host", [True, False], ids=["host", "device-path"])
def test_unmasked_weighted_rows_equal_the_masked_ones(host: bool, monkeypatch) -> None:
    """Per-example Shampoo takes unmasked rows with the output-gradient norms (``row_norms``): a padding row has
    weight zero, and the count is the number of non-zero norms. Its factors equal those of the padding rule's
    masked rows, on both paths, with padding and attention."""
    from lightning_soo import linalg

    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
    torch.manual_seed(0)
    model = TokenModel(attention=True)
    factors = []
    for weighted in (True, False):
        copied = copy.deepcopy(model)
        manager = PreconditionerManager(copied, "shampoo", kl_clip=None, warn=lambda m: None)
        for layer in manager.layers.values():
            assert layer.preconditioner.row_norms
            layer.preconditioner.row_norms = weighted
        _step(manager, copied, 24)
        factors.append({k: (layer.preconditioner.l, layer.preconditioner.r) for k, layer in manager.layers.items()})
    assert factors[0].keys() == factors[1].keys() and len(factors[0]) >= 4
    for name, (left, right) in factors[0].items():
        torch.testing.assert_close(left, factors[1][name][0], msg=name)
        torch.testing.assert_close(right, factors[1][name][1], msg=name)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device-path"])
def test_weighted_rows_count_rows_whose_squares_underflow(host: bool, monkeypatch) -> None:
    """A real row of tiny gradients (their squares underflow in float32: a zero norm) is still an example: the
    weighted rows' count is the padding rule's, from the row peaks."""
    from lightning_soo import linalg
    from lightning_soo.capture.adapters import LinearAdapter

    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
    adapter = LinearAdapter(nn.Linear(4, 3).float())
    x, g = torch.randn(5, 4, dtype=torch.float32), torch.randn(5, 3, dtype=torch.float32)
    g[1], g[3] = 0.0, 1e-25
    weighted, masked = adapter.observe(x, g, norms=True), adapter.observe(x, g)
    assert float(weighted.norms[3]) == 0.0  # the norm underflowed
    assert float(weighted.n) == float(masked.n) == 4.0
    torch.testing.assert_close(weighted.norms.squeeze(1), g.norm(dim=1))


def test_row_counts_are_reduced_per_stack() -> None:
    """The padding rule's counts on an accelerator's path (``RowCount``) are reduced when first needed, equal layers'
    in one reduction (``count_many``); the count is of non-zero peaks (a NaN row counts, its statistics are
    rejected anyway); a count already reduced, or peaks of another length, are stacked as they are."""
    from lightning_soo.capture.rows import RowCount, count_many

    peaks = [torch.tensor([0.0, 1e-30, 2.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.0] * 4)]
    counts = [RowCount(p) for p in peaks]
    assert count_many(counts).tolist() == [2.0, 4.0, 0.0]
    assert all(c._count is None for c in counts)  # one stacked reduction, none per layer
    assert [float(c) for c in counts] == [2.0, 4.0, 0.0]
    assert count_many(counts).tolist() == [2.0, 4.0, 0.0]  # already reduced: stacked as they are
    mixed = [RowCount(torch.tensor([1.0, 0.0])), RowCount(torch.tensor([3.0, 1.0, float("nan")])), torch.tensor(5.0)]
    assert count_many(mixed).tolist() == [1.0, 3.0, 5.0]


@pytest.mark.parametrize("norms", [False, True], ids=["masked", "weighted"])
def test_host_reads_a_batch_without_padding_from_the_row_norms(norms: bool, monkeypatch) -> None:
    """On the host a batch whose rows all have a non-zero norm is taken whole (no mask, the count a number) and a
    weighting method gets those norms; one zero row sends it to the row peaks (padding, counted exactly)."""
    from lightning_soo import linalg
    from lightning_soo.capture.adapters import LinearAdapter

    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", True)
    adapter = LinearAdapter(nn.Linear(4, 3).double())
    x, g = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    obs = adapter.observe(x, g, norms=norms)
    assert obs.n == obs.rows == 6 and isinstance(obs.n, int)
    torch.testing.assert_close(obs.h, torch.cat([x, torch.ones(6, 1, dtype=x.dtype)], 1))
    if norms:
        torch.testing.assert_close(obs.norms.squeeze(1), g.norm(dim=1))
    else:
        assert obs.norms is None
    g[2] = 0.0
    padded = adapter.observe(x, g, norms=norms)
    assert float(padded.n) == 5.0
    if not norms:
        assert float(padded.h[2].abs().sum()) == 0.0  # the padding row dropped from the input statistic
