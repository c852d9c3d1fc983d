"""One training run on the digits: the model a user would write, a method name, a result. Shared by ``demo`` and
``compare``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_soo.app.data import digits
from lightning_soo.app.timing import AccuracyClock, Point


class DigitsMLP(L.LightningModule):
    """A plain MLP classifier trained with SGD and momentum, as anyone would write it."""

    def __init__(
        self,
        hidden: int = 128,
        lr: float = 0.1,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        in_features: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp["optimizer"] == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=hp["lr"])
        return torch.optim.SGD(self.parameters(), lr=hp["lr"], momentum=hp["momentum"])


class _Curve(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


@dataclass
class RunResult:
    method: str
    batch_size: int
    lr: float
    epochs: int
    final_train_loss: float
    test_acc: float
    seconds: float
    curve: list[float] = field(default_factory=list)
    trajectory: list[Point] = field(default_factory=list)


def make_callback(method: str, **options: Any) -> Callback | None:
    """The library callback for ``method`` (None for the plain optimizers ``sgd`` and ``adamw``)."""
    if method in ("sgd", "adamw"):
        return None
    import lightning_soo.callbacks as cbs

    classes = {
        "kfac": "KFACCallback",
        "shampoo": "ShampooCallback",
        "gauss_newton": "GaussNewtonCallback",
        "psgd": "PSGDCallback",
    }
    if method not in classes or not hasattr(cbs, classes[method]):
        raise SystemExit(f"unknown or unavailable method {method!r}")
    return getattr(cbs, classes[method])(**options)


def train(
    method: str,
    *,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int = 0,
    log_dir: Path | None = None,
    data: tuple[TensorDataset, TensorDataset] | None = None,
    extra_callbacks: list[Callback] | None = None,
    hidden: int = 128,
    track_accuracy: bool = False,
    eval_every_n_steps: int | None = None,
    **options: Any,
) -> RunResult:
    """Train ``DigitsMLP`` with SGD (+ the method's callback) and evaluate test accuracy.

    ``track_accuracy`` records (steps, seconds, test accuracy) every ``eval_every_n_steps`` steps (None: every epoch)
    into ``RunResult.trajectory``, with the evaluation time excluded from the clock and from ``seconds``."""
    L.seed_everything(seed, verbose=False)
    train_set, test_set = data or digits(seed=0)
    in_features = int(train_set[0][0].numel())
    model = DigitsMLP(hidden=hidden, lr=lr, optimizer="adamw" if method == "adamw" else "sgd", in_features=in_features)
    curve = _Curve()
    callbacks: list[Callback] = [curve, *(extra_callbacks or [])]
    extra = make_callback(method, **options)
    if extra is not None:
        callbacks.insert(1, extra)
    clock = AccuracyClock(test_set, eval_every_n_steps) if track_accuracy else None
    if clock is not None:
        callbacks.append(clock)  # last: the preconditioner's per-step work stays inside the clock
    # log_dir/method/version_N: a new version folder per run, as Lightning's loggers do (no appended curves)
    logger = TensorBoardLogger(str(log_dir), name=method) if log_dir is not None else False
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - t0 - (clock.excluded if clock is not None else 0.0)
    test = trainer.test(model, DataLoader(test_set, batch_size=512), verbose=False)[0]
    tail = curve.losses[-max(1, len(train_set) // batch_size) :]  # the last epoch's steps
    trajectory = clock.points if clock is not None else []
    return RunResult(
        method,
        batch_size,
        lr,
        epochs,
        sum(tail) / len(tail),
        float(test["test_acc"]),
        seconds,
        curve.losses,
        trajectory,
    )


def warm_up(methods: list[str], data: tuple[TensorDataset, TensorDataset], **options: Any) -> None:
    """One short untimed run per method, so one-time costs of a process (the first backward, loading the
    decompositions' libraries) stay out of the first timed run."""
    x, y = data[0].tensors
    small = (TensorDataset(x[:64], y[:64]), data[1])
    for method in methods:
        train(method, batch_size=32, epochs=1, lr=0.01, data=small, **options)
