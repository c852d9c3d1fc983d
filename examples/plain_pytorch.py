"""K-FAC in a plain PyTorch loop (no Lightning): the PreconditionerManager is all there is to it.

python examples/plain_pytorch.py [--epochs 10] [--quick] [--fp16]

With ``--fp16`` the loop is the usual mixed-precision one (autocast and a ``torch.amp.GradScaler``): unscale the
gradients, then hand the scaler to ``manager.step`` so the statistics are those of the true loss.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_soo import PreconditionerManager
from lightning_soo.app.data import digits


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    parser.add_argument("--fp16", action="store_true", help="fp16 autocast with a GradScaler")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train_set, _ = digits()
    loader = DataLoader(train_set, batch_size=512, shuffle=True)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    # the manager hooks every Linear layer; statistics every step, inverses every 10 steps
    manager = PreconditionerManager(model, "kfac", damping=1e-2)
    device = "cpu"
    scaler = torch.amp.GradScaler(device, enabled=args.fp16)
    losses = []
    for epoch in range(3 if args.quick else args.epochs):
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            manager.begin_step()  # before the forward pass: capture statistics if due
            with torch.autocast(device, dtype=torch.float16, enabled=args.fp16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the manager rewrites unscaled gradients
            manager.step(optimizer, grad_scaler=scaler)  # p.grad <- P·p.grad for the optimizer's parameters
            scaler.step(optimizer)
            scaler.update()
            total += float(loss) * len(y)
        losses.append(total / len(train_set))
        print(f"epoch {epoch + 1}: train loss {losses[-1]:.4f}")
    manager.remove_hooks()
    return losses


if __name__ == "__main__":
    main()
