"""Trainable parameters outside every layer capture knows (norms' scales and shifts, litgpt's bare LoRA adapters, a
scalar, class tokens and position tables) are layers of their own for the methods that fit from the gradient
(``ParameterAdapter``): PSGD preconditions them, as Li's Kron and heavyball's do, matrices always, vectors and
scalars with ``precondition_vectors`` (a diagonal factor); Shampoo with ``statistics="gradient"`` too. K-FAC,
Gauss-Newton and per-example Shampoo leave them plain and say which methods would take them. Checked in float64
against the explicit Kronecker product of the layer's factors applied to the flattened gradient, and against a
standalone preconditioner of the same shape fed the same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soo import PreconditionerManager
from lightning_soo.capture import discover
from lightning_soo.capture.gradient_only import ParameterAdapter
from lightning_soo.preconditioners import PSGD
from tests.reference import newton_fit_conditions


class Odd(nn.Module):
    """A linear layer, a LayerNorm, a scalar gate, a (1, L, d) position table and a 4-d bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.gate = nn.Parameter(torch.tensor(0.7))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 4, 5))
        self.mix = nn.Parameter(0.3 * torch.randn(2, 5, 1, 3))  # 4-d: no experts
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, 4, 6)
        h = self.gate * self.norm(self.a(x)) + self.pos
        return self.head(h).mean(1) + torch.einsum("bd,edo->bo", h.mean(1), self.mix.squeeze(2))


MATRICES = {"norm.weight": (1, 5), "norm.bias": (1, 5), "gate": (1, 1), "pos": (4, 5), "mix": (2, 15)}


def _run(method: str, steps: int = 4, **kw: object) -> tuple[nn.Module, PreconditionerManager, list, list[str]]:
    torch.manual_seed(0)
    model = Odd().double()
    messages: list[str] = []
    manager = PreconditionerManager(model, method, warn=messages.append, **kw)
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        x, y = torch.randn(8, 4, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
        model.zero_grad()
        manager.begin_step(batch_size=8)
        F.cross_entropy(model(x), y).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        manager.step()
        history.append((plain, {n: p.grad.clone() for n, p in model.named_parameters()}))
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.05 * p.grad)
    return model, manager, history, messages


def test_discovery_views_each_bare_parameter_as_a_matrix() -> None:
    specs, plain, _ = discover(Odd())
    views = {s.name: s.adapter for s in specs if isinstance(s.adapter, ParameterAdapter)}
    assert {n: a.shape for n, a in views.items()} == MATRICES
    assert {n for n, a in views.items() if a.vector} == {"norm.weight", "norm.bias", "gate"}
    assert plain == {}


def _dense(p: Tensor) -> Tensor:
    return torch.diag(p) if p.dim() == 1 else p


def test_psgd_preconditions_every_parameter_as_the_kronecker_product_says() -> None:
    """The rewritten gradient of each parameter layer is ``(P_l ⊗ P_r) vec(G)`` for its gradient as the matrix of
    ``MATRICES`` (explicit Kronecker product), and what a standalone PSGD of that shape makes of the same gradients;
    vectors and scalars keep diagonal factors, matrices dense ones."""
    model, manager, history, messages = _run(
        "psgd", preconditioner_interval=1, grafting=None, precondition_vectors=True
    )
    assert not messages
    cpu = torch.device("cpu")
    standalone = {
        n: PSGD(*shape, dtype=torch.float64, device=cpu, input_diagonal=shape[0] == 1) for n, shape in MATRICES.items()
    }
    for step, (plain, rewritten) in enumerate(history):
        for name, shape in MATRICES.items():
            pre = standalone[name]
            g = plain[name].reshape(shape)
            pre.observe_grad(g)
            pre.close_statistics(1.0)
            pre.refresh(0.0)
            expected = pre.precondition(g).reshape(plain[name].shape)
            torch.testing.assert_close(rewritten[name], expected, rtol=1e-12, atol=1e-14)
            if step == len(history) - 1:
                layer = manager.wiring.layers[name].preconditioner
                assert isinstance(layer, PSGD)
                p_l, p_r = _dense(layer.p_l), _dense(layer.p_r)
                kron = torch.kron(p_l, p_r) @ g.reshape(-1)
                torch.testing.assert_close(rewritten[name].reshape(-1), kron, rtol=1e-12, atol=1e-14)
                assert layer.p_l.dim() == layer.p_r.dim() == (1 if shape[0] == 1 else 2)  # vectors: diagonal Q
                assert not torch.equal(rewritten[name], plain[name])
    assert all(not torch.equal(history[-1][1][n], history[-1][0][n]) for n, _ in model.named_parameters())


def test_gradient_shampoo_takes_them_and_hook_methods_say_who_would() -> None:
    _, manager, history, _ = _run("shampoo", steps=2, statistics="gradient", precondition_vectors=True)
    assert set(MATRICES) <= set(manager.wiring.layers)
    for name, shape in MATRICES.items():  # vectors: a diagonal right factor (no eigendecomposition of d x d)
        assert manager.wiring.layers[name].preconditioner.right.diagonal == (shape[0] == 1)
    assert all(not torch.equal(history[-1][1][n], history[-1][0][n]) for n in MATRICES)
    for method in ("kfac", "shampoo", "gauss_newton"):
        _, manager, history, messages = _run(method, steps=2)
        assert not set(MATRICES) & set(manager.wiring.layers)
        assert all(torch.equal(history[-1][1][n], history[-1][0][n]) for n in MATRICES)
        assert "norm.weight: LayerNorm: not in a supported module (PSGD and Shampoo with statistics='gradient'" in (
            "\n".join(messages)
        )


def test_equal_vectors_fit_as_one_stack_on_the_accelerators_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an accelerator the vectors of one length fit as one stack (``fit_stacked_diagonal``: the norm's scale and
    shift here): the same updates as one by one on that path, and as the host's path."""
    from lightning_soo import linalg

    runs = []
    for host, batch in ((True, False), (False, False), (False, True)):
        monkeypatch.setattr(linalg, "HOST_DECIDES_ON_CPU", host)
        monkeypatch.setattr(linalg, "BATCH_ON_CPU", batch)
        runs.append(_run("psgd", steps=4, precondition_vectors=True)[2])
    for other in runs[1:]:
        for (plain, rewritten), (plain2, rewritten2) in zip(runs[0], other, strict=True):
            torch.testing.assert_close(plain2, plain, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(rewritten2, rewritten, rtol=1e-12, atol=1e-15)


def test_vectors_stay_plain_unless_asked_for() -> None:
    """By default PSGD takes the matrices outside layers and leaves vectors and scalars plain, saying how to have
    them preconditioned; ``precondition_vectors`` is checked at construction."""
    _, manager, history, messages = _run("psgd", steps=2)
    assert {"pos", "mix"} <= set(manager.wiring.layers)
    assert not {"norm.weight", "norm.bias", "gate"} & set(manager.wiring.layers)
    assert all(torch.equal(history[-1][1][n], history[-1][0][n]) for n in ("norm.weight", "norm.bias", "gate"))
    assert "gate: Odd: a vector outside the layers capture knows (precondition_vectors=True" in "\n".join(messages)
    with pytest.raises(ValueError, match="precondition_vectors"):
        PreconditionerManager(Odd(), "psgd", precondition_vectors="yes")


def test_exclude_patterns_reach_parameters_and_their_modules() -> None:
    manager = PreconditionerManager(Odd(), "psgd", exclude=["norm", "pos"], precondition_vectors=True)
    assert {"norm.weight", "norm.bias", "pos"} <= set(manager.wiring.excluded)
    assert {"gate", "mix", "a", "head"} <= set(manager.wiring.layers)


def test_state_round_trip_continues_the_same_run() -> None:
    """A checkpoint of the parameter layers' Q (weights_only) loaded into a fresh manager continues identically."""
    model, manager, _, _ = _run("psgd", steps=3, precondition_vectors=True)
    state = manager.state_dict()
    path_state = torch.load(_saved(state), weights_only=True)
    twin = Odd().double()
    twin.load_state_dict(model.state_dict())
    other = PreconditionerManager(twin, "psgd", precondition_vectors=True)
    other.load_state_dict(path_state)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 4, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
    for m, man in ((model, manager), (twin, other)):
        m.zero_grad()
        man.begin_step(batch_size=8)
        F.cross_entropy(m(x), y).backward()
        man.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)


def _saved(state: dict) -> object:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("method", ["psgd", "kfac"])
def test_litgpt_style_bare_lora_is_preconditioned_by_psgd(method: str) -> None:
    """litgpt's bare ``lora_A``/``lora_B`` (used with ``@``): PSGD rewrites every trainable gradient; K-FAC cannot
    capture them and says so."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).requires_grad_(False)
    lora_a, lora_b = nn.Parameter(torch.randn(2, 6)), nn.Parameter(0.1 * torch.randn(4, 2))
    model = nn.Module()
    model.linear, model.lora_A, model.lora_B = linear, lora_a, lora_b
    messages: list[str] = []
    manager = PreconditionerManager(model, method, warn=messages.append)
    for _ in range(2):
        x = torch.randn(16, 6)
        model.zero_grad()
        manager.begin_step()
        out = linear(x) + x @ lora_a.T @ lora_b.T
        out.square().mean().backward()
        plain = [lora_a.grad.clone(), lora_b.grad.clone()]
        manager.step()
    changed = [not torch.equal(p.grad, g) for p, g in zip((lora_a, lora_b), plain, strict=True)]
    assert changed == ([True, True] if method == "psgd" else [False, False])
    assert any("lora_A" in m for m in messages) == (method != "psgd")


def test_newton_form_fits_the_inverse_hessian_of_a_bare_parameter() -> None:
    """The Newton form (``fit_hessian``) hands a bare ``(4, 1, 3)`` parameter its Hessian-vector products in its
    matrix view: on ``½ tr(Wᵀ A W B)`` (Hessian ``A ⊗ B`` for ``W`` the ``4 x 3`` view) P·H tends to the identity,
    as for a linear layer (``tests/preconditioners/test_psgd.py``)."""
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(4, 1, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    fitted, hessian = newton_fit_conditions(model, "w", lambda: model.w.squeeze(1))
    assert fitted < 1.5 and hessian > 90
