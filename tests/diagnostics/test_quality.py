"""The curvature-quality estimator: exact on a quadratic, equal to a brute-force dense reference, ranks
preconditioners, and leaves no trace (gradients, buffers, RNG, manager statistics)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian

from lightning_soo import PreconditionerManager
from lightning_soo.diagnostics.quality import Quality, exact_quality, measure_quality
from lightning_soo.preconditioners.base import Preconditioner

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:.*keep their plain gradient:UserWarning")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Thousands of tiny double backwards: on a loaded 2-core machine two intra-op threads made them up to 20x
    slower (0.7 s -> 15 s for 1500 probes), one thread is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- fixed preconditioners on vec(G) (row-major), for the quadratic -------------------------------------------
class Fixed(Preconditioner):
    """A preconditioner that is set, not learnt."""

    uses_hooks = False
    h: Tensor  # the quadratic's Hessian, set by the test

    def refresh(self, damping: float) -> bool | None:
        return None


class IdentityP(Fixed):
    def precondition(self, grad: Tensor) -> Tensor:
        return grad

    def curvature_matvec(self, v: Tensor) -> Tensor:
        return v


class DiagonalP(Fixed):
    """Jacobi: P = diag(H)⁻¹."""

    def precondition(self, grad: Tensor) -> Tensor:
        return grad / self.h.diagonal().reshape(grad.shape)

    def curvature_matvec(self, v: Tensor) -> Tensor:
        return v * self.h.diagonal().reshape(v.shape)


class InverseHessianP(Fixed):
    """P = scale · H⁻¹ (scale 1: the criterion's minimiser)."""

    scale = 1.0

    def precondition(self, grad: Tensor) -> Tensor:
        return self.scale * torch.linalg.solve(self.h, grad.reshape(-1)).reshape(grad.shape)

    def curvature_matvec(self, v: Tensor) -> Tensor:
        return (self.h @ v.reshape(-1)).reshape(v.shape) / self.scale


def _spd(n: int, seed: int = 0) -> Tensor:
    """Correlated SPD matrix with diagonal scales spread over two decades (so Jacobi helps, but not fully)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=F64)
    c = x @ x.T + n * torch.eye(n, dtype=F64)
    d = c.diagonal().rsqrt()
    s = torch.logspace(-1, 1, n, dtype=F64)[torch.randperm(n, generator=g)].sqrt()
    return (s * d)[:, None] * c * (s * d)[None]


def _quadratic(cls: type[Fixed], scale: float = 1.0) -> tuple[PreconditionerManager, Tensor, object]:
    """``0.5 θᵀHθ`` with θ = vec([W | b]) of a Linear(5, 4): a 4 x 6 gradient matrix, bias column included."""
    lin = nn.Linear(5, 4).double()
    h = _spd(24)
    manager = PreconditionerManager(lin, cls)
    pre = manager.layers[""].preconditioner
    pre.h, pre.scale, pre.ready = h, scale, True

    def loss_fn() -> Tensor:
        theta = torch.cat([lin.weight, lin.bias[:, None]], dim=1).reshape(-1)
        return 0.5 * theta @ h @ theta

    return manager, h, loss_fn


def _dense(cls: type[Fixed], h: Tensor, scale: float = 1.0) -> Tensor:
    if cls is IdentityP:
        return torch.eye(len(h), dtype=F64)
    if cls is DiagonalP:
        return torch.diag(1 / h.diagonal())
    return scale * torch.linalg.inv(h)


@pytest.mark.parametrize("cls", [IdentityP, DiagonalP, InverseHessianP])
def test_estimate_matches_exact_value_on_quadratic(cls: type[Fixed]) -> None:
    manager, h, loss_fn = _quadratic(cls)
    p = _dense(cls, h)
    exact = float(torch.trace(p @ h @ h) + torch.trace(torch.linalg.inv(p)))  # tr(P H²) + tr(P⁻¹)
    est = measure_quality(manager, loss_fn, num_probes=2000, generator=torch.Generator().manual_seed(1))
    assert est.model.criterion == pytest.approx(exact, rel=0.05)
    assert est.model.b_identity == pytest.approx(24, rel=0.05)
    ex = exact_quality(manager, loss_fn)
    assert ex.model.criterion == pytest.approx(exact, rel=1e-10)
    assert ex.model.a_identity == pytest.approx(float(torch.trace(h @ h)), rel=1e-10) and ex.model.b_identity == 24
    if cls is IdentityP:  # P = I gives a = a_I, b = b_I probe by probe: index exactly 1
        assert est.model.index == pytest.approx(1.0, rel=1e-12)
        assert est.model.alpha_star == pytest.approx(math.sqrt(est.model.b_identity / est.model.a_identity))
    if cls is InverseHessianP:  # the minimiser: a = b = tr(H), c = 2 tr(H)
        assert ex.model.criterion == pytest.approx(2 * float(h.trace()), rel=1e-10)
        assert ex.model.alpha_star == pytest.approx(1.0, rel=1e-10)


def test_ranking_and_best_scale() -> None:
    """identity > Jacobi > H⁻¹, for the raw criterion and the index, estimated on common probes; α* undoes a scale."""
    est, ex = {}, {}
    for cls in (IdentityP, DiagonalP, InverseHessianP):
        manager, _, loss_fn = _quadratic(cls)
        est[cls] = measure_quality(manager, loss_fn, num_probes=500, generator=torch.Generator().manual_seed(2)).model
        ex[cls] = exact_quality(manager, loss_fn).model
    for q in (est, ex):
        assert q[IdentityP].criterion > q[DiagonalP].criterion > q[InverseHessianP].criterion
        assert q[IdentityP].index == pytest.approx(1.0) and q[IdentityP].index > q[DiagonalP].index
        assert q[DiagonalP].index > q[InverseHessianP].index
    manager, _, loss_fn = _quadratic(InverseHessianP, scale=5.0)  # P = 5 H⁻¹: a = 5 δθᵀHδθ, b = δθᵀHδθ / 5
    q = measure_quality(manager, loss_fn, num_probes=50).model
    assert q.alpha_star == pytest.approx(0.2, rel=1e-12)
    assert q.best_criterion == pytest.approx(est[InverseHessianP].criterion, rel=0.2)
    assert q.index == pytest.approx(est[InverseHessianP].index, rel=0.2)  # the index ignores the scale


# -- a real K-FAC manager against a brute-force dense reference ------------------------------------------------
def _tanh_mlp(steps: int = 3) -> tuple[nn.Module, PreconditionerManager, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    manager = PreconditionerManager(model, damping=1e-2, preconditioner_interval=1)
    x, y = torch.randn(32, 4, dtype=F64), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        manager.begin_step()
        F.cross_entropy(model(x), y).backward()
        manager.step(opt)
        opt.step()
    return model, manager, x, y


def _brute_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """torch.func Hessian over θ = [vec([W0|b0]); vec([W1|b1])] (row-major gradient matrices)."""
    shapes = [(m.out_features, m.in_features + 1) for m in (model[0], model[2])]
    theta = torch.cat([torch.cat([m.weight, m.bias[:, None]], 1).reshape(-1) for m in (model[0], model[2])]).detach()

    def loss(t: Tensor) -> Tensor:
        params, start = {}, 0
        for i, (o, n) in zip((0, 2), shapes, strict=True):
            m = t[start : start + o * n].reshape(o, n)
            params[f"{i}.weight"], params[f"{i}.bias"] = m[:, :-1], m[:, -1]
            start += o * n
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return hessian(loss)(theta)


@pytest.mark.parametrize("mode", ["joint", "layer"])
def test_exact_and_estimate_match_brute_force_on_kfac(mode: str) -> None:
    model, manager, x, y = _tanh_mlp()
    h = _brute_hessian(model, x, y)
    spans = {"0": slice(0, 25), "2": slice(25, 43)}
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    ex = exact_quality(manager, loss_fn, mode=mode)
    est = measure_quality(manager, loss_fn, mode=mode, num_probes=1500)
    for name, s in spans.items():
        pre = manager.layers[name].preconditioner
        p = torch.kron(pre.b_inv, pre.a_inv)  # (B+ρ_B)⁻¹ ⊗ (A+ρ_A)⁻¹ on row-major vec(G)
        m = h[:, s].T @ h[:, s] if mode == "joint" else h[s, s] @ h[s, s]
        ref = Quality(
            float(torch.trace(p @ m)), float(torch.trace(torch.linalg.inv(p))), float(m.trace()), s.stop - s.start
        )
        for k in ("a", "b", "a_identity", "b_identity"):
            assert getattr(ex.layers[name], k) == pytest.approx(getattr(ref, k), rel=1e-9)
            assert getattr(est.layers[name], k) == pytest.approx(getattr(ref, k), rel=0.08)
        assert est.layers[name].index == pytest.approx(ref.index, rel=0.05)
    joint_a = exact_quality(manager, loss_fn, mode="joint").layers["2"].a
    assert (joint_a != pytest.approx(ex.layers["2"].a, rel=1e-3)) == (mode == "layer")  # cross-layer terms count
    assert ex.model.criterion == pytest.approx(sum(q.criterion for q in ex.layers.values()), rel=1e-12)


def test_kfac_beats_identity() -> None:
    """Badly scaled inputs, 5 K-FAC steps: K-FAC's index is below 1 (better than SGD) for the model and each layer.

    Measured (32 probes, damping 1e-2): joint model 0.85 (layers 0.77, 0.92), layer mode 0.86 (0.76, 0.82); after
    50 steps 0.87 / 0.91. At damping 1e-3 the first layer is below 1 (0.93) but the output layer (1.14 at step 5,
    0.57 at step 50) and the model (1.11 / 1.10) are not: the layers want different scales (α* 0.21 vs 0.61)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    manager = PreconditionerManager(model, damping=1e-2, preconditioner_interval=1, kl_clip=1e-2)
    x = torch.randn(256, 10) * torch.linspace(0.1, 3.0, 10)
    y = (x @ torch.randn(10, 4)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        manager.begin_step()
        F.cross_entropy(model(x), y).backward()
        manager.step(opt)
        opt.step()
    for mode in ("joint", "layer"):
        report = measure_quality(manager, lambda: F.cross_entropy(model(x), y), num_probes=32, mode=mode)
        assert report.model.index < 0.95, (mode, report)
        assert all(q.index < 1.0 for q in report.layers.values()), (mode, report)
        assert report.seconds > 0 and report.probes == 32 and report.mode == mode


# -- no side effects ----------------------------------------------------------------------------------------
class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _bn_run(measure_at: int | None, steps: int = 6) -> tuple[nn.Module, PreconditionerManager, list[float]]:
    """Train with K-FAC; at step ``measure_at`` measure quality between the forward and the backward, while the
    manager is capturing (statistics of the step half-collected)."""
    torch.manual_seed(0)
    model = _BNNet()
    manager = PreconditionerManager(model, damping=1e-2, preconditioner_interval=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    pending = []
    for step in range(steps):
        opt.zero_grad()
        manager.begin_step()
        loss = F.cross_entropy(model(x), y)
        if step == measure_at:
            pre = manager.layers["net.0"].preconditioner
            before = (pre._a.count, pre._a.step_sum.clone())
            assert manager.capture.active
            measure_quality(manager, lambda: F.cross_entropy(model(x), y), num_probes=2, model=model)
            assert manager.capture.active  # restored
            assert pre._a.count == before[0] and torch.equal(pre._a.step_sum, before[1])
            assert not pre._b.pending  # no output gradient captured by the double backward
        loss.backward()
        manager.step(opt)
        opt.step()
        pending.append(loss.item())
    return model, manager, pending


def test_measuring_mid_step_changes_nothing_in_training() -> None:
    model_a, manager_a, losses_a = _bn_run(None)
    model_b, manager_b, losses_b = _bn_run(3)
    assert losses_a == losses_b  # same dropout masks afterwards: the RNG stream was untouched
    for pa, pb in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)  # parameters and BatchNorm buffers
    for name, layer in manager_a.layers.items():
        other = manager_b.layers[name].preconditioner
        assert torch.equal(layer.preconditioner.a, other.a) and torch.equal(layer.preconditioner.b, other.b)


def test_diagnostic_leaves_no_trace() -> None:
    model, manager, _ = _bn_run(None, steps=4)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.net[4].bias.grad = None
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    factors = {n: (lay.preconditioner.a.clone(), lay.preconditioner.b.clone()) for n, lay in manager.layers.items()}
    counters = dict(manager.counters)
    rng = torch.get_rng_state()
    for mode in ("joint", "layer"):
        report = measure_quality(manager, lambda: F.cross_entropy(model(x), y), num_probes=3, model=model, mode=mode)
        assert report.seconds > 0 and set(report.layers) == set(manager.layers)
        assert all(math.isfinite(q.index) and q.index > 0 for q in report.layers.values())
    exact_quality(manager, lambda: F.cross_entropy(model(x), y), model=model)
    assert torch.equal(torch.get_rng_state(), rng)
    after = torch.rand(4)
    torch.set_rng_state(rng)
    assert torch.equal(torch.rand(4), after)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    assert int(model.net[1].num_batches_tracked) == 4
    assert manager.counters == counters and not manager.capture.active
    for n, layer in manager.layers.items():
        pre = layer.preconditioner
        assert torch.equal(pre.a, factors[n][0]) and torch.equal(pre.b, factors[n][1])
        assert not pre._a.pending and not pre._b.pending


# -- edges and bad input ----------------------------------------------------------------------------------
def test_unused_and_unready_layers() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 2)).double()
    manager = PreconditionerManager(model, IdentityP)
    for name in ("0", "1"):
        manager.layers[name].preconditioner.ready = True  # "2" is not ready: skipped
    x = torch.randn(8, 3, dtype=F64)
    loss_fn = lambda: model[0](x).square().mean()  # noqa: E731  (layer "1" does not affect the loss)
    report = measure_quality(manager, loss_fn, num_probes=4)
    assert set(report.layers) == {"0", "1"}
    assert report.layers["1"].a == 0 and report.layers["1"].b == report.layers["1"].b_identity > 0
    assert math.isnan(report.layers["1"].index) and math.isfinite(report.layers["0"].index)
    assert measure_quality(manager, loss_fn, layers=["1"]).layers.keys() == {"1"}
    tags = report.scalars("soo")
    assert {"soo/quality_index/model", "soo/criterion/0", "soo/alpha_star/1", "soo/quality_ms"} <= tags.keys()
    empty = measure_quality(PreconditionerManager(nn.Linear(2, 2)), loss_fn)
    assert not empty.layers and math.isnan(empty.model.index)


def test_bad_input_names_the_argument() -> None:
    manager, _, loss_fn = _quadratic(IdentityP)
    with pytest.raises(ValueError, match=r"num_probes.*0"):
        measure_quality(manager, loss_fn, num_probes=0)
    with pytest.raises(ValueError, match=r"mode.*'diagonal'"):
        measure_quality(manager, loss_fn, mode="diagonal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layers.*'fc'"):
        measure_quality(manager, loss_fn, layers=["fc"])
    with pytest.raises(ValueError, match=r"loss_fn.*scalar"):
        measure_quality(manager, lambda: torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="max_dim"):
        exact_quality(manager, loss_fn, max_dim=10)
