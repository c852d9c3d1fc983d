"""KFACCallback inside Lightning's loop: accumulation, precision, manual optimization, clipping, validation and
teardown (checkpoint resume for every method: test_methods_lightning)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_soo import KFACCallback
from tests.cases import MLP, LossRecorder, ManualMLP, trainer


def _factors(cb: KFACCallback) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (s["a"], s["b"]) for name, s in cb.state_dict()["layers"].items()}


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_hooks_removed_after_fit() -> None:
    model = MLP()
    cb = KFACCallback()
    trainer(max_steps=5, callbacks=[cb]).fit(model)
    assert _hooks(model) == 0
    assert cb.state_dict()["counters"]["refreshes"] > 0


def test_accumulation_equals_big_batch() -> None:
    """4 micro-batches of 8 give the factors and the update of one batch of 32 (float64)."""
    results = []
    for batch, acc in ((32, 1), (8, 4)):
        torch.manual_seed(0)
        model = MLP(batch_size=batch).double()
        cb = KFACCallback(factor_decay=0.5, preconditioner_interval=1, kl_clip=None)
        trainer(max_steps=3, callbacks=[cb], accumulate_grad_batches=acc, precision="64-true").fit(model)
        results.append((_factors(cb), [p.detach().clone() for p in model.parameters()]))
    (f1, p1), (f2, p2) = results
    for name in f1:
        torch.testing.assert_close(f1[name][0], f2[name][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f1[name][1], f2[name][1], rtol=1e-10, atol=1e-12)
    for a, b in zip(p1, p2, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_validation_is_not_captured() -> None:
    """Factors are the same with validation (and a sanity check) interleaved as without."""
    factors = []
    for val in (False, True):
        torch.manual_seed(0)
        model = MLP()
        cb = KFACCallback()
        kwargs = {"val_check_interval": 3, "num_sanity_val_steps": 2} if val else {"limit_val_batches": 0}
        trainer(max_steps=8, callbacks=[cb], **kwargs).fit(model)
        factors.append(_factors(cb))
    for name in factors[0]:
        torch.testing.assert_close(factors[0][name][0], factors[1][name][0])
        torch.testing.assert_close(factors[0][name][1], factors[1][name][1])


def test_gradients_are_rewritten_and_clipping_applies_after() -> None:
    norms: list[float] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            loss = closure()  # Lightning's closure: forward, backward, preconditioning, clipping
            grads = [p.grad.reshape(-1) for g in self.param_groups for p in g["params"]]
            norms.append(float(torch.cat(grads).norm()))
            super().step()
            return loss

    class Model(MLP):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return Recording(self.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    model = Model()
    cb = KFACCallback(kl_clip=None)
    trainer(max_steps=6, callbacks=[cb], gradient_clip_val=0.01).fit(model)
    assert len(norms) == 6 and max(norms) <= 0.01 * (1 + 1e-4)


def test_manual_optimization() -> None:
    torch.manual_seed(0)
    auto, manual = MLP(), ManualMLP()
    manual.load_state_dict(auto.state_dict())
    params = []
    for model in (auto, manual):
        cb = KFACCallback()
        trainer(max_steps=5, callbacks=[cb]).fit(model)
        assert cb.state_dict()["counters"]["refreshes"] > 0
        params.append([p.detach() for p in model.parameters()])
    for a, b in zip(*params, strict=False):  # same data, same maths: manual and automatic agree
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_mixed() -> None:
    torch.manual_seed(0)
    model = MLP()
    cb = KFACCallback()
    rec = LossRecorder()
    trainer(max_steps=10, callbacks=[cb, rec], precision="bf16-mixed").fit(model)
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    for a, b in _factors(cb).values():
        assert a.dtype == torch.float32 and b.dtype == torch.float32
        assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_fp16_loss_scale_is_undone() -> None:
    """Under fp16 with a GradScaler the captured output gradients carry the loss scale; B must not."""
    b_traces = []
    for plugins in (None, [MixedPrecision("16-mixed", "cpu")]):
        torch.manual_seed(0)
        model = MLP()
        cb = KFACCallback(factor_decay=0.0)
        trainer(max_steps=1, callbacks=[cb], plugins=plugins).fit(model)
        b_traces.append({name: float(b.trace()) for name, (_, b) in _factors(cb).items()})
    for name, t in b_traces[0].items():
        assert b_traces[1][name] == pytest.approx(t, rel=0.05)


def test_unsupported_strategy_is_refused() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    cb = KFACCallback()
    fake_trainer = type("FakeTrainer", (), {"strategy": object.__new__(FSDPStrategy), "world_size": 1})()
    with pytest.raises(RuntimeError, match="FSDPStrategy"):
        cb.setup(fake_trainer, MLP(), "fit")


def test_two_preconditioner_callbacks_are_refused() -> None:
    """Two methods in one Trainer would each rewrite the gradient in turn (one applied to the other's output): an
    error at set-up names them, before any step."""
    from lightning_soo import ShampooCallback

    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"2 preconditioner callbacks .*\(KFACCallback, ShampooCallback\)"):
        trainer(max_steps=2, callbacks=[KFACCallback(), ShampooCallback()]).fit(model)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_a_first_step_that_raises_leaves_no_hook_or_census_behind() -> None:
    """The first statistics step runs under the census's ``TorchFunctionMode`` and global module hooks; a
    ``training_step`` that raised left them on for every later torch call in the process, and the layers' hooks on
    the model (Lightning does not call ``teardown`` after an exception)."""
    import torch.nn.modules.module as module_hooks

    class Raises(MLP):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self(batch[0])
            raise RuntimeError("boom")

    model = Raises()
    modes, hooks = torch._C._len_torch_function_stack(), len(module_hooks._global_forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=2, callbacks=[KFACCallback()]).fit(model)
    assert torch._C._len_torch_function_stack() == modes
    assert len(module_hooks._global_forward_hooks) == hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
