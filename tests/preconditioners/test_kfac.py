"""K-FAC against brute force in float64: factors from their definitions, rewritten gradients from dense solves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager, linalg
from tests.reference import (
    explicit_patches,
    factored_damping_dense,
    kfac_dense,
    module_grad_matrix,
    mse,
    per_example_grads,
    with_ones,
)

RHO = 0.05


pytestmark = pytest.mark.usefixtures("float64")


def _step(module: nn.Module, x: Tensor, y: Tensor, *, inverse: str = "eigen", reduction: str = "mean", **kw) -> tuple:
    """One manager step with decay 0 on a (mean or summed) squared loss; returns (preconditioner, G, P·G)."""
    module.zero_grad()
    options = {"inverse": inverse, "factor_decay": 0.0, **kw.pop("options", {})}
    manager = PreconditionerManager(
        module, method_options=options, damping=RHO, loss_reduction=reduction, kl_clip=None, **kw
    )
    manager.begin_step()
    out = module(x)
    per_example = 0.5 * (out - y).square().flatten(1).sum(1)
    (per_example.mean() if reduction == "mean" else per_example.sum()).backward()
    g = module_grad_matrix(module).clone()
    manager.step()
    layer = next(iter(manager.layers.values()))
    return layer.preconditioner, g, module_grad_matrix(module)


def _output_grads(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-example output gradients ∂ℓ_n/∂out_n."""
    out = module(x)
    per_example = 0.5 * (out - y).square().flatten(1).sum(1)
    return torch.autograd.grad(per_example.sum(), out)[0]


@pytest.mark.parametrize("bias", [True, False])
def test_one_example_kron_is_exact_empirical_fisher(bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=bias)
    x, y = torch.randn(1, 4), torch.randn(1, 3)
    pre, _, _ = _step(lin, x, y)
    g = per_example_grads(lin, mse, x, y)[0].reshape(-1)
    torch.testing.assert_close(kfac_dense(pre.a, pre.b), torch.outer(g, g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inverse", ["eigen", "cholesky"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_linear_factors_and_rewritten_gradient(
    inverse: str, reduction: str, host: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)  # both paths against brute force
    torch.manual_seed(1)
    lin = nn.Linear(5, 3)
    x, y = torch.randn(7, 5), torch.randn(7, 3)
    pre, g, out = _step(lin, x, y, inverse=inverse, reduction=reduction)
    h = with_ones(x)
    torch.testing.assert_close(pre.a, h.T @ h / 7, rtol=1e-12, atol=1e-12)
    d = _output_grads(lin, x, y)
    torch.testing.assert_close(pre.b, d.T @ d / 7, rtol=1e-12, atol=1e-12)
    if inverse == "eigen":
        dense = kfac_dense(pre.a, pre.b) + RHO * torch.eye(18)
    else:
        dense = factored_damping_dense(pre.a, pre.b, RHO)
    expected = torch.linalg.solve(dense, g.reshape(-1)).reshape(3, 6)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pre.curvature_matvec(out), g, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_linear_with_leading_dims(sharing: str) -> None:
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(5, 6, 4), torch.randn(5, 6, 3)
    pre, g, out = _step(lin, x, y, weight_sharing=sharing)
    h, d = with_ones(x), _output_grads(lin, x, y)  # d: per-example gradient of each sequence's loss
    if sharing == "expand":  # every row an example: the mean loss over 5 sequences is a sum over 30 rows / 5
        rows_h, rows_d = h.reshape(30, 5), d.reshape(30, 3) * (30 / 5)
        n = 30
    else:
        rows_h, rows_d = h.mean(1), d.sum(1)
        n = 5
    torch.testing.assert_close(pre.a, rows_h.T @ rows_h / n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre.b, rows_d.T @ rows_d / n, rtol=1e-12, atol=1e-12)
    dense = kfac_dense(pre.a, pre.b) + RHO * torch.eye(15)
    torch.testing.assert_close(out, torch.linalg.solve(dense, g.reshape(-1)).reshape(3, 5), rtol=1e-10, atol=1e-12)


CONVS = [
    (nn.Conv1d, {"kernel_size": 3, "stride": 2, "padding": 1}, (9,)),
    (nn.Conv1d, {"kernel_size": 2, "dilation": 2, "padding": "same", "bias": False}, (7,)),
    (nn.Conv2d, {"kernel_size": 3, "stride": 2, "padding": 1}, (7, 6)),
    (nn.Conv2d, {"kernel_size": (2, 3), "dilation": (2, 1), "padding": 2, "padding_mode": "reflect"}, (6, 6)),
    (nn.Conv2d, {"kernel_size": 3, "padding": 1, "padding_mode": "circular", "bias": False}, (5, 4)),
    (nn.Conv3d, {"kernel_size": 2, "stride": (1, 2, 1), "padding": 1, "dilation": (1, 1, 2)}, (4, 5, 5)),
]


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize(("cls", "kw", "spatial"), CONVS)
def test_conv_factors_from_explicit_patches(cls: type, kw: dict, spatial: tuple, sharing: str) -> None:
    torch.manual_seed(3)
    conv = cls(2, 3, **kw)
    x = torch.randn(4, 2, *spatial)
    y = torch.randn_like(conv(x))
    pre, g, out = _step(conv, x, y, weight_sharing=sharing)
    p = explicit_patches(conv, x)  # (N, L, C*k)
    if conv.bias is not None:
        p = with_ones(p)
    d = _output_grads(conv, x, y).flatten(2).transpose(1, 2)  # (N, L, C_out): per-example gradients
    if sharing == "expand":
        rows_h, rows_d = p.reshape(-1, p.shape[-1]), d.reshape(-1, 3)
        a_ref = rows_h.T @ rows_h / rows_h.shape[0]
    else:
        rows_h, rows_d = p.mean(1), d.sum(1)
        a_ref = rows_h.T @ rows_h / 4
    torch.testing.assert_close(pre.a, a_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre.b, rows_d.T @ rows_d / 4, rtol=1e-12, atol=1e-12)
    dense = kfac_dense(pre.a, pre.b) + RHO * torch.eye(g.numel())
    torch.testing.assert_close(out, torch.linalg.solve(dense, g.reshape(-1)).reshape(g.shape), rtol=1e-9, atol=1e-11)


def test_grouped_conv_is_left_plain() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    manager = PreconditionerManager(model)
    assert "0.weight" in manager.skipped and "grouped" in manager.skipped["0.weight"]
    assert list(manager.layers) == ["2"]


@pytest.mark.parametrize("max_dim", [100, 5])
@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_embedding_diagonal_input_factor(max_dim: int, host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)  # both paths against brute force
    torch.manual_seed(4)
    emb = nn.Embedding(10, 6)
    idx = torch.randint(0, 10, (3, 5))
    y = torch.randn(3, 5, 6)
    pre, g, out = _step(emb, idx, y, options={"max_factor_dim": max_dim})
    counts = torch.bincount(idx.reshape(-1), minlength=10).to(torch.float64)
    torch.testing.assert_close(pre.a, counts / 15, rtol=1e-12, atol=1e-12)
    d = _output_grads(emb, idx, y).reshape(15, 6) * 5  # rows are examples: mean over 3 sequences = sum over 15 / 3
    b_ref = d.T @ d / 15
    if max_dim == 5:  # the 6-wide output side becomes diagonal
        assert pre.b.dim() == 1
        torch.testing.assert_close(pre.b, b_ref.diagonal(), rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(pre.b, b_ref, rtol=1e-12, atol=1e-12)
    dense = kfac_dense(pre.a, pre.b) + RHO * torch.eye(60)
    torch.testing.assert_close(out, torch.linalg.solve(dense, g.reshape(-1)).reshape(6, 10), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_accumulated_micro_batches_equal_one_batch(host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)  # both paths against brute force
    """4 micro-batches of N/4 (loss / 4, as Lightning backpropagates) equal one batch of N."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    results = []
    for chunks in (1, 4):
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
        m.load_state_dict(model.state_dict())
        manager = PreconditionerManager(m, method_options={"factor_decay": 0.0}, damping=RHO, kl_clip=None)
        manager.begin_step()
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            manager.begin_step()
            (F.cross_entropy(m(xc), yc) / chunks).backward()
        manager.step(accumulation=chunks)
        results.append(
            ([layer.preconditioner.b for layer in manager.layers.values()], [p.grad for p in m.parameters()])
        )
    for b1, b4 in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(b1, b4, rtol=1e-10, atol=1e-12)
    for g1, g4 in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g1, g4, rtol=1e-10, atol=1e-12)


def test_factor_decay_running_average() -> None:
    torch.manual_seed(6)
    lin = nn.Linear(3, 2)
    manager = PreconditionerManager(lin, method_options={"factor_decay": 0.75})
    xs = [torch.randn(4, 3) for _ in range(3)]
    expected = None
    for x in xs:
        manager.begin_step()
        lin(x).sum().backward()
        manager.step()
        lin.zero_grad()
        h = with_ones(x)
        batch = h.T @ h / 4
        expected = batch if expected is None else 0.75 * expected + 0.25 * batch
    torch.testing.assert_close(manager.layers[""].preconditioner.a, expected, rtol=1e-12, atol=1e-12)
