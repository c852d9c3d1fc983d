"""Brute-force references built from definitions (float64): per-example gradients via torch.func, explicit patches."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def mse(out: Tensor, y: Tensor) -> Tensor:
    """Half the squared error, summed over output entries and examples (a per-example loss when N = 1)."""
    return 0.5 * (out - y).square().flatten(1).sum(1).sum()


def per_example_grads(module: nn.Module, loss_of_output, x: Tensor, y: Tensor) -> Tensor:
    """Per-example gradient matrices G_n (N x d_out x d_in, bias as the last column) of ``loss_of_output(out, y)``
    for each example alone (no batch averaging)."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def single(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        out = functional_call(module, p, (xn.unsqueeze(0),))
        return loss_of_output(out, yn.unsqueeze(0))

    g = vmap(grad(single), in_dims=(None, 0, 0))(params, x, y)
    return grad_matrix_of(module, g)


def grad_matrix_of(module: nn.Module, g: dict[str, Tensor]) -> Tensor:
    """Stack a (batched) parameter-gradient dict into gradient matrices in the library's convention."""
    w = g["weight"]
    if isinstance(module, nn.Embedding):
        return w.transpose(-1, -2)
    lead = w.shape[: w.dim() - module.weight.dim()]
    m = w.reshape(*lead, module.weight.shape[0], -1)
    if "bias" in g:
        m = torch.cat([m, g["bias"].unsqueeze(-1)], dim=-1)
    return m


def module_grad_matrix(module: nn.Module) -> Tensor:
    g = {"weight": module.weight.grad}
    if getattr(module, "bias", None) is not None:
        g["bias"] = module.bias.grad
    return grad_matrix_of(module, g)


def explicit_patches(conv: nn.Module, x: Tensor) -> Tensor:
    """Patches (N, L, C*k...) by explicit loops over output positions, from the definition of convolution."""
    nd = len(conv.kernel_size)
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode) if any(pad) else x
    spatial = xp.shape[2:]
    out_sizes = [
        (spatial[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1 for i in range(nd)
    ]
    rows = []
    for pos in itertools.product(*(range(s) for s in out_sizes)):
        index = [slice(None), slice(None)]
        for i in range(nd):
            start = pos[i] * conv.stride[i]
            stop = start + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
            index.append(slice(start, stop, conv.dilation[i]))
        rows.append(xp[tuple(index)].reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def with_ones(h: Tensor) -> Tensor:
    return torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)


def kfac_dense(a: Tensor, b: Tensor) -> Tensor:
    """A ⊗ B acting on row-major vec(G) for G (d_out x d_in): kron(B, A); diagonal factors given as vectors."""
    a = torch.diag(a) if a.dim() == 1 else a
    b = torch.diag(b) if b.dim() == 1 else b
    return torch.kron(b, a)


def factored_damping_dense(a: Tensor, b: Tensor, damping: float) -> Tensor:
    """kron(B + ρ_B I, A + ρ_A I) with ρ_A = √ρ·π, ρ_B = √ρ/π, π = √((tr A/dim A)/(tr B/dim B))."""
    a = torch.diag(a) if a.dim() == 1 else a
    b = torch.diag(b) if b.dim() == 1 else b
    pi = ((a.trace() / a.shape[0]) / (b.trace() / b.shape[0])).sqrt()
    ra, rb = damping**0.5 * pi, damping**0.5 / pi
    return torch.kron(b + rb * torch.eye(b.shape[0], dtype=b.dtype), a + ra * torch.eye(a.shape[0], dtype=a.dtype))


def spd(n: int, spread: float, g: torch.Generator) -> Tensor:
    """A random float64 SPD matrix with eigenvalues log-spaced over ``spread`` (random eigenvectors)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.logspace(0, torch.log10(torch.tensor(spread)), n, dtype=torch.float64)) @ q.T


def newton_fit_conditions(model: nn.Module, layer: str, weight: Callable[[], Tensor]) -> tuple[float, float]:
    """PSGD's Newton form (``fit_hessian``) fitted 3000 steps on ``½ tr(Wᵀ A W B)`` for ``W = weight()`` (4 x 3,
    float64; the Hessian ``A ⊗ B`` in row-major ``vec(W)``, cond 100): ``(cond(P·H) from its eigenvalues' real
    parts, cond(H))``. The fit drives ``P·H`` towards the identity."""
    from lightning_soo import PreconditionerManager
    from lightning_soo.diagnostics.newton import fit_hessian

    g = torch.Generator().manual_seed(1)
    a, b = spd(4, 20.0, g), spd(3, 5.0, g)
    manager = PreconditionerManager(
        model, "psgd", {"fit": "hessian", "min_update_probability": 1.0}, preconditioner_interval=1
    )
    pre = manager.layers[layer].preconditioner

    def loss() -> Tensor:
        w = weight()
        return 0.5 * torch.trace(w.T @ a @ w @ b)

    for step in range(3000):
        if step == 2000:
            pre.lr_preconditioner = 0.02  # type: ignore[attr-defined]
        manager.begin_step()
        model.zero_grad()
        loss().backward()
        assert fit_hessian(manager, loss, model) == 1
        manager.step()
    hessian = torch.kron(a, b)
    p = torch.stack([pre.precondition(e.reshape(4, 3)).reshape(-1) for e in torch.eye(12, dtype=torch.float64)], 1)
    lam = torch.linalg.eigvals(p @ hessian).real
    return float(lam.max() / lam.min()), float(torch.linalg.cond(hessian))
