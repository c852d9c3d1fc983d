"""A linear layer that computes itself as ``x @ self.weight.T`` and adds its bias after (transformers'
``FalconLinear``, and hand-written layers of any class): captured at that product, with the same preconditioned
gradients as ``nn.Linear`` (float64, every method). A weight used another way around the product (on the left, the
product scaled before the bias, ``x.matmul(w.T)``, which capture does not replace) stays plain, the reason named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager

C, H, V, B, T = 5, 7, 6, 3, 4
METHODS = ["kfac", "shampoo", "gauss_newton", "psgd"]


class ProductLinear(nn.Linear):
    """``FalconLinear``'s form; ``use`` another form around the product."""

    def __init__(self, *args: int, use: str = "product", bias: bool = True) -> None:
        super().__init__(*args, bias=bias)
        self.use = use

    def forward(self, x: Tensor) -> Tensor:
        if self.use == "left":
            return (self.weight @ x.mT).mT + self.bias
        if self.use == "scaled":
            return (x @ self.weight.T) * 2.0 + self.bias
        if self.use == "method":
            return x.matmul(self.weight.T) + self.bias
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class Projection(nn.Module):
    """A module of its own class (no ``nn.Linear``) with a weight and a bias, written the same way."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.bias + x @ self.weight.T


class Net(nn.Module):
    def __init__(self, plain: bool, use: str = "product") -> None:
        super().__init__()
        self.up: nn.Module = nn.Linear(C, H) if plain else ProductLinear(C, H, use=use)
        self.mid: nn.Module = nn.Linear(H, H, bias=False) if plain else ProductLinear(H, H, bias=False)
        self.head: nn.Module = nn.Linear(H, V) if plain else Projection(H, V)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def _train(model: Net, method: str, steps: int = 3) -> tuple[PreconditionerManager, dict[str, Tensor], dict]:
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(B, T, C, generator=gen), torch.randint(0, V, (B, T), generator=gen)
        opt.zero_grad()
        manager.begin_step(batch_size=B)
        F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step(opt)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return manager, grads, raw


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("method", METHODS)
def test_product_form_equals_linear(method: str) -> None:
    torch.manual_seed(0)
    plain = Net(plain=True)
    product = Net(plain=False)
    product.load_state_dict(plain.state_dict())
    ref_manager, ref, _ = _train(plain, method)
    manager, got, raw = _train(product, method)
    assert set(manager.layers) == set(ref_manager.layers) == {"up", "mid", "head"}
    assert not manager.skipped
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)
        assert not torch.allclose(got[name], raw[name]), name  # preconditioned


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    ("use", "why"),
    [("left", "`matmul`"), ("scaled", "not on its own input and output"), ("method", "bound before")],
    ids=str,
)
def test_other_forms_stay_plain(use: str, why: str) -> None:
    torch.manual_seed(0)
    model = Net(plain=False, use=use)
    manager, got, raw = _train(model, "kfac")
    assert set(manager.layers) == {"mid", "head"}
    assert "overrides" in manager.skipped["up.weight"] and why in manager.skipped["up.weight"], manager.skipped
    assert torch.equal(got["up.weight"], raw["up.weight"]) and torch.equal(got["up.bias"], raw["up.bias"])


def test_falcon_is_preconditioned() -> None:
    """transformers' Falcon: every ``FalconLinear`` (fused query-key-value, dense, MLP) was plain (8.6% coverage
    under K-FAC); now preconditioned (99.2%: layer norms plain)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=True,
        new_decoder_architecture=False,
    )  # fmt: skip
    model = transformers.FalconForCausalLM(config)
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tokens = torch.randint(0, 64, (3, 9))
    for _ in range(2):
        opt.zero_grad()
        manager.begin_step(batch_size=3)
        model(input_ids=tokens, labels=tokens).loss.backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step(opt)
        opt.step()
    changed = sum(p.numel() for n, p in model.named_parameters() if not torch.equal(p.grad, raw[n]))
    assert changed / sum(p.numel() for p in model.parameters()) > 0.98
    assert not any("overrides" in why for why in manager.skipped.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_product_form_under_torch_compile() -> None:
    """Compiled code does not call a replaced ``@``: after the census found the product on the module's own input
    and output, the layer is captured by its forward hook, so compiled steps collect statistics as eager ones do
    (before: the census step's only, the factors then stale; weights 7e-3 off eager after four steps)."""
    torch.manual_seed(0)
    eager = Net(plain=False)
    compiled = Net(plain=False)
    compiled.load_state_dict(eager.state_dict())
    weights = []
    for model, run in ((eager, eager), (compiled, torch.compile(compiled))):
        manager = PreconditionerManager(model, "kfac", preconditioner_interval=1, warn=lambda m: None)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            x, y = torch.randn(B, T, C, generator=gen), torch.randint(0, V, (B, T), generator=gen)
            opt.zero_grad()
            manager.begin_step(batch_size=B)
            F.cross_entropy(run(x).reshape(-1, V), y.reshape(-1)).backward()
            manager.step(opt)
            opt.step()
        assert set(manager.layers) == {"up", "mid", "head"}
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_a_census_that_leaves_nothing_says_so() -> None:
    """Every layer left plain by the census (here: each weight also used outside its module) is said at once, with
    the reasons: no refresh ever comes to report it (Falcon under Gauss-Newton said nothing before)."""

    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(C, C), nn.Linear(C, V)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.a(x))) + x @ self.a.weight.T @ self.b.weight.T

    messages: list[str] = []
    model = Reused()
    manager = PreconditionerManager(model, "kfac", warn=messages.append)
    x, y = torch.randn(B, C), torch.randint(0, V, (B,))
    for _ in range(2):
        manager.begin_step(batch_size=B)
        F.cross_entropy(model(x), y).backward()
        manager.step()
    assert not manager.layers
    [message] = messages
    assert message.startswith("after the census of the first statistics step, Reused has no layer KFAC")
    assert "a.weight" in message and "b.weight" in message
