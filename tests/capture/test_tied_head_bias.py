"""A weight tied between an ``nn.Linear`` head with a bias and an ``nn.Embedding`` registered after it (transformers
5's XLM-RoBERTa: ``lm_head.decoder`` owns the weight). The layer takes the head's orientation and its bias column;
the embedding's use is the swapped one, whose output gradients lie on the layer's input side with no part in the
bias: a zero bias column. K-FAC and Shampoo crashed on the missing column in the first backward pass
(``[5, 5]`` factor, ``[4, 4]`` rows); they are checked here against their dense definitions in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager
from lightning_soo.preconditioners.kfac import combine_pairs
from tests.reference import factored_damping_dense, kfac_dense

pytestmark = pytest.mark.usefixtures("float64")
V, D = 7, 4


class HeadFirstBiasLM(nn.Module):
    """Head (with a bias) registered before the embedding it is tied to, a tanh layer between them."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.head = nn.Linear(D, V, bias=bias)
        self.wte = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)
        self.wte.weight = self.head.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(self.wte(tokens))))


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (3, 5), generator=g), torch.randint(0, V, (3, 5), generator=g)


def _layer_grad(model: HeadFirstBiasLM) -> Tensor:
    """The tied layer's gradient matrix ``[W | b]`` (V x D+1)."""
    return torch.cat([model.head.weight.grad, model.head.bias.grad.unsqueeze(1)], 1)


def _one_step(model: HeadFirstBiasLM, manager: PreconditionerManager) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One statistics step with a refresh: (plain layer gradient, per-token embedding output gradients,
    per-token head output gradients, head inputs with the ones column), the 1/N of the mean loss undone."""
    tokens, labels = _data()
    emb_out: list[Tensor] = []
    logits: list[Tensor] = []
    head_in: list[Tensor] = []

    def keep(out: Tensor, outs: list[Tensor], x: Tensor | None = None) -> None:
        out.retain_grad()
        outs.append(out)
        if x is not None:
            head_in.append(x.detach())

    hooks = [
        model.wte.register_forward_hook(lambda m, a, o: keep(o, emb_out)),
        model.head.register_forward_hook(lambda m, a, o: keep(o, logits, a[0])),
    ]
    manager.begin_step()
    F.cross_entropy(model(tokens).reshape(-1, V), labels.reshape(-1)).backward()
    for h in hooks:
        h.remove()
    g = _layer_grad(model).clone()
    manager.step()
    n = tokens.numel()
    x = head_in[0].reshape(-1, D)
    x1 = torch.cat([x, torch.ones(n, 1)], 1)
    return g, emb_out[0].grad.reshape(-1, D) * n, logits[0].grad.reshape(-1, V) * n, x1


@pytest.mark.parametrize("inverse", ["eigen", "cholesky"])
def test_head_first_with_bias_kfac_is_its_dense_definition(inverse: str) -> None:
    """K-FAC's pairs: the head's ``(B, A)`` with A over ``[x | 1]``, the embedding's ``(A_t, B_t)`` with one-hot
    rows on the vocabulary side and ``[δ | 0]`` on the input side; combined by the trace of their sum."""
    torch.manual_seed(0)
    model = HeadFirstBiasLM()
    tokens, _ = _data()
    rho = 0.05
    manager = PreconditionerManager(
        model, "kfac", inverse=inverse, factor_decay=0.0, kl_clip=None, damping=rho, warn=lambda m: None
    )
    assert set(manager.layers) == {"head", "fc"} and not manager.skipped
    assert [use.role for use in manager.layers["head"].uses] == ["normal", "transposed"]
    g, de, dh, x1 = _one_step(model, manager)
    n = tokens.numel()
    de0 = F.pad(de, (0, 1))  # the embedding's gradient has no part in the head's bias
    one_hot = F.one_hot(tokens.reshape(-1), V).double()
    pairs = [(dh.T @ dh / n, x1.T @ x1 / n), (one_hot.T @ one_hot / n, de0.T @ de0 / n)]
    left, right = combine_pairs(pairs)  # (output side V, input side D+1)
    if inverse == "eigen":
        dense = kfac_dense(right, left) + rho * torch.eye(V * (D + 1))
    else:
        dense = factored_damping_dense(right, left, rho)
    expected = torch.linalg.solve(dense, g.reshape(-1)).reshape(V, D + 1)
    assert not torch.equal(expected, g)
    torch.testing.assert_close(_layer_grad(model), expected, rtol=1e-9, atol=1e-12)


def test_head_first_with_bias_shampoo_is_its_dense_definition() -> None:
    """Shampoo's ``L`` and ``R`` are the sums of ``G_n G_nᵀ`` and ``G_nᵀ G_n`` over both uses' per-row gradients:
    the head's ``δ [x | 1]ᵀ`` and the embedding's ``e_token [δ | 0]ᵀ``."""
    torch.manual_seed(0)
    model = HeadFirstBiasLM()
    tokens, _ = _data()
    rho = 0.05
    options = {"damping_mode": "absolute", "grafting": None, "kl_clip": None, "beta": 0.0}
    manager = PreconditionerManager(model, "shampoo", damping=rho, warn=lambda m: None, **options)
    assert not manager.skipped
    g, de, dh, x1 = _one_step(model, manager)
    n = tokens.numel()
    one_hot = F.one_hot(tokens.reshape(-1), V).double()
    rows = [torch.outer(d, xi) for d, xi in zip(dh, x1, strict=True)]
    rows += [torch.outer(e, d) for e, d in zip(one_hot, F.pad(de, (0, 1)), strict=True)]
    left = sum(r @ r.T for r in rows) / (2 * n)
    right = sum(r.T @ r for r in rows) / (2 * n)

    def root(m: Tensor) -> Tensor:
        lam, q = torch.linalg.eigh(m + rho * torch.eye(m.shape[0]))
        return q @ torch.diag(lam**-0.25) @ q.T

    torch.testing.assert_close(_layer_grad(model), root(left) @ g @ root(right), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_head_first_with_bias_trains_and_rewrites_both_tied_parameters(method: str) -> None:
    """Three SGD steps: the loss and weights stay finite, and both the tied weight and the head's bias are
    preconditioned every step (embedding first, that bias keeps its plain gradient: it would be a row of the
    embedding's layer ``weightᵀ``, which a layer's bias cannot be)."""
    torch.manual_seed(0)
    model = HeadFirstBiasLM()
    manager = PreconditionerManager(model, method, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens, labels = _data()
    for _ in range(3):
        opt.zero_grad()
        manager.begin_step()
        loss = F.cross_entropy(model(tokens).reshape(-1, V), labels.reshape(-1))
        loss.backward()
        plain = [model.head.weight.grad.clone(), model.head.bias.grad.clone()]
        manager.step(opt)
        assert not torch.equal(model.head.weight.grad, plain[0]) and not torch.equal(model.head.bias.grad, plain[1])
        opt.step()
        assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


def test_head_first_with_bias_under_gauss_newton_stays_plain_and_psgd_takes_it() -> None:
    """As documented: Gauss-Newton leaves a weight tied in two orientations plain (the head's bias with it, named);
    PSGD, which fits from the gradient, preconditions the layer ``[W | b]``."""
    torch.manual_seed(0)
    model = HeadFirstBiasLM()
    gn = PreconditionerManager(model, "gauss_newton", warn=lambda m: None)
    assert "head" not in gn.layers
    assert {"head.weight", "head.bias"} <= set(gn.skipped) and "two orientations" in gn.skipped["head.bias"]
    psgd = PreconditionerManager(model, "psgd", warn=lambda m: None)
    assert "head" in psgd.layers and not psgd.skipped
    for manager in (gn, psgd):
        model.zero_grad()
        tokens, labels = _data()
        manager.begin_step()
        F.cross_entropy(model(tokens).reshape(-1, V), labels.reshape(-1)).backward()
        plain = _layer_grad(model).clone()
        manager.step()
        assert torch.equal(_layer_grad(model), plain) == (manager is gn)
        assert model.fc.weight.grad is not None and torch.isfinite(_layer_grad(model)).all()


class MaskedLMHead(nn.Module):
    """BERT's MLM head: the embedding first, the decoder's weight tied to it, its bias a parameter of the head
    registered again as ``decoder.bias`` (one tensor, two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)
        self.bias = nn.Parameter(torch.zeros(V))
        self.decoder = nn.Linear(D, V)
        self.decoder.weight, self.decoder.bias = self.wte.weight, self.bias

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(torch.tanh(self.fc(self.wte(tokens))))


def test_a_tied_heads_bias_with_two_names_is_reported_once() -> None:
    """The MLM head's bias (``bias`` and ``decoder.bias``) keeps its plain gradient with the tied-weight reason,
    under its first name only (it was listed twice, the second time as "not in a supported module")."""
    manager = PreconditionerManager(MaskedLMHead(), "kfac", warn=lambda m: None)
    assert {k: v for k, v in manager.plain_parameters().items() if "bias" in k and "fc" not in k} == {
        "bias": "Linear: bias of a module whose weight is tied"
    }
