"""A LightningCLI project on MNIST-1D, written as a user would (no lightning-soo in it): the example that
``lightning-soo advise`` is checked against (``examples/advise_check.py``).

    python examples/cli_project.py fit --config examples/cli_project.yaml --data.batch_size 128
    lightning-soo advise examples/cli_project.py --config examples/cli_project.yaml --steps 100
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_soo.app.data import mnist1d


class MLP(L.LightningModule):
    """MLP 40-256-256-10 trained with SGD and momentum."""

    def __init__(self, hidden: int = 256, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=self.hparams["momentum"])


class MNIST1D(L.LightningDataModule):
    """MNIST-1D generated locally: 8,000 training and 2,000 test examples."""

    def __init__(self, batch_size: int = 2048, num_samples: int = 10_000) -> None:
        super().__init__()
        self.batch_size, self.num_samples = batch_size, num_samples
        self.train: TensorDataset | None = None
        self.test: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train is None:
            self.train, self.test = mnist1d(num_samples=self.num_samples, seed=0)

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.test is not None
        return DataLoader(self.test, batch_size=1000)


if __name__ == "__main__":
    LightningCLI(MLP, MNIST1D)
