"""CurvatureScheduler in Lightning: the freeze schedule, quality logging without side effects, the dashboard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_soo import KFACCallback
from lightning_soo.callbacks.scheduler import CurvatureScheduler
from tests.cases import MLP, LossRecorder, trainer


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_frequent_phase_then_frozen(tmp_path: Path) -> None:
    """max_steps=20, frequent_fraction=0.25: refresh at 0, 2, 4, frozen from step 5 on, hooks detached."""
    model = MLP()
    kfac = KFACCallback()
    refreshes: list[int] = []

    class Watch(LossRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            m = kfac.manager
            if len(refreshes) < m.counters["refreshes"] // 2:  # two layers per refresh
                refreshes.append(m.steps - 1)
            if m.steps == 6:
                assert m.frozen and _hooks(pl_module) == 0

    sched = CurvatureScheduler(frequent_fraction=0.25, frequent_interval=2, interval=None, quality_every_n_steps=None)
    t = trainer(max_steps=20, callbacks=[kfac, sched, Watch()])
    t.fit(model)
    assert refreshes == [0, 2, 4]
    state = kfac.state_dict()
    assert state["schedule"] == {"frozen": True, "frozen_at": 5}
    assert state["counters"]["preconditioned_steps"] == 20
    # resuming keeps the freeze
    path = tmp_path / "frozen.ckpt"
    t.save_checkpoint(path)
    model2, kfac2 = MLP(), KFACCallback()
    sched2 = CurvatureScheduler(frequent_fraction=0.25, frequent_interval=2, interval=None, quality_every_n_steps=None)
    trainer(max_steps=25, callbacks=[kfac2, sched2]).fit(model2, ckpt_path=path, weights_only=True)
    assert kfac2.state_dict()["schedule"]["frozen"] and kfac2.state_dict()["counters"]["refreshes"] == 6


@pytest.mark.parametrize("scheduler_first", [False, True])
def test_resumed_past_the_frequent_phase_freezes_at_its_first_step(tmp_path: Path, scheduler_first: bool) -> None:
    """5 steps without a freeze, then resumed for 20 with a frequent phase of 5: frozen from the first resumed step,
    as the uninterrupted run (the schedule is set before that step begins, whichever callback comes first)."""

    def fit(max_steps: int, fraction: float, ckpt: Path | None = None) -> tuple[KFACCallback, list[bool]]:
        kfac = KFACCallback()
        sched = CurvatureScheduler(
            frequent_fraction=fraction, frequent_interval=2, interval=None, quality_every_n_steps=None
        )
        collecting: list[bool] = []

        class Watch(LossRecorder):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                collecting.append(_hooks(pl_module) > 0)

        callbacks = [sched, kfac] if scheduler_first else [kfac, sched]
        t = trainer(max_steps=max_steps, callbacks=[*callbacks, Watch()])
        t.fit(MLP(), ckpt_path=ckpt, weights_only=True)
        if ckpt is None:
            t.save_checkpoint(tmp_path / "five.ckpt")
        return kfac, collecting

    first, _ = fit(5, 1.0)
    assert not first.state_dict()["schedule"]["frozen"]
    resumed, collecting = fit(20, 0.25, tmp_path / "five.ckpt")
    assert resumed.state_dict()["schedule"] == {"frozen": True, "frozen_at": 5}
    assert not any(collecting)  # no statistics captured after the resume
    assert resumed.state_dict()["counters"]["refreshes"] == 6  # steps 0, 2 and 4, two layers each


def test_quality_has_no_side_effects_and_reaches_tensorboard(tmp_path: Path) -> None:
    runs = []
    for quality in (None, 2):
        torch.manual_seed(0)
        model = MLP()
        rec = LossRecorder()
        sched = CurvatureScheduler(frequent_fraction=0.0, interval=10, quality_every_n_steps=quality, num_probes=2)
        logger = TensorBoardLogger(str(tmp_path), name="run", version=str(quality))
        t = trainer(max_steps=12, callbacks=[KFACCallback(), sched, rec], logger=logger, log_every_n_steps=2)
        t.fit(model)
        runs.append((rec.losses, [p.detach().clone() for p in model.parameters()], dict(t.logged_metrics)))
    (loss_a, params_a, logged_a), (loss_b, params_b, logged_b) = runs
    assert loss_a == loss_b  # the diagnostic changed nothing in training
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
    assert logged_a.keys() == logged_b.keys() and all(torch.equal(logged_a[k], logged_b[k]) for k in logged_a)

    events = EventAccumulator(str(tmp_path / "run" / "2"), size_guidance={"tensors": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"soo/quality_index/model", "soo/criterion/model", "soo/alpha_star/model", "soo/lr"} <= tags
    assert {"soo/quality_index/net.0", "soo/damping", "soo/refreshes", "soo/frozen"} <= tags
    assert any(t.startswith("soo/ms_per_step/") for t in tags) and "soo/factor_memory_mb" in tags
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    assert {"soo/log10_spectrum/net.0", "soo/log10_spectrum/net.2"} <= set(events.Tags()["histograms"])
    index = [e.value for e in events.Scalars("soo/quality_index/model")]
    assert len(index) == 6 and all(0 < v < 10 for v in index)


def test_needs_exactly_one_preconditioner_callback() -> None:
    with pytest.raises(RuntimeError, match="exactly one preconditioner callback"):
        trainer(max_steps=1, callbacks=[CurvatureScheduler()]).fit(MLP())


def test_validation_names_the_argument() -> None:
    with pytest.raises(ValueError, match="frequent_fraction"):
        CurvatureScheduler(frequent_fraction=1.5)
    with pytest.raises(ValueError, match="interval"):
        CurvatureScheduler(interval=0)
