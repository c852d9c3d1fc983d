"""Curvature-vector products on models with fused attention or ops without a double backward: exact under the
math attention kernel, a finite-difference fallback of measured accuracy, and training that never stops."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_soo import CurvatureScheduler, KFACCallback, PreconditionerManager, PSGDCallback
from lightning_soo.diagnostics import CurvatureProducts, measure_quality
from lightning_soo.diagnostics.autograd import hvp, loss_gradients, math_attention
from tests.cases import trainer


class _TanhBackward(torch.autograd.Function):
    """``g · (1 − y²)`` whose own backward is missing, as for a fused kernel's backward."""

    @staticmethod
    def forward(ctx, g: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        return g * (1 - y * y)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        raise RuntimeError("derivative for custom_tanh_backward is not implemented")


class OnceTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again (as custom kernels often are)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return _TanhBackward.apply(g, y)


class Attention(nn.Module):
    """A causal self-attention block on ``F.scaled_dot_product_attention`` (no dropout: the fused kernel)."""

    def __init__(self, d: int = 8, heads: int = 2, once: bool = False) -> None:
        super().__init__()
        self.heads, self.once = heads, once
        self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = self.proj(y)
        h = OnceTanh.apply(h) if self.once else torch.tanh(h)
        return self.head(h).mean(1)


def _batch(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 5, 8, generator=g, dtype=dtype), torch.randint(0, 3, (4,), generator=g)


def _exact(model: nn.Module, x: Tensor, y: Tensor, vectors: list[Tensor]) -> list[Tensor]:
    params = list(model.parameters())
    with math_attention():
        grads = loss_gradients(lambda: F.cross_entropy(model(x), y), params)
        return hvp(grads, params, vectors)


def test_fused_attention_has_no_double_backward_but_products_work() -> None:
    torch.manual_seed(0)
    model = Attention()
    x, y = _batch()
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vectors = [torch.randn_like(p) for p in params]
    with pytest.raises(RuntimeError, match="derivative for"):  # the fact the fix is for
        hvp(grads, params, vectors)
    products = CurvatureProducts(lambda: F.cross_entropy(model(x), y), params)
    out = products(vectors)
    assert products.exact
    for a, b in zip(out, _exact(model, x, y, vectors), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-3), (torch.float64, 1e-8)])
def test_finite_difference_fallback_accuracy(dtype: torch.dtype, tolerance: float) -> None:
    """Measured: relative error of the fallback against the exact product (float32 ~2e-5, float64 ~5e-11)."""
    torch.manual_seed(0)
    model = Attention(once=True).to(dtype)
    exact_model = Attention().to(dtype)
    exact_model.load_state_dict(model.state_dict())
    x, y = _batch(dtype)
    params = list(model.parameters())
    vectors = [torch.randn_like(p) for p in params]
    before = [p.detach().clone() for p in params]
    messages: list[str] = []
    products = CurvatureProducts(lambda: F.cross_entropy(model(x), y), params, lambda k, m: messages.append(m))
    out = torch.cat([t.reshape(-1) for t in products(vectors)])
    assert not products.exact and len(messages) == 1 and "finite differences" in messages[0]
    ref = torch.cat([t.reshape(-1) for t in _exact(exact_model, x, y, vectors)])
    error = float((out - ref).norm() / ref.norm())
    assert error < tolerance, error
    for p, b in zip(params, before, strict=True):  # parameters written back bit for bit
        assert torch.equal(p, b)


def test_quality_on_fused_attention_matches_math_kernel() -> None:
    torch.manual_seed(0)
    model = Attention()
    x, y = _batch()
    manager = PreconditionerManager(model, "kfac", damping=1e-2, warn=lambda m: None)
    manager.begin_step()
    F.cross_entropy(model(x), y).backward()
    manager.step()
    fused = measure_quality(manager, lambda: F.cross_entropy(model(x), y), num_probes=2)
    with math_attention():
        math = measure_quality(manager, lambda: F.cross_entropy(model(x), y), num_probes=2)
    assert fused.model.index == pytest.approx(math.model.index, rel=1e-5)
    assert 0 < fused.model.index < 10


class AttentionModule(L.LightningModule):
    def __init__(self, once: bool = False) -> None:
        super().__init__()
        self.net = Attention(once=once)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randn(32, 5, 8, generator=g), torch.randint(0, 3, (32,), generator=g)), 8)


@pytest.mark.parametrize("once", [False, True])
@pytest.mark.parametrize("which", ["scheduler", "psgd_hessian"])
def test_training_with_fused_attention_never_stops(which: str, once: bool) -> None:
    """Fused attention: exact products, no warning; an op without double backward: one warning, training goes on."""
    torch.manual_seed(0)
    module = AttentionModule(once=once)
    callbacks = (
        [KFACCallback(), CurvatureScheduler(quality_every_n_steps=1)]
        if which == "scheduler"
        else [PSGDCallback(fit="hessian")]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=4, callbacks=callbacks).fit(module)
    fallback = [w for w in caught if "finite differences" in str(w.message)]
    assert len(fallback) == (1 if once else 0)
    manager = callbacks[0].manager if callbacks[0].manager is not None else None
    assert all(torch.isfinite(p).all() for p in module.parameters())
    if which == "scheduler":
        assert callbacks[1].last_quality and all(
            v == v for k, v in callbacks[1].last_quality.items() if "quality_index/model" in k
        )
    del manager
