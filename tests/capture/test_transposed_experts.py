"""Experts stored ``(E, in, out)`` with a bias per expert, as transformers' GPT-OSS keeps them (``is_transposed``,
``has_bias``): rows sorted by expert, ``grouped_mm(x, p, offs=offs)`` on the parameter itself, then each row's
expert bias gathered (``b[ids]``) and added. Each expert is a linear layer with its bias, with the preconditioned
gradients of the same model written with ``nn.Linear`` experts (float32: torch's grouped product takes no
float64 on the CPU). A gather by other ids than the rows' experts, or the eager ``x @ p[e] + b[e]`` (whose ``@``
compiled code would not let capture see), leaves them plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager

pytestmark = pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")

C, H, E, V, N = 8, 8, 4, 6, 12


class Experts(nn.Module):
    """GPT-OSS's layout: ``up`` (E, C, H) and ``down`` (E, H, C) with ``up_bias`` (E, H), ``down_bias`` (E, C);
    ``use``: ``grouped`` (transformers' default), ``shuffled`` (biases gathered by other ids), ``eager``."""

    is_transposed, has_bias = True, True

    def __init__(self, use: str = "grouped") -> None:
        super().__init__()
        self.use = use
        self.up = nn.Parameter(torch.randn(E, C, H) / C**0.5)
        self.up_bias = nn.Parameter(torch.randn(E, H) * 0.1)
        self.down = nn.Parameter(torch.randn(E, H, C) / H**0.5)
        self.down_bias = nn.Parameter(torch.randn(E, C) * 0.1)

    def forward(self, x: Tensor, ids: Tensor, offs: Tensor) -> Tensor:
        if self.use == "eager":
            out = torch.zeros_like(x)
            for e in range(E):
                rows = (ids == e).nonzero().squeeze(1)
                if rows.numel():
                    h = torch.tanh(x[rows] @ self.up[e] + self.up_bias[e])
                    out = out.index_copy(0, rows, h @ self.down[e] + self.down_bias[e])
            return out
        gather = ids.roll(1) if self.use == "shuffled" else ids
        h = F.grouped_mm(x, self.up, offs=offs)
        h.add_(self.up_bias[gather])
        h = F.grouped_mm(torch.tanh(h), self.down, offs=offs)
        h.add_(self.down_bias[gather])
        return h


class Net(nn.Module):
    """A top-1 router, the tokens sorted by expert, a head; ``linear``: ``nn.Linear`` experts with biases."""

    def __init__(self, linear: bool, use: str = "grouped") -> None:
        super().__init__()
        self.linear = linear
        self.router, self.head = nn.Linear(C, E), nn.Linear(C, V)
        if linear:
            self.ups = nn.ModuleList(nn.Linear(C, H) for _ in range(E))
            self.downs = nn.ModuleList(nn.Linear(H, C) for _ in range(E))
        else:
            self.experts = Experts(use)

    def copy_(self, linear: Net) -> Net:
        self.load_state_dict(linear.state_dict(), strict=False)
        with torch.no_grad():
            for e in range(E):
                self.experts.up[e], self.experts.up_bias[e] = linear.ups[e].weight.T, linear.ups[e].bias
                self.experts.down[e], self.experts.down_bias[e] = linear.downs[e].weight.T, linear.downs[e].bias
        return self

    def forward(self, x: Tensor) -> Tensor:
        top, idx = torch.softmax(self.router(x), -1).max(-1)
        ids, order = torch.sort(idx, stable=True)
        offs = torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32)
        xs = x[order]
        if self.linear:
            parts = [self.downs[e](torch.tanh(self.ups[e](xs[ids == e]))) for e in range(E) if bool((ids == e).any())]
            y = torch.cat(parts)
        else:
            y = self.experts(xs, ids, offs)
        y = y * top[order, None]
        return self.head(torch.tanh(torch.empty_like(y).index_copy(0, order, y)))


def _train(model: Net, method: str, steps: int = 4) -> tuple[PreconditionerManager, list[dict[str, Tensor]]]:
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(steps):
        x, y = torch.randn(N, C, generator=gen), torch.randint(0, V, (N,), generator=gen)
        opt.zero_grad()
        manager.begin_step(batch_size=N)
        F.cross_entropy(model(x), y).backward()
        manager.step(opt)
        grads.append(_by_expert(model))
        opt.step()
    return manager, grads


def _by_expert(model: Net) -> dict[str, Tensor]:
    """Each step's gradients, the experts' as ``nn.Linear`` weights and biases."""
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "xperts" not in n}
    if model.linear:
        return {n.replace("ups.", "up.").replace("downs.", "down."): g for n, g in grads.items()}
    ex = model.experts
    for name in ("up", "down"):
        w, b = getattr(ex, name).grad, getattr(ex, f"{name}_bias").grad
        grads.update({f"{name}.{e}.weight": w[e].T for e in range(E)})
        grads.update({f"{name}.{e}.bias": b[e] for e in range(E)})
    return grads


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_transposed_experts_with_biases_equal_linear_experts(method: str) -> None:
    torch.manual_seed(1)
    ref_model = Net(linear=True)
    model = Net(linear=False).copy_(ref_model)
    _, want = _train(ref_model, method)
    manager, got = _train(model, method)
    experts = {f"experts.{n}.{e}" for n in ("up", "down") for e in range(E)}
    assert set(manager.layers) == {"router", "head"} | experts
    assert not manager.skipped
    for step, (g_want, g_got) in enumerate(zip(want, got, strict=True)):
        for name, g in g_got.items():
            ref = g_want.get(name, torch.zeros_like(g))  # an nn.Linear expert without a token has no gradient
            assert (g - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-6), f"{name} at step {step}"


@pytest.mark.parametrize(("use", "why"), [("shuffled", "add_"), ("eager", "matmul")])
def test_other_uses_of_transposed_experts_stay_plain(use: str, why: str) -> None:
    """Biases gathered by ids other than the rows' experts, and the eager product: plain, the call named."""
    torch.manual_seed(1)
    manager, _ = _train(Net(linear=False, use=use), "kfac", steps=2)
    assert set(manager.layers) == {"router", "head"}
    for name in ("up", "down"):
        assert (
            f"`{why}`" in manager.skipped[f"experts.{name}"] or f"`{why}`" in manager.skipped[f"experts.{name}_bias"]
        ), manager.skipped


def test_gpt_oss_is_preconditioned() -> None:
    """transformers' GPT-OSS (tiny; default ``grouped_mm`` experts): 20% of its weights preconditioned by K-FAC
    before (the experts plain), 99.5% now (every method)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        sliding_window=8,
    )  # fmt: skip
    model = transformers.GptOssForCausalLM(config)
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tokens = torch.randint(0, 64, (4, 12))
    for _ in range(3):
        opt.zero_grad()
        manager.begin_step(batch_size=4)
        model(input_ids=tokens, labels=tokens).loss.backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step(opt)
        opt.step()
    changed = sum(p.numel() for n, p in model.named_parameters() if not torch.equal(p.grad, raw[n]))
    assert changed / sum(p.numel() for p in model.parameters()) > 0.99
    assert not [name for name in manager.skipped if "experts" in name]
