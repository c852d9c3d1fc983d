"""Seed Fig. 3 at CPU scale: the second-order gain shrinks as the dataset grows (character-level language model).

Corpus: the Python standard library's own source text (no download), bytes as tokens. A small corpus (~40k
characters) and a large one (~2M characters). Model: a context-window MLP language model (Embedding, Linear, Tanh,
Linear) trained for the same number of steps with AdamW and with SGD + KFACCallback. Metric: training loss over the
last 10% of steps and held-out loss on text that is not in either corpus.

Criterion (stated before running): K-FAC's relative gain over AdamW in training loss is larger on the small corpus
than on the large one, by at least a factor 2.

    python examples/seed_dataset_size.py [--quick]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))

from seed_common import Clock, base_parser, pyplot, quiet, result_path, save, verdict

from lightning_soo import KFACCallback

CONTEXT, VOCAB = 32, 128


def stdlib_text(chars: int, skip: int = 0) -> torch.Tensor:
    """``chars`` bytes of the standard library's source (ASCII, files in sorted order), after ``skip`` bytes."""
    root = Path(os.__file__).parent
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        if skip >= len(data):
            skip -= len(data)
            continue
        data, skip = data[skip:], 0
        out.append(torch.tensor(list(data), dtype=torch.long).clamp(max=VOCAB - 1))
        total += len(data)
        if total >= chars:
            break
    return torch.cat(out)[:chars]


class Windows(Dataset):
    def __init__(self, text: torch.Tensor, steps: int, batch: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.text = text
        self.starts = torch.randint(0, len(text) - CONTEXT - 1, (steps * batch,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        return self.text[s : s + CONTEXT], self.text[s + CONTEXT]


class CharMLP(L.LightningModule):
    def __init__(self, optimizer: str, lr: float) -> None:
        super().__init__()
        self.optimizer, self.lr = optimizer, lr
        self.embed = nn.Embedding(VOCAB, 16)
        self.net = nn.Sequential(nn.Linear(CONTEXT * 16, 256), nn.Tanh(), nn.Linear(256, VOCAB))
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(x).flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def run(method: str, text: torch.Tensor, held_out: torch.Tensor, steps: int, batch: int) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    model = CharMLP("adamw" if method == "adamw" else "sgd", 3e-3 if method == "adamw" else 0.2)
    callbacks = [KFACCallback()] if method == "kfac" else []
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(Windows(text, steps, batch), batch_size=batch))
    tail = model.losses[-max(1, steps // 10) :]
    windows = Windows(held_out, 4, 512, seed=1)
    x = torch.stack([windows[i][0] for i in range(len(windows))])
    y = torch.stack([windows[i][1] for i in range(len(windows))])
    with torch.no_grad():
        held = float(F.cross_entropy(model(x), y))
    return {"train_loss": sum(tail) / len(tail), "held_out_loss": held}


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "tiny corpora, 20 steps")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    quiet()
    clock = Clock()
    sizes = {"small": 5_000, "large": 50_000} if args.quick else {"small": 40_000, "large": 2_000_000}
    steps = 20 if args.quick else args.steps
    held_out = stdlib_text(100_000, skip=4_000_000)
    results: dict[str, dict] = {}
    for name, chars in sizes.items():
        text = stdlib_text(chars)
        results[name] = {m: run(m, text, held_out, steps, args.batch) for m in ("adamw", "kfac")}
        a, k = results[name]["adamw"]["train_loss"], results[name]["kfac"]["train_loss"]
        results[name]["relative_gain"] = (a - k) / a
        print(
            f"{name:<6} corpus ({chars:,} chars): AdamW {a:.3f}  K-FAC {k:.3f}  relative gain "
            f"{results[name]['relative_gain']:+.3f}  (held-out: AdamW {results[name]['adamw']['held_out_loss']:.3f}"
            f", K-FAC {results[name]['kfac']['held_out_loss']:.3f})",
            flush=True,
        )
    g_small, g_large = results["small"]["relative_gain"], results["large"]["relative_gain"]
    held = g_small > 0 and g_small >= 2 * max(g_large, 0.0)
    claim = "the second-order gain shrinks as the corpus grows"
    claim += " (quick smoke run)" if args.quick else ""
    line = verdict(claim, held, f"relative gain in training loss: small {g_small:+.3f}, large {g_large:+.3f}")
    payload = {
        "claim": "Fig. 3",
        "quick": args.quick,
        "steps": steps,
        "sizes": sizes,
        "results": results,
        "verdict": line,
        "seconds": clock.seconds,
    }
    save("dataset_size_quick" if args.quick else "dataset_size", payload, args.out)
    plot(results, result_path("dataset_size", "png", args.quick, args.out))
    return payload


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    names = list(results)
    for i, method in enumerate(("adamw", "kfac")):
        values = [results[n][method]["train_loss"] for n in names]
        ax.bar([j + 0.4 * i for j in range(len(names))], values, width=0.4, label=method)
    ax.set_xticks([j + 0.2 for j in range(len(names))], [f"{n} corpus" for n in names])
    ax.set_ylabel("training loss, last 10% of steps (nats/char)")
    ax.set_title("character-level LM on the Python standard library")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
