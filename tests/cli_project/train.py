"""A user's LightningCLI project, written without knowledge of lightning-soo (used by tests/test_cli_configs.py)."""

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Classifier(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class RandomData(L.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 16, generator=g)
        y = (x[:, :4]).argmax(1)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


class CountSteps(L.Callback):
    """The user's own callback: counts optimizer steps and keeps the count in checkpoints."""

    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}


if __name__ == "__main__":
    LightningCLI(Classifier, RandomData)
