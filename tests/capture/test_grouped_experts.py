"""Experts as transformers' default implementation computes them: rows sorted by expert, every expert in one
``grouped_mm(x, p.transpose(-2, -1), offs=offs)``. Each expert is captured from its block of rows
``x[offs[e-1]:offs[e]]`` and gets the preconditioned gradient the eager loop (``F.linear(x, p[e])`` per expert,
``tests/capture/test_experts.py``) gets; any other grouped use leaves the parameter plain. torch's grouped product
takes float32 or bfloat16 only on the CPU, so the comparisons are in float32, against the eager loop on the same
rows (itself equal to ``nn.Linear`` experts in float64)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager, linalg
from tests.engine.test_sync import counting

pytestmark = pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")

C, H, E, V = 8, 8, 4, 6  # widths of 8 float32: grouped_mm's 16-byte stride rule


class Experts(nn.Module):
    """``up`` (E, H, C) and ``down`` (E, C, H) over rows sorted by expert: ``grouped`` in one grouped product per
    parameter (``transposed``: ``down`` stored as (E, H, C) and passed as it is), else one ``F.linear`` per expert."""

    def __init__(self, mode: str = "grouped") -> None:
        super().__init__()
        self.mode = mode
        self.up = nn.Parameter(torch.randn(E, H, C) / C**0.5)
        shape = (E, H, C) if mode == "transposed" else (E, C, H)
        self.down = nn.Parameter(torch.randn(*shape) / H**0.5)

    def forward(self, x: Tensor, offs: Tensor) -> Tensor:
        if self.mode == "eager":
            bounds = itertools.pairwise([0, *offs.tolist()])
            spans = [(e, a, b) for e, (a, b) in enumerate(bounds) if b > a]  # rows in order, as x's
            h = torch.tanh(torch.cat([F.linear(x[a:b], self.up[e]) for e, a, b in spans]))
            return torch.cat([F.linear(h[a:b], self.down[e]) for e, a, b in spans])
        if self.mode == "transformers":  # its dispatcher: F.grouped_mm, or its own op (compiled float32)
            from transformers.integrations.moe import _grouped_linear

            return _grouped_linear(torch.tanh(_grouped_linear(x, self.up, offs)), self.down, offs)
        h = torch.tanh(F.grouped_mm(x, self.up.transpose(-2, -1), offs=offs))
        down = self.down if self.mode == "transposed" else self.down.transpose(-2, -1)
        return F.grouped_mm(h, down, offs=offs)


class Net(nn.Module):
    """A router picking one of four experts per token (top-1), the tokens sorted by expert, a linear head."""

    def __init__(self, mode: str = "grouped") -> None:
        super().__init__()
        self.router, self.experts, self.head = nn.Linear(C, E), Experts(mode), nn.Linear(C, V)
        self.routed: list[list[int]] = []

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.softmax(self.router(x), -1)
        top, idx = probs.max(-1)
        ids, order = torch.sort(idx, stable=True)
        offs = torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32)
        self.routed.append(torch.bincount(ids, minlength=E).tolist())
        y = self.experts(x[order], offs) * top[order, None]
        out = torch.empty_like(y).index_copy(0, order, y)
        return self.head(torch.tanh(out))


def _train(model: Net, method: str, steps: int = 4, interval: int = 1) -> tuple[PreconditionerManager, list, list]:
    """Steps on fresh batches: the manager, each step's preconditioned gradients and each step's plain ones."""
    manager = PreconditionerManager(
        model, method, preconditioner_interval=1, statistics_interval=interval, warn=lambda m: None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    grads, raw = [], []
    for _ in range(steps):
        x, y = torch.randn(12, C, generator=gen), torch.randint(0, V, (12,), generator=gen)
        opt.zero_grad()
        manager.begin_step(batch_size=12)
        F.cross_entropy(model(x), y).backward()
        raw.append({n: p.grad.clone() for n, p in model.named_parameters()})
        manager.step(opt)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return manager, grads, raw


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_grouped_experts_equal_the_eager_loop(method: str) -> None:
    torch.manual_seed(2)  # an expert without a token at some steps
    model = Net("grouped")
    eager = copy.deepcopy(model)
    eager.experts.mode = "eager"
    manager, got, raw = _train(model, method)
    _, want, _ = _train(eager, method)
    assert model.routed == eager.routed and any(0 in counts for counts in model.routed), model.routed
    assert set(manager.layers) == {"router", "head"} | {f"experts.{n}.{e}" for n in ("up", "down") for e in range(E)}
    assert not manager.skipped
    for step, (g_got, g_want) in enumerate(zip(got, want, strict=True)):
        for name, g in g_got.items():
            scale = g_want[name].abs().max().clamp_min(1e-12)
            assert (g - g_want[name]).abs().max() <= 1e-4 * scale, f"{name} at step {step}"
    for name in ("experts.up", "experts.down"):  # preconditioned, not plain
        assert not torch.allclose(got[-1][name], raw[-1][name], rtol=1e-2), name


@pytest.mark.parametrize(("mode", "why"), [("transposed", "_grouped_mm")])
def test_other_grouped_uses_stay_plain(mode: str, why: str) -> None:
    """A grouped product on the 3-d parameter itself (experts stored as ``(E, in, out)``): plain, the call named;
    the other parameter's experts are kept."""
    torch.manual_seed(0)
    manager, _, _ = _train(Net(mode), "kfac", steps=2)
    down = manager.skipped["experts.down"]
    assert "grouped_mm(x, p.transpose(-2, -1)" in down and f"`{why}`" in down, down
    assert {f"experts.up.{e}" for e in range(E)} <= set(manager.layers)
    assert not any(name.startswith("experts.down.") for name in manager.layers)


def test_grouped_experts_read_the_offsets_once_per_statistics_step() -> None:
    """The experts' rows are known sizes only once the offsets are read on the host: one synchronisation per
    experts module on statistics steps (its two products share ``offs``), none on the others."""
    torch.manual_seed(0)
    model = Net()
    manager = PreconditionerManager(model, "kfac", preconditioner_interval=1000, statistics_interval=2,
                                    warn=lambda m: None)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(12, C), torch.randint(0, V, (12,))
    counts = []
    host, linalg.HOST_DECIDES_ON_CPU = linalg.HOST_DECIDES_ON_CPU, False
    try:
        for _ in range(6):
            opt.zero_grad()
            with counting() as count:
                manager.begin_step(batch_size=12)
                F.cross_entropy(_quiet(model, x), y).backward()
                manager.step(opt)
            opt.step()
            counts.append(count[0])
    finally:
        linalg.HOST_DECIDES_ON_CPU = host
    statistics, other = counts[2::2], counts[3::2]
    assert max(other) <= 1 and all(s - o == 1 for s, o in zip(statistics, other, strict=True)), counts


def _quiet(model: Net, x: Tensor) -> Tensor:
    """``model(x)`` without its routing record (a host read of the model's own)."""
    probs = torch.softmax(model.router(x), -1)
    top, idx = probs.max(-1)
    ids, order = torch.sort(idx, stable=True)
    offs = torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32)
    y = model.experts(x[order], offs) * top[order, None]
    return model.head(torch.tanh(torch.empty_like(y).index_copy(0, order, y)))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_transformers_grouped_mm_experts_equal_eager(kind: str, method: str) -> None:
    """transformers' default experts implementation preconditions what its eager one does: the same layers, and
    the first step's preconditioned gradients equal to float32 rounding (the two paths' plain gradients differ by
    about 3e-7 relative; Shampoo's inverse roots enlarge that to about 1e-4)."""
    pytest.importorskip("transformers")
    from tests.integration.real_models import moe

    torch.manual_seed(0)
    grouped, tokens, loss_fn = moe(kind, experts="grouped_mm")
    eager = copy.deepcopy(grouped)
    eager.set_experts_implementation("eager")
    grads, layers = [], []
    for model in (eager, grouped):
        manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
        manager.begin_step(batch_size=tokens.shape[0])
        loss_fn(model, tokens).backward()
        manager.step()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        layers.append(set(manager.layers))
        assert not [name for name in manager.skipped if ".experts." in name]
    assert layers[0] == layers[1]
    tol = 1e-3 if method == "shampoo" else 1e-4
    for name, g in grads[1].items():
        scale = grads[0][name].abs().max().clamp_min(1e-12)
        assert (g - grads[0][name]).abs().max() <= tol * scale, name


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_transformers_dispatch_under_torch_compile(method: str) -> None:
    """Compiled in float32, transformers' experts call its own grouped op (``grouped_mm_fallback``) instead of
    ``F.grouped_mm``: captured too, so compiled steps collect the experts' statistics as eager ones do (before: the
    experts' statistics stopped at the census step, which runs eagerly, and stayed stale)."""
    pytest.importorskip("transformers")
    torch.manual_seed(2)
    eager = Net("transformers")
    compiled = copy.deepcopy(eager)
    compiled.forward = torch.compile(compiled.forward)  # type: ignore[method-assign]
    _, want, _ = _train(eager, method)
    manager, got, _ = _train(compiled, method)
    assert not manager.skipped and len(manager.layers) == 2 + 2 * E
    for step, (g_got, g_want) in enumerate(zip(got, want, strict=True)):
        for name, g in g_got.items():
            scale = g_want[name].abs().max().clamp_min(1e-12)
            assert (g - g_want[name]).abs().max() <= 1e-4 * scale, f"{name} at step {step}"


def test_bfloat16_experts_under_torch_compile_collect_every_step() -> None:
    """Compiled in bfloat16, transformers' experts call ``F.grouped_mm``, which Dynamo traces into: the replaced
    ``torch._grouped_mm`` it calls is seen, so every compiled statistics step's expert statistics are those of its
    own rows (the step sums equal eager's to bfloat16 rounding; a stale capture would keep the census step's)."""
    pytest.importorskip("transformers")
    torch.manual_seed(2)
    eager = Net("transformers").to(torch.bfloat16)
    compiled = copy.deepcopy(eager)
    compiled.forward = torch.compile(compiled.forward)  # type: ignore[method-assign]
    sums = []
    for model in (eager, compiled):
        manager = PreconditionerManager(model, "kfac", preconditioner_interval=1, warn=lambda m: None)
        gen = torch.Generator().manual_seed(0)
        steps = []
        for _ in range(4):
            x, y = torch.randn(12, C, generator=gen), torch.randint(0, V, (12,), generator=gen)
            model.zero_grad()
            manager.begin_step(batch_size=12)
            F.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
            layers = [manager.layers[f"experts.{n}.{e}"] for n in ("up", "down") for e in range(E)]
            steps.append(
                [f._sum_t.float().norm() if f.pending else None for lay in layers for f in lay.preconditioner._factors]
            )
            manager.step()
        sums.append(steps)
    for step, (want, got) in enumerate(zip(*sums, strict=True)):
        assert sum(w is not None for w in want) >= 2 * E and [w is None for w in want] == [g is None for g in got]
        for w, g in zip(want, got, strict=True):
            if w is not None:
                assert abs(float(g) - float(w)) <= 2e-2 * float(w) + 1e-6, step
