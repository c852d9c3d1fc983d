"""Gauss-Newton (Woodbury) against the dense ``(E[g gᵀ] + ρI)⁻¹ g`` built from torch.func per-example gradients."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_soo import PreconditionerManager
from tests.reference import module_grad_matrix, per_example_grads
from tests.reference import mse as mse

pytestmark = pytest.mark.usefixtures("float64")
EXACT = {"damping_mode": "absolute", "grafting": None, "kl_clip": None}  # the plain (E[ggᵀ] + ρI)⁻¹ g


def _run(module: nn.Module, batches: list[tuple[Tensor, Tensor]], damping: float, **options):
    """One step over ``batches`` (micro-batches of one mean loss); returns (preconditioner, G, rewritten G)."""
    module.zero_grad()
    manager = PreconditionerManager(module, "gauss_newton", {**EXACT, **options}, damping=damping)
    manager.begin_step()
    for x, y in batches:
        (0.5 * (module(x) - y).square().flatten(1).sum(1)).mean().div(len(batches)).backward()
    g = module_grad_matrix(module).clone()
    manager.step(accumulation=len(batches))
    return next(iter(manager.layers.values())).preconditioner, g, module_grad_matrix(module)


def _dense_solution(gs: Tensor, g: Tensor, damping: float) -> Tensor:
    u = gs.reshape(gs.shape[0], -1)
    c = u.T @ u / gs.shape[0] + damping * torch.eye(u.shape[1])
    return torch.linalg.solve(c, g.reshape(-1)).reshape(g.shape)


def test_linear_equals_dense_empirical_fisher_solve() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    x, y = torch.randn(8, 5), torch.randn(8, 4)
    pre, g, out = _run(lin, [(x, y)], damping=0.05)
    expected = _dense_solution(per_example_grads(lin, mse, x, y), g, 0.05)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pre.curvature_matvec(out), g, rtol=1e-10, atol=1e-12)


def test_conv2d_equals_dense_empirical_fisher_solve() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    x, y = torch.randn(6, 2, 5, 5), torch.randn(6, 3, 3, 3)
    pre, g, out = _run(conv, [(x, y)], damping=0.1)
    expected = _dense_solution(per_example_grads(conv, mse, x, y), g, 0.1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    v = torch.randn_like(g)
    torch.testing.assert_close(pre.curvature_matvec(pre.precondition(v)), v, rtol=1e-9, atol=1e-11)


def test_sequence_inputs_count_each_token_as_an_example() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    x, y = torch.randn(3, 5, 4), torch.randn(3, 5, 3)  # 15 tokens, a token-averaged loss
    lin.zero_grad()
    manager = PreconditionerManager(lin, "gauss_newton", EXACT, damping=0.02)
    manager.begin_step()
    (0.5 * (lin(x) - y).square().sum(-1)).mean().backward()
    g = module_grad_matrix(lin).clone()
    manager.step()
    gs = per_example_grads(lin, mse, x.reshape(15, 4), y.reshape(15, 3))
    torch.testing.assert_close(module_grad_matrix(lin), _dense_solution(gs, g, 0.02), rtol=1e-10, atol=1e-12)


def test_embedding_one_hot_rows() -> None:
    torch.manual_seed(3)
    emb = nn.Embedding(9, 3)
    idx, y = torch.randint(0, 9, (7,)), torch.randn(7, 3)
    _, g, out = _run(emb, [(idx, y)], damping=0.1)
    torch.testing.assert_close(
        out, _dense_solution(per_example_grads(emb, mse, idx, y), g, 0.1), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_micro_batches_equal_one_batch(kind: str) -> None:
    torch.manual_seed(4)
    module = nn.Linear(4, 3) if kind == "linear" else nn.Conv1d(2, 3, 3)
    shape = (8, 4) if isinstance(module, nn.Linear) else (8, 2, 6)
    x = torch.randn(*shape)
    y = module(x).detach() + torch.randn_like(module(x))
    _, _, whole = _run(module, [(x, y)], damping=0.05)
    _, _, parts = _run(module, [(x[:4], y[:4]), (x[4:], y[4:])], damping=0.05)
    torch.testing.assert_close(parts, whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_kept_rows_do_not_alias_the_input(bias: bool) -> None:
    """A bias-less layer's rows are a view of its input: overwriting that tensor in place after the step (a reused
    input buffer) must not change the curvature the layer keeps until its next refresh."""
    torch.manual_seed(11)
    lin = nn.Linear(5, 4, bias=bias)
    x, y = torch.randn(8, 5), torch.randn(8, 4)
    pre, g, out = _run(lin, [(x, y)], damping=0.05)
    expected = _dense_solution(per_example_grads(lin, mse, x.clone(), y), g, 0.05)
    x.normal_()  # the caller's buffer takes the next batch
    torch.testing.assert_close(pre.precondition(g), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_too_many_examples_are_subsampled_with_a_warning() -> None:
    torch.manual_seed(5)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(40, 3), torch.randn(40, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre, g, out = _run(lin, [(x, y)], damping=0.1, max_examples=10)
    assert pre.basis.n == 10
    assert any("max_examples" in str(w.message) for w in caught)
    keep = torch.linspace(0, 39, 10).round().long()
    gs = per_example_grads(lin, mse, x, y)[keep]
    torch.testing.assert_close(out, _dense_solution(gs, g, 0.1), rtol=1e-10, atol=1e-12)


def test_failed_refresh_keeps_last_preconditioner() -> None:
    torch.manual_seed(6)
    lin = nn.Linear(3, 2)
    pre, g, _ = _run(lin, [(torch.randn(5, 3), torch.randn(5, 2))], damping=0.1)
    before = pre.precondition(g)
    assert pre.refresh(0.0) is False  # a zero damping makes the empirical Fisher singular
    assert torch.equal(pre.precondition(g), before)


def test_state_dict_round_trip() -> None:
    torch.manual_seed(7)
    from lightning_soo.preconditioners import GaussNewton

    for module, x in ((nn.Linear(3, 2), torch.randn(5, 3)), (nn.Conv1d(1, 2, 2), torch.randn(4, 1, 5))):
        pre, g, _ = _run(module, [(x, torch.randn_like(module(x)))], damping=0.1)
        state = pre.state_dict()
        d_out, d_in = g.shape
        fresh = GaussNewton(d_out, d_in, dtype=torch.float64, device=torch.device("cpu"), options=pre.options)
        fresh.load_state_dict(state)
        assert fresh.ready and torch.equal(fresh.precondition(g), pre.precondition(g))


def test_adaptive_freeze_compares_spectra_across_changing_batch_sizes() -> None:
    """Grams of two steps are of different examples: the monitor sees the spectrum, and a step with another N (the
    last, partial batch) is skipped in the comparison instead of failing."""
    torch.manual_seed(8)
    lin = nn.Linear(3, 2)
    manager = PreconditionerManager(lin, "gauss_newton", damping=0.1, preconditioner_interval=1, freeze_tolerance=0.5)
    for n in (8, 8, 5, 8):
        manager.begin_step()
        lin.zero_grad()
        (0.5 * (lin(torch.randn(n, 3)) - torch.randn(n, 2)).square().sum(1)).mean().backward()
        manager.step()
    state = manager.layers[""].preconditioner.curvature_state()
    assert len(state) == 1 and state[0].shape == (8,)
    assert manager.monitor.last_change is not None


def test_largest_eigenvalue_by_subspace_iteration() -> None:
    """The relative damping's scale: within 1e-6 of the exact top eigenvalue of an example Gram (a dominant mean
    direction over a decaying tail), a lower bound within 2% for a flat spectrum (40 eigenvalues within 1.39 / 1.00
    of each other, the worst case); 0 for a zero matrix; NaN, not an error, when not finite; the user's random
    stream untouched."""
    from lightning_soo.linalg import largest_eigenvalue_many

    def largest_eigenvalue(k: Tensor) -> float:
        return largest_eigenvalue_many([k])[0]

    torch.manual_seed(12)
    g = torch.randn(64, 300) * torch.logspace(0, -3, 300) + 0.3  # per-example gradients sharing a mean
    k = g @ g.T
    exact = float(torch.linalg.eigvalsh(k)[-1])
    assert abs(largest_eigenvalue(k) - exact) <= 1e-6 * exact
    flat = torch.eye(40) + 0.01 * torch.diag(torch.arange(40.0))
    assert 1.39 * 0.98 <= largest_eigenvalue(flat) <= 1.39 + 1e-12
    assert largest_eigenvalue(torch.zeros(5, 5)) == 0.0
    assert largest_eigenvalue(torch.empty(0, 0)) == 0.0
    bad = k.clone()
    bad[0, 0] = float("nan")
    state = torch.random.get_rng_state()
    assert math.isnan(largest_eigenvalue(bad))
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(("statistics", "refresh"), [(1, 4), (3, 10), (2, 1)])
def test_statistics_no_refresh_reads_are_not_collected(statistics: int, refresh: int, monkeypatch) -> None:
    """A refresh reads only the latest statistics step's examples: a statistics step followed by another before any
    refresh is not collected, and the run equals one that collects every statistics step (gradients, every step)."""
    from lightning_soo.preconditioners.gauss_newton import GaussNewton

    def run(running: bool) -> tuple[list[Tensor], list[int]]:
        monkeypatch.setattr(GaussNewton, "running_statistics", running)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        manager = PreconditionerManager(
            model, "gauss_newton", statistics_interval=statistics, preconditioner_interval=refresh, kl_clip=None
        )
        grads, collected = [], []
        for step in range(13):
            x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
            model.zero_grad()
            manager.begin_step()
            if manager.layers["0"].collecting:
                collected.append(step)
            mse(model(x), y).backward()
            manager.step()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        return grads, collected

    (skipping, few), (every, all_) = run(False), run(True)
    assert all_ == list(range(0, 13, statistics))
    read = [s for s in all_ if any(r % refresh == 0 for r in range(s, s + statistics))]
    assert few == read and (len(few) < len(all_)) == (refresh > statistics)
    for a, b in zip(skipping, every, strict=True):
        torch.testing.assert_close(a, b)
