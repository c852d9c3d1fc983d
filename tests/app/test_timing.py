"""Wall-clock to a target accuracy (``lightning_soo.app.timing``): the helpers on synthetic trajectories, and the
clock on a short real run."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_soo.app.compare import sgd_targets, table
from lightning_soo.app.timing import AccuracyClock, Point, best_accuracy, fastest, time_to_target
from lightning_soo.app.train import RunResult, train

SGD = [Point(0, 0.0, 0.10), Point(10, 1.0, 0.50), Point(20, 2.0, 0.80), Point(30, 3.0, 0.78), Point(40, 4.0, 0.80)]
KFAC = [Point(0, 0.0, 0.10), Point(5, 0.9, 0.82), Point(10, 1.8, 0.85)]
SLOW = [Point(0, 0.0, 0.10), Point(100, 9.0, 0.81)]


def test_time_to_target_is_the_first_point_reaching_it() -> None:
    assert best_accuracy(SGD) == 0.80
    assert time_to_target(SGD, 0.80) == Point(20, 2.0, 0.80)  # the first of the two points at 0.80
    assert time_to_target(KFAC, 0.80) == Point(5, 0.9, 0.82)
    assert time_to_target(SGD, 0.81) is None  # never
    assert time_to_target([], 0.5) is None


def test_fastest_setting_is_chosen_by_seconds() -> None:
    assert fastest([SLOW, KFAC], 0.80) == (1, Point(5, 0.9, 0.82))
    assert fastest([SGD], 0.9) == (None, None)
    # the ratio a user reads: K-FAC's seconds over SGD's to SGD's best
    assert fastest([KFAC], best_accuracy(SGD))[1].seconds / time_to_target(SGD, best_accuracy(SGD)).seconds == 0.45


def test_compare_column_from_trajectories() -> None:
    runs = [
        RunResult("sgd", 64, 0.2, 1, 0.5, 0.8, 4.0, trajectory=SGD),
        RunResult("kfac", 64, 0.2, 1, 0.4, 0.85, 1.8, trajectory=KFAC),
        RunResult("adamw", 64, 3e-3, 1, 0.6, 0.7, 4.0, trajectory=[Point(0, 0.0, 0.1), Point(9, 4.0, 0.7)]),
    ]
    targets = sgd_targets(runs)
    assert targets[64]["target"] == 0.80
    assert targets[64]["hits"] == {"sgd": SGD[2], "kfac": KFAC[1], "adamw": None}
    text = table(runs, targets)
    assert "0.800: 2.00 s / 20" in text and "0.800: 0.90 s / 5" in text and "never" in text
    assert "-" in table(runs[1:], sgd_targets(runs[1:])).splitlines()[2].split()[-1]  # no SGD run: no column value


class _SlowModel(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            time.sleep(0.05)  # a slow evaluation: must stay off the clock
        return super().forward(x)


def test_clock_excludes_evaluation_time() -> None:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _SlowModel(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    clock = AccuracyClock(data, every_n_steps=1)
    trainer = L.Trainer(max_steps=8, callbacks=[clock], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    assert [p.steps for p in clock.points] == list(range(9))  # the start, then every step
    assert clock.excluded >= 9 * 0.05
    assert clock.points[-1].seconds < 9 * 0.05  # eight plain steps take far less than the nine sleeps


@pytest.mark.parametrize("method", ["sgd", "kfac"])
def test_train_records_a_trajectory(method: str) -> None:
    from lightning_soo.app.data import digits

    x, y = digits()[0].tensors
    data = (TensorDataset(x[:256], y[:256]), digits()[1])
    r = train(method, batch_size=64, epochs=2, lr=0.2, data=data, hidden=16, track_accuracy=True)
    assert [p.steps for p in r.trajectory] == [0, 4, 8]  # the start and every epoch's end
    assert all(a.seconds <= b.seconds for a, b in zip(r.trajectory, r.trajectory[1:], strict=False))
    assert r.trajectory[-1].accuracy == pytest.approx(r.test_acc, abs=1e-6)
    assert r.trajectory[-1].seconds <= r.seconds + 0.05
