"""Mixture-of-experts layers written as transformers writes them (Mixtral, Qwen2-MoE, OLMoE): the experts as 3-d
parameters called through ``F.linear(x, p[e])`` on one expert's slice, the router a module of its own class calling
``F.linear(x, self.weight, self.bias)``. Each expert is a linear layer of its own and the router is one: every
method's preconditioned gradients equal those of the same model written with one ``nn.Linear`` per expert and an
``nn.Linear`` router. Any other use of the parameters leaves them plain, with the call named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager, linalg
from lightning_soo.preconditioners.gauss_newton import GaussNewton
from tests.engine.test_sync import counting

C, H, E, V, B, T = 5, 4, 4, 6, 2, 3


class Router(nn.Module):
    """A router of its own class: its weight and bias used in one ``F.linear`` call (``use``: another way)."""

    def __init__(self, use: str = "linear") -> None:
        super().__init__()
        self.use = use
        self.weight = nn.Parameter(torch.randn(E, C) / C**0.5)
        self.bias = nn.Parameter(torch.zeros(E))

    def forward(self, x: Tensor) -> Tensor:
        if self.use == "matmul":  # the weight on the left (``x @ self.weight.T + self.bias`` is captured)
            return (self.weight @ x.mT).mT + self.bias
        return F.linear(x, self.weight * 1.0 if self.use == "scaled" else self.weight, self.bias)


class Experts(nn.Module):
    """Mixtral's ``MixtralExperts`` form: ``up`` (E, H, C) and ``down`` (E, C, H), one expert's slice per call
    (``use``: the ``down`` slices used another way)."""

    def __init__(self, use: str = "linear") -> None:
        super().__init__()
        self.use = use
        self.up = nn.Parameter(torch.randn(E, H, C) / C**0.5)
        self.down = nn.Parameter(torch.randn(E, C, H) / H**0.5)
        if use == "bias":
            self.down_bias = nn.Parameter(torch.zeros(E, C))

    def forward(self, x: Tensor, e: int) -> Tensor:
        h = torch.tanh(F.linear(x, self.up[torch.tensor(e)]))  # a 0-d tensor index, as transformers' loop has
        if self.use == "matmul":
            return h @ self.down[e].T
        if self.use == "bias":
            return F.linear(h, self.down[e], self.down_bias[e])
        if self.use == "batched":
            return torch.bmm(self.down[[e]], h.T.unsqueeze(0))[0].T
        return F.linear(h, self.down[e])


class Net(nn.Module):
    """A mixture-of-experts block (top-1 of four experts, weighted by the routing probability) between a tanh and a
    linear head: ``linear`` writes each expert as two ``nn.Linear`` and the router as one."""

    def __init__(self, linear: bool, router: str = "linear", experts: str = "linear") -> None:
        super().__init__()
        self.linear = linear
        self.router: nn.Module = nn.Linear(C, E) if linear else Router(router)
        if linear:
            self.up = nn.ModuleList(nn.Linear(C, H, bias=False) for _ in range(E))
            self.down = nn.ModuleList(nn.Linear(H, C, bias=False) for _ in range(E))
        else:
            self.experts = Experts(experts)
        self.head = nn.Linear(C, V)
        self.routed: list[set[int]] = []  # per forward, the experts that got a token

    def copy_(self, linear: Net) -> Net:
        """The weights of ``linear`` (the same model written with ``nn.Linear`` layers)."""
        self.load_state_dict(linear.state_dict(), strict=False)  # router and head
        with torch.no_grad():
            for e in range(E):
                self.experts.up[e] = linear.up[e].weight
                self.experts.down[e] = linear.down[e].weight
        return self

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, C)
        top, idx = torch.softmax(self.router(flat), -1).topk(1, -1)
        out = torch.zeros_like(flat)
        self.routed.append(set(idx.flatten().tolist()))
        for e in range(E):
            token, slot = torch.where(idx == e)
            if not len(token):
                continue
            y = self.down[e](torch.tanh(self.up[e](flat[token]))) if self.linear else self.experts(flat[token], e)
            out = out.index_add(0, token, y * top[token, slot, None])
        return self.head(torch.tanh(out)).reshape(*x.shape[:-1], V)


def _train(
    model: Net, method: str, steps: int = 4, zeros: bool = False
) -> tuple[PreconditionerManager, list[dict[str, Tensor]]]:
    """Steps on fresh batches; each step's preconditioned gradients (an expert's slice or ``nn.Linear`` alike).
    ``zeros``: gradients zeroed, not set to None (an expert without a token has a zero gradient, as a slice has)."""
    manager = PreconditionerManager(model, method, preconditioner_interval=1, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for p in model.parameters() if zeros else []:
        p.grad = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(steps):
        x, y = torch.randn(B, T, C, generator=gen), torch.randint(0, V, (B, T), generator=gen)
        opt.zero_grad(set_to_none=not zeros)
        manager.begin_step(batch_size=B)
        F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).backward()
        manager.step(opt)
        grads.append(_by_expert(model))
        opt.step()
    return manager, grads


def _by_expert(model: Net) -> dict[str, Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "experts" not in n}
    if model.linear:
        return grads
    for name in ("up", "down"):
        grad = getattr(model.experts, name).grad
        grads.update({f"{name}.{e}.weight": grad[e] for e in range(E)})
    return grads


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_experts_and_router_equal_linear_layers(method: str) -> None:
    torch.manual_seed(3)  # routes two experts at the first step, all four at the second, three at the last
    ref_model = Net(linear=True)
    model = Net(linear=False).copy_(ref_model)
    # PSGD fits from the gradient: a zero slice, where an nn.Linear not called has none unless zeroed (see README)
    _, ref = _train(ref_model, method, zeros=method == "psgd")
    manager, got = _train(model, method)
    experts = {f"experts.{n}.{e}" for n in ("up", "down") for e in range(E)}
    assert set(manager.layers) == {"router", "head"} | experts
    # experts without rows at first keep their plain (zero) gradient slice, later ones keep their preconditioner
    assert model.routed == ref_model.routed == [{0, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}, {0, 1, 3}]
    assert all(lay.preconditioner.ready for lay in manager.layers.values())
    assert not manager.skipped
    for step, (g_ref, g_got) in enumerate(zip(ref, got, strict=True)):
        assert g_got.keys() >= g_ref.keys(), step  # a slice of an expert without a token is zero, not None
        for name, g in g_got.items():
            want = g_ref.get(name, torch.zeros_like(g))
            torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12, msg=f"{name} at step {step}")


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    ("router", "experts", "why"),
    [
        ("matmul", "matmul", ("matmul", "matmul")),
        ("scaled", "bias", ("mul", "linear")),
        ("linear", "batched", ("", "__getitem__")),
    ],
    ids=["matmul", "scaled-bias", "batched"],
)
@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_other_uses_stay_plain(method: str, router: str, experts: str, why: tuple[str, str]) -> None:
    """A router whose weight is used other than in its ``F.linear`` call, a 3-d parameter used other than as
    ``F.linear(x, p[e])`` with no bias (a matmul, a bias, an advanced-index copy for ``bmm``): plain, the call
    named; the other 3-d parameter (``up``, whose uses are all expert calls) keeps its experts."""
    torch.manual_seed(0)
    model = Net(linear=False, router=router, experts=experts)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    manager, _ = _train(model, method, steps=3)
    down = manager.skipped["experts.down"]
    assert "F.linear(x, p[e])" in down and f"`{why[1]}`" in down, down
    assert not any(name.startswith("experts.down.") for name in manager.layers)
    assert {f"experts.up.{e}" for e in range(E)} <= set(manager.layers)
    if why[0]:
        assert f"`{why[0]}`" in manager.skipped["router.weight"] and "router" not in manager.layers
    else:
        assert "router" in manager.layers
    assert all(torch.isfinite(p).all() and not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.usefixtures("float64")
def test_unrouted_experts_are_named_and_excluded_ones_kept_apart() -> None:
    """An expert no row was routed to is named by its layer (the others of its parameter are preconditioned); an
    ``exclude`` pattern on the 3-d parameter's name keeps all its experts apart, and state round-trips."""
    torch.manual_seed(1)
    model = Net(linear=False)
    manager, _ = _train(model, "kfac", steps=2)  # the second: an unready layer's retry
    plain = manager.plain_parameters()
    assert model.routed == [{1, 2, 3}, {1, 2, 3}]  # expert 0 got no row
    assert set(plain) == {"experts.up.0", "experts.down.0"}
    assert "no row routed to this expert" in plain["experts.up.0"]
    saved = manager.state_dict()
    again = PreconditionerManager(model, "kfac", preconditioner_interval=1, warn=lambda m: None)
    again.load_state_dict(saved)
    assert again.layers["experts.up.1"].preconditioner.ready and not again.layers["experts.up.0"].preconditioner.ready
    excluded = PreconditionerManager(Net(linear=False), "kfac", exclude=["experts.down"], warn=lambda m: None)
    assert excluded.excluded == {"experts.down": "excluded by you"}
    assert not any(name.startswith("experts.down") for name in excluded.layers)
    assert {f"experts.up.{e}" for e in range(E)} <= set(excluded.layers)


def test_a_3d_parameter_shared_by_two_modules_stays_plain() -> None:
    """The experts of a 3-d parameter held by two modules (each calling its slices) stay plain: a use in the other
    module is not one capture sees."""
    shared = nn.ModuleDict({"a": Experts(), "b": Experts()})
    shared["b"].up = shared["a"].up
    manager = PreconditionerManager(shared, "kfac", warn=lambda m: None)
    assert "3-d parameter also in Experts 'b'" in manager.skipped["a.up"]
    assert sorted(manager.layers) == sorted(f"{m}.down.{e}" for m in "ab" for e in range(E))


class FixedRoutes(nn.Module):
    """Experts called on fixed rows (every E-th token), weighted by the router: the model reads nothing on the host,
    so every synchronisation counted is the library's."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.experts, self.head = Router(), Experts(), nn.Linear(C, V)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, C)
        probs = torch.softmax(self.router(flat), -1)
        parts = [self.experts(flat[e::E], e) * probs[e::E, e : e + 1] for e in range(E)]
        return self.head(torch.tanh(torch.cat(parts)))


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_experts_add_no_synchronisation(method: str) -> None:
    """On the accelerator's path, steps that do not refresh keep at most one host synchronisation with experts and
    a router (``tests/engine/test_sync.py``'s count)."""
    torch.manual_seed(0)
    model = FixedRoutes()
    manager = PreconditionerManager(model, method, preconditioner_interval=1000, warn=lambda m: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, C), torch.randint(0, V, (8,))
    target = torch.cat([y[e::E] for e in range(E)])
    counts = []
    host, linalg.HOST_DECIDES_ON_CPU = linalg.HOST_DECIDES_ON_CPU, False
    running, GaussNewton.running_statistics = GaussNewton.running_statistics, True  # collect every step
    try:
        for _ in range(4):
            opt.zero_grad()
            with counting() as count:
                manager.begin_step()
                F.cross_entropy(model(x), target).backward()
                manager.step(opt)
            opt.step()
            counts.append(count[0])
    finally:
        linalg.HOST_DECIDES_ON_CPU, GaussNewton.running_statistics = host, running
    assert len(manager.layers) == 2 * E + 2
    assert max(counts[2:]) <= 1, counts


def test_transformers_batched_experts_stay_plain_with_the_call_named() -> None:
    """transformers' ``batched_mm`` experts (each row's expert matrix gathered, ``p[ids]``, then ``bmm``) are not
    ``F.linear`` on a slice nor a grouped product: the experts stay plain, the router is preconditioned, and the
    candidates the census drops hold no statistics memory."""
    pytest.importorskip("transformers")
    from tests.integration.real_models import moe

    torch.manual_seed(0)
    model, tokens, loss_fn = moe("mixtral", experts="batched_mm")
    manager = PreconditionerManager(model, "kfac", warn=lambda m: None)
    candidates = [layer.preconditioner for layer in manager.layers.values()]
    assert all(f._sum_t is None for p in candidates for f in p._factors)  # no statistics memory before rows
    manager.begin_step(batch_size=tokens.shape[0])
    loss_fn(model, tokens).backward()
    manager.step()
    for i in range(2):
        assert f"model.layers.{i}.mlp.gate" in manager.layers
        for name in ("gate_up_proj", "down_proj"):
            assert "`__getitem__`" in manager.skipped[f"model.layers.{i}.mlp.experts.{name}"]
    kept = {id(layer.preconditioner) for layer in manager.layers.values()}
    dropped = [p for p in candidates if id(p) not in kept]
    assert dropped and all(f._sum_t is None for p in dropped for f in p._factors)  # the census's drops cost none


@pytest.mark.parametrize(("method", "vectors"), [("kfac", False), ("psgd", False), ("psgd", True)])
def test_3d_parameters_that_are_not_experts(method: str, vectors: bool) -> None:
    """A weight-normed convolution's ``original1`` (a 3-d parametrization parameter) and a per-head scale
    ``(heads, 1, 1)`` are not experts (PSGD once rewrote the convolution's as 32 "experts" while the report called
    it plain). K-FAC leaves both plain with their reasons; PSGD takes ``original1`` whole from its gradient (the
    matrix ``(8, C·3)``), and the vectors (the scale, ``original0``, the bias) with ``precondition_vectors``
    (``ParameterAdapter``)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(C, 8, 3, padding=1))
            self.scale = nn.Parameter(torch.ones(2, 1, 1))
            self.head = nn.Linear(8, V)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.conv(x.mT)).mT.reshape(x.shape[0], 2, -1, 8) * self.scale
            return self.head(h.reshape(x.shape[0], -1, 8))

    torch.manual_seed(0)
    model = Scaled()
    manager = PreconditionerManager(
        model, method, preconditioner_interval=1, warn=lambda m: None, precondition_vectors=vectors
    )
    x, y = torch.randn(B, 4, C), torch.randint(0, V, (B, 4))
    for _ in range(2):
        model.zero_grad()
        manager.begin_step(batch_size=B)
        F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step()
    weight = "conv.parametrizations.weight"
    bare = {f"{weight}.original1"} if method == "psgd" else set()
    bare |= {"scale", f"{weight}.original0", "conv.bias"} if vectors else set()
    assert set(manager.layers) == {"head"} | bare
    reasons = manager.plain_parameters()
    assert method == "psgd" or "computed from other parameters" in reasons[f"{weight}.original1"]
    why = "precondition_vectors=True" if method == "psgd" else "not in a supported module"
    assert vectors or why in reasons["scale"]
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, plain[name]) == (not name.startswith("head") and name not in bare), name
