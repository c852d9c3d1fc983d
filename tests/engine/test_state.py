"""Checkpoint state: the statistics are what is saved; derived state is rebuilt when the options that derive it
changed on resume; a statistic that does not fit its layer is a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager

pytestmark = pytest.mark.usefixtures("float64")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _train(manager: PreconditionerManager, model: nn.Module, steps: int) -> torch.Tensor:
    """``steps`` manager steps on fixed data; returns the last rewritten gradient of the first layer."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        model.zero_grad()
        manager.begin_step()
        (model(x) - y).square().mean().backward()
        manager.step()
    return model[0].weight.grad.clone()


def _resumed(method: str, saved: dict, **changes: object) -> tuple[PreconditionerManager, nn.Module]:
    model = _model()
    manager = PreconditionerManager(model, method, preconditioner_interval=1, kl_clip=None, **changes)
    manager.load_state_dict(saved)
    return manager, model


CHANGES = [
    ("kfac", {"inverse": "cholesky"}, {"inverse": "eigen"}),
    ("kfac", {"inverse": "eigen"}, {"inverse": "cholesky"}),
    ("kfac", {"max_factor_dim": 4096}, {"max_factor_dim": 4}),
    ("kfac", {"max_factor_dim": 4}, {"max_factor_dim": 4096}),
    ("kfac", {"damping": 1e-2}, {"damping": 1e-1}),
    ("shampoo", {"max_factor_dim": 1024}, {"max_factor_dim": 2}),
    ("shampoo", {"exponent": 0.25}, {"exponent": 0.5}),
    ("gauss_newton", {"damping_mode": "relative"}, {"damping_mode": "absolute"}),
    ("psgd", {"max_factor_dim": 4096}, {"max_factor_dim": 4}),
]


@pytest.mark.parametrize(("method", "before", "after"), CHANGES, ids=lambda v: str(v))
def test_changed_options_on_resume_rebuild_from_the_statistics(method: str, before: dict, after: dict) -> None:
    model = _model()
    manager = PreconditionerManager(model, method, preconditioner_interval=1, kl_clip=None, **before)
    _train(manager, model, 3)
    saved = manager.state_dict()
    messages: list[str] = []
    resumed, model2 = _resumed(method, saved, warn=messages.append, **after)
    assert any("rebuilt from the saved statistics" in m for m in messages)
    for layer in resumed.layers.values():
        assert layer.preconditioner.ready
    # the rebuilt preconditioner is the one a fresh manager with the new options builds from the same statistics
    fresh, model3 = _resumed(method, saved, **after)
    grads = [_train(m, mod, 1) for m, mod in ((resumed, model2), (fresh, model3))]
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1])


def test_kfac_dense_factors_loaded_into_diagonal_ones_keep_their_diagonal() -> None:
    model = _model()
    manager = PreconditionerManager(model, preconditioner_interval=1)
    _train(manager, model, 2)
    saved = manager.state_dict()
    resumed, _ = _resumed("kfac", saved, max_factor_dim=4)
    pre = resumed.layers["0"].preconditioner
    assert pre.a.dim() == 1 and pre.b.dim() == 1  # 7 and 5 are wider than 4
    torch.testing.assert_close(pre.a, saved["layers"]["0"]["a"].diagonal())
    back, _ = _resumed("kfac", resumed.state_dict(), max_factor_dim=4096)
    a = back.layers["0"].preconditioner.a
    assert a.dim() == 2 and torch.equal(a, a.mT)  # symmetric, never a corrupted vector-as-matrix


def test_same_options_resume_is_exact() -> None:
    model = _model()
    manager = PreconditionerManager(model, preconditioner_interval=2, kl_clip=None)
    _train(manager, model, 3)
    resumed, _ = _resumed("kfac", manager.state_dict())
    assert all(layer.preconditioner.ready for layer in resumed.layers.values())
    for name, layer in manager.layers.items():
        torch.testing.assert_close(resumed.layers[name].preconditioner.a_inv, layer.preconditioner.a_inv)


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_statistics_of_another_shape_are_a_clear_error(method: str) -> None:
    model = _model()
    manager = PreconditionerManager(model, method, preconditioner_interval=1)
    _train(manager, model, 2)
    saved = manager.state_dict()
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
    other = PreconditionerManager(wider, method, preconditioner_interval=1)
    with pytest.raises(ValueError, match=r"layer '0' does not fit the model: saved `\w+` has shape"):
        other.load_state_dict(saved)


def test_a_layer_without_state_in_the_checkpoint_refreshes_at_its_next_statistics_step() -> None:
    """A layer managed now but plain when the checkpoint was saved (an older version left it plain, or it was
    excluded) used to wait for the next scheduled refresh (10 steps by default) with its plain gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10))

    def run(manager: PreconditionerManager, steps: int) -> None:
        for _ in range(steps):
            x = torch.randint(0, 10, (4, 5))
            manager.begin_step(batch_size=4)
            nn.functional.cross_entropy(model(x).reshape(-1, 10), x.reshape(-1)).backward()
            manager.step()
            model.zero_grad()

    before = PreconditionerManager(model, "kfac", exclude=["0"], warn=lambda m: None)
    run(before, 3)
    state = before.state_dict()
    before.remove_hooks()
    after = PreconditionerManager(model, "kfac", warn=lambda m: None)
    after.load_state_dict(state)
    run(after, 1)
    assert all(layer.preconditioner.ready for layer in after.layers.values())
