"""Shampoo, Gauss-Newton and PSGD inside Lightning's loop, as K-FAC is in test_callback_lightning: training,
accumulation, manual optimization, bf16, resume under ``weights_only=True``, hooks removed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lightning_soo import GaussNewtonCallback, KFACCallback, PSGDCallback, ShampooCallback
from lightning_soo.callbacks import SecondOrderCallback
from tests.cases import MLP, LossRecorder, ManualMLP, trainer

METHODS: dict[str, Callable[..., SecondOrderCallback]] = {
    "kfac": lambda **kw: KFACCallback(preconditioner_interval=3, **kw),
    "shampoo": lambda **kw: ShampooCallback(preconditioner_interval=2, **kw),
    "gauss_newton": lambda **kw: GaussNewtonCallback(**kw),
    "psgd": lambda **kw: PSGDCallback(**kw),
    "psgd_hessian": lambda **kw: PSGDCallback(fit="hessian", **kw),
}


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", [m for m in METHODS if m != "kfac"])  # K-FAC: test_callback_lightning
def test_trains_and_cleans_up(name: str) -> None:
    torch.manual_seed(0)
    model, rec, cb = MLP(), LossRecorder(), METHODS[name]()
    trainer(max_steps=30, callbacks=[cb, rec], val_check_interval=10, num_sanity_val_steps=1).fit(model)
    losses = torch.tensor(rec.losses)
    assert torch.isfinite(losses).all() and losses[-5:].mean() < 0.7 * losses[:5].mean()
    counters = cb.state_dict()["counters"]
    assert counters["preconditioned_steps"] == 30 and counters["skipped_statistics"] == 0
    assert _hooks(model) == 0


@pytest.mark.parametrize("name", ["shampoo", "gauss_newton"])
def test_accumulation_equals_big_batch(name: str) -> None:
    """4 micro-batches of 8 update the parameters as one batch of 32 (float64)."""
    params = []
    for batch, acc in ((32, 1), (8, 4)):
        torch.manual_seed(0)
        model = MLP(batch_size=batch).double()
        cb = METHODS[name](kl_clip=None)
        trainer(max_steps=3, callbacks=[cb], accumulate_grad_batches=acc, precision="64-true").fit(model)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["shampoo", "gauss_newton", "psgd"])
def test_manual_optimization_equals_automatic(name: str) -> None:
    torch.manual_seed(0)
    auto, manual = MLP(), ManualMLP()
    manual.load_state_dict(auto.state_dict())
    params = []
    for model in (auto, manual):
        trainer(max_steps=5, callbacks=[METHODS[name]()]).fit(model)
        params.append([p.detach() for p in model.parameters()])
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hessian_fit_refuses_manual_optimization() -> None:
    with pytest.raises(RuntimeError, match="fit='whitening'"):
        trainer(max_steps=1, callbacks=[PSGDCallback(fit="hessian")]).fit(ManualMLP())


@pytest.mark.parametrize("name", ["shampoo", "gauss_newton", "psgd"])
def test_bf16_mixed(name: str) -> None:
    torch.manual_seed(0)
    rec, cb = LossRecorder(), METHODS[name]()
    trainer(max_steps=10, callbacks=[cb, rec], precision="bf16-mixed").fit(MLP())
    assert torch.isfinite(torch.tensor(rec.losses)).all()
    assert cb.state_dict()["counters"]["preconditioned_steps"] == 10


@pytest.mark.parametrize("name", METHODS)
def test_resume_continues_exactly(name: str, tmp_path) -> None:
    """20 steps straight equal 10 steps (one epoch), a checkpoint loaded with ``weights_only=True``, and 10 more."""

    def run(max_steps: int, ckpt: str | None = None, save: str | None = None) -> list[float]:
        torch.manual_seed(0)
        rec = LossRecorder()
        t = trainer(max_steps=max_steps, callbacks=[METHODS[name](), rec])
        t.fit(MLP(batch_size=16), ckpt_path=ckpt, weights_only=True if ckpt else None)
        if save:
            t.save_checkpoint(save)
        return rec.losses

    straight = run(20)
    path = str(tmp_path / "half.ckpt")
    first = run(10, save=path)
    state = torch.load(path, weights_only=True)["callbacks"]  # plain tensors and numbers only
    assert next(v for k, v in state.items() if k.endswith("Callback"))["steps"] == 10
    second = run(20, ckpt=path)
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(straight), rtol=1e-6, atol=0)


def test_a_reused_callback_starts_fresh_on_a_new_model(caplog: pytest.LogCaptureFixture) -> None:
    """One callback object: fit on model A, then on a wider model B: B starts at step 0 with its own state."""
    cb = KFACCallback(preconditioner_interval=2)
    trainer(max_steps=5, callbacks=[cb]).fit(MLP())
    assert cb.state_dict()["steps"] == 5
    wider = MLP(hidden=40)
    with caplog.at_level("INFO"):
        trainer(max_steps=3, callbacks=[cb]).fit(wider)
    state = cb.state_dict()
    assert state["steps"] == 3
    assert state["layers"]["net.0"]["a"].shape == (13, 13) and state["layers"]["net.0"]["b"].shape == (40, 40)
    assert any("starting fresh" in r.getMessage() for r in caplog.records)


def test_a_callback_fitted_again_on_the_same_model_continues() -> None:
    cb, model = KFACCallback(preconditioner_interval=2), MLP()
    trainer(max_steps=4, callbacks=[cb]).fit(model)
    trainer(max_steps=3, callbacks=[cb]).fit(model)
    assert cb.state_dict()["steps"] == 7


@pytest.mark.parametrize(("before", "after"), [("cholesky", "eigen"), ("eigen", "cholesky")])
def test_resume_with_another_inverse_mode(before: str, after: str, tmp_path) -> None:
    path = str(tmp_path / "k.ckpt")
    t = trainer(max_steps=6, callbacks=[KFACCallback(inverse=before, preconditioner_interval=2)])
    t.fit(MLP())
    t.save_checkpoint(path)
    torch.manual_seed(0)
    rec, cb = LossRecorder(), KFACCallback(inverse=after, preconditioner_interval=2)
    trainer(max_steps=10, callbacks=[cb, rec]).fit(MLP(), ckpt_path=path, weights_only=True)
    assert len(rec.losses) == 4 and torch.isfinite(torch.tensor(rec.losses)).all()
    assert cb.state_dict()["counters"]["preconditioned_steps"] == 10
