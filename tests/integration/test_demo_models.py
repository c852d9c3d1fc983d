"""The three models shipped in ``lightning.pytorch.demos``, unmodified, train with the callbacks on synthetic data.

Only data loading is replaced (the shipped LightningModules download WikiText-2 in ``prepare_data``); the
networks, losses and optimizers are the shipped ones.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import LightningLSTM, LightningTransformer
from lightning.pytorch.demos.boring_classes import Net
from torch.utils.data import DataLoader, TensorDataset

from lightning_soo import GaussNewtonCallback, KFACCallback, PSGDCallback, ShampooCallback
from lightning_soo.callbacks import SecondOrderCallback
from tests.cases import LossRecorder

STEPS = 30
LM_STEPS = 4  # the language models' 33k-word layers make every step of every method costly on CPU; step 0 refreshes


def _tokens(n: int, t: int, vocab: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, t + 1), generator=g)
    return TensorDataset(data[:, :-1], data[:, 1:])


class SyntheticTransformer(LightningTransformer):
    def prepare_data(self) -> None:  # the shipped one downloads WikiText-2
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_tokens(8 * LM_STEPS, 12, 33278), batch_size=8)


class SyntheticLSTM(LightningLSTM):
    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_tokens(8 * LM_STEPS, 12, 33278), batch_size=8)


class CNN(L.LightningModule):
    """The shipped ``Net`` in the LightningModule a user would write around it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.nll_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=16)  # a small dataset seen many times


def _fit(model: L.LightningModule, callback: SecondOrderCallback, steps: int = STEPS) -> tuple[LossRecorder, list[str]]:
    recorder = LossRecorder()
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[callback, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    plain = [str(w.message) for w in caught if "keep their plain gradient" in str(w.message)]
    return recorder, plain


def _callbacks() -> list[SecondOrderCallback]:
    return [KFACCallback(), ShampooCallback(), GaussNewtonCallback(), PSGDCallback()]


@pytest.mark.parametrize("make_callback", _callbacks(), ids=lambda c: type(c).__name__)
def test_transformer(make_callback: SecondOrderCallback) -> None:
    torch.manual_seed(0)
    model = SyntheticTransformer()
    rec, plain = _fit(model, make_callback, LM_STEPS)
    assert len(rec.losses) == LM_STEPS
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    assert len(plain) == 1  # one warning names every skipped parameter
    why = "a vector outside" if isinstance(make_callback, PSGDCallback) else "not in a supported module"
    assert f"norm1.weight: LayerNorm: {why}" in plain[0]
    # MultiheadAttention's projections (in_proj, and out_proj whose forward never runs) are captured through its
    # F.linear calls: preconditioned by every method
    assert "in_proj" not in plain[0] and "out_proj" not in plain[0]
    assert make_callback.state_dict()["counters"]["refreshes"] > 0


@pytest.mark.parametrize("make_callback", _callbacks(), ids=lambda c: type(c).__name__)
def test_lstm(make_callback: SecondOrderCallback) -> None:
    torch.manual_seed(0)
    model = SyntheticLSTM()
    rec, plain = _fit(model, make_callback, LM_STEPS)
    assert len(rec.losses) == LM_STEPS
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    # nn.LSTM's weights: no rows capture takes; PSGD preconditions them from their gradient (its biases are vectors)
    assert len(plain) == 1 and "rnn.bias_ih_l0" in plain[0]
    assert ("rnn.weight_ih_l0" in plain[0]) == (not isinstance(make_callback, PSGDCallback))


@pytest.mark.parametrize("make_callback", _callbacks(), ids=lambda c: type(c).__name__)
def test_cnn_loss_falls(make_callback: SecondOrderCallback) -> None:
    torch.manual_seed(0)
    model = CNN()
    rec, plain = _fit(model, make_callback)
    losses = torch.tensor(rec.losses)
    assert len(losses) == STEPS and bool(torch.isfinite(losses).all())
    assert plain == []  # every parameter of Net is in a supported layer
    assert losses[-4:].mean() < 0.5 * losses[:4].mean()
