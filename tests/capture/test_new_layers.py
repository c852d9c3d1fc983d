"""Weights used outside ``nn.Linear``'s forward, in float64 against references: Hugging Face's ``Conv1D`` and
``nn.MultiheadAttention`` against the same maths written with ``nn.Linear`` (itself tested against dense
definitions), a tied embedding and head against the dense definition of its combined factors, and a weight used by
``F.linear`` outside its modules left plain with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager
from lightning_soo.preconditioners.kfac import combine_pairs
from tests.reference import kfac_dense

pytestmark = pytest.mark.usefixtures("float64")
METHODS = [
    ("kfac", {"inverse": "eigen", "factor_decay": 0.0}),
    ("kfac", {"inverse": "cholesky", "factor_decay": 0.0}),
    ("shampoo", {}),
    ("gauss_newton", {}),
    ("psgd", {}),
]


class Conv1D(nn.Module):
    """Hugging Face's Conv1D, written from its definition: weight (nx, nf), ``addmm``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


def _step(model: nn.Module, loss_fn, method: str, options: dict) -> dict[str, Tensor]:
    """One statistics step with a refresh; the rewritten gradients by parameter name."""
    manager = PreconditionerManager(model, method, kl_clip=None, warn=lambda m: None, **options)
    manager.begin_step()
    loss_fn(model).backward()
    manager.step()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("method", "options"), METHODS)
def test_conv1d_is_a_transposed_linear(method: str, options: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5))
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for c, ln in ((conv[0], lin[0]), (conv[2], lin[2])):
            ln.weight.copy_(c.weight.T)
            ln.bias.copy_(c.bias)
    x, y = torch.randn(3, 6, 4), torch.randn(3, 6, 3)
    got = _step(conv, lambda m: F.mse_loss(m(x), y), method, options)
    ref = _step(lin, lambda m: F.mse_loss(m(x), y), method, options)
    for name in got:
        expected = ref[name].T if name.endswith("weight") else ref[name]
        assert not torch.equal(got[name], conv.get_parameter(name).grad * 0)
        torch.testing.assert_close(got[name], expected, rtol=1e-9, atol=1e-12)


class ManualAttention(nn.Module):
    """``nn.MultiheadAttention``'s maths with ``nn.Linear`` projections (packed qkv, or q and kv, or q, k, v)."""

    def __init__(self, mha: nn.MultiheadAttention, split: str) -> None:
        super().__init__()
        e, self.heads, self.split = mha.embed_dim, mha.num_heads, split
        w = mha.in_proj_weight if mha._qkv_same_embed_dim else None
        b = mha.in_proj_bias
        shapes = {"qkv": [3 * e], "q_kv": [e, 2 * e], "q_k_v": [e, e, e]}[split]
        ins = [e] * len(shapes) if w is not None else [e, mha.kdim, mha.vdim]
        self.proj = nn.ModuleList(nn.Linear(i, o) for i, o in zip(ins, shapes, strict=True))
        with torch.no_grad():
            weights = [w] if split == "qkv" else (w.split(shapes) if w is not None else None)
            if weights is None:
                weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
            for lin, wt, bt in zip(self.proj, weights, b.split(shapes), strict=True):
                lin.weight.copy_(wt)
                lin.bias.copy_(bt)
        self.out = copy.deepcopy(mha.out_proj)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # batch first
        if self.split == "qkv":
            qs, ks, vs = self.proj[0](q).chunk(3, dim=-1)
        elif self.split == "q_kv":
            qs, (ks, vs) = self.proj[0](q), self.proj[1](k).chunk(2, dim=-1)
        else:
            qs, ks, vs = self.proj[0](q), self.proj[1](k), self.proj[2](v)
        b, t, e = qs.shape
        heads = [z.reshape(b, z.shape[1], self.heads, e // self.heads).transpose(1, 2) for z in (qs, ks, vs)]
        y = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, t, e)
        return self.out(y)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "cross", "separate"])
@pytest.mark.parametrize(("method", "options"), METHODS[:1] + METHODS[2:4])
def test_multihead_attention_matches_its_linear_form(kind: str, batch_first: bool, method: str, options: dict) -> None:
    torch.manual_seed(0)
    kdim = 3 if kind == "separate" else None
    mha = nn.MultiheadAttention(6, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
    manual = ManualAttention(mha, {"self": "qkv", "cross": "q_kv", "separate": "q_k_v"}[kind])
    q = torch.randn(2, 5, 6)
    kv = q if kind == "self" else torch.randn(2, 4, kdim or 6)
    target = torch.randn(2, 5, 6)

    def mha_loss(m: nn.Module) -> Tensor:
        qt, kvt = (q, kv) if batch_first else (q.transpose(0, 1), kv.transpose(0, 1))
        args = (qt, qt, qt) if kind == "self" else (qt, kvt, kvt)  # self-attention: the same tensor (packed path)
        out = m(*args, need_weights=False)[0]
        return F.mse_loss(out if batch_first else out.transpose(0, 1), target)

    got = _step(mha, mha_loss, method, options)
    ref = _step(manual, lambda m: F.mse_loss(m(q, kv, kv), target), method, options)
    torch.testing.assert_close(got["out_proj.weight"], ref["out.weight"], rtol=1e-8, atol=1e-11)
    if kind == "self":  # one packed layer in both
        torch.testing.assert_close(got["in_proj_weight"], ref["proj.0.weight"], rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(got["in_proj_bias"], ref["proj.0.bias"], rtol=1e-8, atol=1e-11)
    elif kind == "separate":  # three layers in both
        for i, k in enumerate("qkv"):
            torch.testing.assert_close(got[f"{k}_proj_weight"], ref[f"proj.{i}.weight"], rtol=1e-8, atol=1e-11)
        bias = torch.cat([ref[f"proj.{i}.bias"] for i in range(3)])
        torch.testing.assert_close(got["in_proj_bias"], bias, rtol=1e-8, atol=1e-11)


def test_cross_attention_packed_projection_is_its_own_definition() -> None:
    """Cross-attention with a packed ``in_proj``: one layer; A pools the query and key/value inputs, B the
    zero-padded output gradients of the two blocks, each over all rows (the approximation in the docs)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    q, kv, target = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    manager = PreconditionerManager(mha, "kfac", inverse="eigen", factor_decay=0.0, kl_clip=None, damping=0.1)
    manager.begin_step()
    F.mse_loss(mha(q, kv, kv, need_weights=False)[0], target).backward()
    manager.step()
    pre = manager.layers["in_proj"].preconditioner
    manual = ManualAttention(mha, "q_kv")
    outs: list[Tensor] = []
    for lin in manual.proj:
        lin.register_forward_hook(lambda m, a, o: _keep(o, outs))
    F.mse_loss(manual(q, kv, kv), target).backward()
    dq, dkv = (o.grad.reshape(-1, o.shape[-1]) for o in outs)
    dq, dkv = dq * dq.shape[0], dkv * dkv.shape[0]  # the 1/N undo of each call
    d = torch.cat([F.pad(dq, (0, 8)), F.pad(dkv, (4, 0))])
    h = torch.cat([q.reshape(-1, 4), kv.reshape(-1, 4)])
    h = torch.cat([h, torch.ones(h.shape[0], 1)], 1)
    torch.testing.assert_close(pre.a, h.T @ h / h.shape[0])
    torch.testing.assert_close(pre.b, d.T @ d / d.shape[0])


def _keep(out: Tensor, outs: list, x: Tensor | None = None, inputs: list | None = None) -> None:
    """Forward-hook helper: keep the output (with its gradient) and the input."""
    out.retain_grad()
    outs.append(out)
    if inputs is not None:
        inputs.append(x)


class TiedLM(nn.Module):
    """Embedding, tanh MLP, head tied to the embedding (module tie, or ``F.linear`` with the embedding weight)."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.wte = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        if not functional:
            self.head.weight = self.wte.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = torch.tanh(self.fc(self.wte(tokens)))
        return F.linear(x, self.wte.weight) if self.functional else self.head(x)


def _tied_data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 7, (3, 5), generator=g), torch.randint(0, 7, (3, 5), generator=g)


def _tied_step(model: nn.Module, manager: PreconditionerManager) -> tuple[Tensor, Tensor]:
    """One optimizer-free step on ``_tied_data``: the embedding weight's (plain, rewritten) gradient."""
    tokens, labels = _tied_data()
    model.zero_grad()
    manager.begin_step()
    F.cross_entropy(model(tokens).reshape(-1, 7), labels.reshape(-1)).backward()
    plain = model.wte.weight.grad.clone()
    manager.step()
    return plain, model.wte.weight.grad.clone()


def test_tied_embedding_and_head_kfac_is_its_dense_definition() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    tokens, labels = _tied_data()
    rho = 0.05
    manager = PreconditionerManager(
        model, "kfac", inverse="eigen", factor_decay=0.0, kl_clip=None, damping=rho, max_factor_dim=4
    )
    assert set(manager.layers) == {"wte", "fc"}  # one layer for the tied weight
    manager.begin_step()
    emb_out, head_in, logits = [], [], []
    model.wte.register_forward_hook(lambda m, a, o: _keep(o, emb_out))
    model.head.register_forward_hook(lambda m, a, o: _keep(o, logits, a[0], head_in))
    F.cross_entropy(model(tokens).reshape(-1, 7), labels.reshape(-1)).backward()
    g = model.wte.weight.grad.T.clone()  # the layer's matrix: weightᵀ (D x V)
    manager.step()
    n = tokens.numel()
    de = emb_out[0].grad.reshape(-1, 4) * n  # per-token output gradients of the embedding use
    dh = logits[0].grad.reshape(-1, 7) * n  # ... and of the head use
    x = head_in[0].detach().reshape(-1, 4)
    one_hot = F.one_hot(tokens.reshape(-1), 7).double()
    pairs = [(de.T @ de / n, one_hot.T @ one_hot / n), (x.T @ x / n, (dh * dh).sum(0) / n)]  # V side > 4: diagonal
    pairs[0] = (pairs[0][0], pairs[0][1].diagonal())
    left, right = combine_pairs(pairs)
    dense = kfac_dense(right, left) + rho * torch.eye(28)
    expected = torch.linalg.solve(dense, g.reshape(-1)).reshape(4, 7)
    torch.testing.assert_close(model.wte.weight.grad.T, expected, rtol=1e-9, atol=1e-12)
    total = sum(
        (lu.diagonal().sum() if lu.dim() == 2 else lu.sum()) * (ru.diagonal().sum() if ru.dim() == 2 else ru.sum())
        for lu, ru in pairs
    )
    torch.testing.assert_close(left.diagonal().sum() * right.sum(), total)  # the trace of the sum is kept


def test_tied_weight_under_gauss_newton_stays_plain_and_psgd_takes_it() -> None:
    model = TiedLM()
    gn = PreconditionerManager(model, "gauss_newton", warn=lambda m: None)
    assert "wte" not in gn.layers and "wte.weight" in gn.skipped and "Embedding" in gn.skipped["wte.weight"]
    psgd = PreconditionerManager(model, "psgd", warn=lambda m: None)
    assert "wte" in psgd.layers


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_functional_head_is_captured_like_a_tied_module_head(method: str) -> None:
    """``F.linear(x, wte.weight)`` in the model's forward: the census on the first statistics step finds the call
    (the gradient of that step stays plain: the embedding's curvature alone must not be applied to the gradient of
    both uses), and from the next statistics step the call is a use of the tied layer, so every later update equals
    the one of the same model with the head as a tied ``nn.Linear`` (the dense definition is tested above)."""
    torch.manual_seed(0)
    functional, module = TiedLM(functional=True), TiedLM()
    module.load_state_dict({k: v for k, v in functional.state_dict().items() if k != "head.weight"}, strict=False)
    opts = {"factor_decay": 0.0} if method == "kfac" else {"beta": 0.0}
    managers = [PreconditionerManager(m, method, warn=lambda msg: None, **opts) for m in (functional, module)]
    for step in range(3):
        grads = [_tied_step(model, manager) for model, manager in zip((functional, module), managers, strict=True)]
        (f_plain, f_pre), (m_plain, m_pre) = grads
        torch.testing.assert_close(f_plain, m_plain)
        if step == 0:
            assert torch.equal(f_pre, f_plain)  # found this step: plain until its statistics are complete
        else:
            assert not torch.equal(f_pre, f_plain)
            torch.testing.assert_close(f_pre, m_pre, rtol=1e-5, atol=1e-7)
    assert [use.role for use in managers[0].layers["wte"].uses] == ["normal", "transposed"]
    assert "wte.weight" not in managers[0].skipped


class MatmulHead(TiedLM):
    """The head as ``x @ wte.weight.T``: a use the census sees but capture cannot take."""

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.tanh(self.fc(self.wte(tokens))) @ self.wte.weight.T


_bound_linear = F.linear  # bound by name before any model is built: patching ``F.linear`` does not reach it


class BoundHead(TiedLM):
    """The head as ``linear(x, wte.weight)`` with ``linear`` imported by name: the census sees an ``F.linear`` call,
    but capture's patch of the ``torch.nn.functional`` attribute never sees it fire."""

    def forward(self, tokens: Tensor) -> Tensor:
        return _bound_linear(torch.tanh(self.fc(self.wte(tokens))), self.wte.weight)


def test_a_call_capture_never_sees_leaves_the_weight_plain() -> None:
    torch.manual_seed(0)
    model = BoundHead(functional=True)
    warnings: list[str] = []
    manager = PreconditionerManager(model, "kfac", warn=warnings.append)
    for _ in range(3):
        plain, written = _tied_step(model, manager)
        assert torch.equal(written, plain)  # never the embedding's curvature on both uses' gradient
    assert "wte" not in manager.layers and "capture does not see" in manager.skipped["wte.weight"]
    assert manager.layers["fc"].preconditioner.ready


def test_uncapturable_use_outside_its_module_leaves_the_weight_plain() -> None:
    torch.manual_seed(0)
    model = MatmulHead(functional=True)
    warnings: list[str] = []
    manager = PreconditionerManager(model, "kfac", warn=warnings.append)
    assert "wte" in manager.layers
    for _ in range(2):
        plain, written = _tied_step(model, manager)
    assert "wte" not in manager.layers
    assert torch.equal(written, plain)  # plain
    assert "Embedding" in manager.skipped["wte.weight"]
    assert any("wte.weight: Embedding: weight also used by" in w for w in warnings)
    assert model.fc.weight.grad is not None and manager.layers["fc"].preconditioner.ready


@pytest.mark.parametrize("functional", [False, True])
def test_tied_layer_resumes_from_a_checkpoint(functional: bool) -> None:
    """A tied layer's statistics of both orientations (and, for a head made by ``F.linear``, the call uses the
    census found) come back from a checkpoint loaded with ``weights_only=True``: the resumed run's updates are the
    uninterrupted run's."""
    import io

    torch.manual_seed(0)
    model = TiedLM(functional=functional)
    manager = PreconditionerManager(model, "kfac", warn=lambda m: None)

    for _ in range(3):
        _tied_step(model, manager)
    buffer = io.BytesIO()
    torch.save(manager.state_dict(), buffer)
    buffer.seek(0)
    twin = TiedLM(functional=functional)
    twin.load_state_dict(model.state_dict())
    resumed = PreconditionerManager(twin, "kfac", warn=lambda m: None)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(2):
        torch.testing.assert_close(_tied_step(twin, resumed)[1], _tied_step(model, manager)[1], rtol=0, atol=0)
    assert [use.role for use in resumed.layers["wte"].uses] == ["normal", "transposed"]


class HeadFirstLM(TiedLM):
    """``TiedLM`` with the head registered before the embedding: the tied layer takes the head's orientation and
    the embedding's use (one-hot rows of the vocabulary, on the layer's output side) is the transposed one."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.functional = False
        self.head = nn.Linear(4, 7, bias=False)
        self.wte = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 4)
        self.wte.weight = self.head.weight


def test_a_tied_kfac_layer_is_the_same_whichever_module_comes_first() -> None:
    """The same tied model, head first: the embedding's tokens enter as one-hot rows on the output side (they used
    to be read as dense numbers, a crash), and every K-FAC update equals the embedding-first model's, whose dense
    definition is tested above (each orientation keeps its own pair of factors, the same in either order)."""
    torch.manual_seed(0)
    first, head_first = TiedLM().double(), HeadFirstLM().double()
    head_first.load_state_dict(first.state_dict())
    managers = [PreconditionerManager(m, "kfac", warn=lambda msg: None) for m in (first, head_first)]
    for _ in range(3):
        (a_plain, a), (b_plain, b) = (_tied_step(m, man) for m, man in zip((first, head_first), managers, strict=True))
        torch.testing.assert_close(b_plain, a_plain, rtol=1e-12, atol=1e-14)
        assert not torch.equal(b, b_plain)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert [use.role for use in managers[1].layers["head"].uses] == ["normal", "transposed"]


@pytest.mark.parametrize("head_first", [False, True], ids=["embedding-first", "head-first"])
def test_tied_embedding_and_head_shampoo_is_its_dense_definition(head_first: bool) -> None:
    """Shampoo's ``L`` and ``R`` of a tied layer are the sums of ``G_n G_nᵀ`` and ``G_nᵀ G_n`` over both uses'
    per-row gradients (the embedding's ``e_token δᵀ`` included), in the orientation of the module that comes
    first: embedding first, the one-hot vocabulary side is kept diagonal; head first, it is the output side, dense."""
    torch.manual_seed(0)
    model = HeadFirstLM() if head_first else TiedLM()
    tokens, labels = _tied_data()
    rho = 0.05
    options = {"damping_mode": "absolute", "grafting": None, "kl_clip": None, "beta": 0.0}
    manager = PreconditionerManager(model, "shampoo", damping=rho, **options)
    manager.begin_step()
    emb_out, head_in, logits = [], [], []
    model.wte.register_forward_hook(lambda m, a, o: _keep(o, emb_out))
    model.head.register_forward_hook(lambda m, a, o: _keep(o, logits, a[0], head_in))
    F.cross_entropy(model(tokens).reshape(-1, 7), labels.reshape(-1)).backward()
    layer_grad = (lambda: model.head.weight.grad) if head_first else (lambda: model.wte.weight.grad.T)
    g = layer_grad().clone()
    manager.step()
    n = tokens.numel()
    de, dh = emb_out[0].grad.reshape(-1, 4) * n, logits[0].grad.reshape(-1, 7) * n
    x = head_in[0].detach().reshape(-1, 4)
    one_hot = F.one_hot(tokens.reshape(-1), 7).double()
    rows = [torch.outer(d, xi) for d, xi in zip(dh, x, strict=True)]  # per-row gradients, V x D
    rows += [torch.outer(e, d) for e, d in zip(one_hot, de, strict=True)]
    rows = rows if head_first else [r.T for r in rows]
    left = sum(r @ r.T for r in rows) / (2 * n)
    right = sum(r.T @ r for r in rows) / (2 * n)
    right = right if head_first else torch.diag(right.diagonal())  # embedding first: the one-hot side, diagonal

    def root(m: Tensor) -> Tensor:
        lam, q = torch.linalg.eigh(m + rho * torch.eye(m.shape[0]))
        return q @ torch.diag(lam**-0.25) @ q.T

    torch.testing.assert_close(layer_grad(), root(left) @ g @ root(right), rtol=1e-9, atol=1e-12)
