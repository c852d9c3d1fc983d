"""Run by tests/test_distributed.py in a subprocess: trains the test MLP on 1 or 2 CPU processes (DDP, gloo) and
saves the final parameters and the callback state (rank 0)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch.utils.data import DataLoader, DistributedSampler

from lightning_soo import GaussNewtonCallback, KFACCallback, PSGDCallback, ShampooCallback, linalg
from tests.cases import MLP, classification_data, trainer


class LastGrads(L.Callback):
    """Placed after the K-FAC callback: records the preconditioned gradients of the last step."""

    def __init__(self, cb: L.Callback) -> None:
        self.grads: list[torch.Tensor] = []
        self.cb, self.banked = cb, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = [p.grad.detach().clone() for p in pl_module.parameters()]
        manager = getattr(self.cb, "manager", None)
        if manager is not None:  # factors closed as banks (``preconditioners.banks``)
            pres = [layer.preconditioner for layer in manager.layers.values()]
            self.banked = sum(getattr(f, "bank", None) is not None for p in pres for f in getattr(p, "_factors", []))


class ShardedMLP(MLP):
    """Rank r takes examples r, r+W, r+2W, ... so the W ranks' batches of a step together are the single-process
    batch of that step."""

    def train_dataloader(self) -> DataLoader:
        data = classification_data()
        if self.trainer.world_size == 1:
            return DataLoader(data, batch_size=self.batch_size, shuffle=False)
        sampler = DistributedSampler(data, shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt-in", default=None)
    parser.add_argument("--ckpt-out", default=None)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--fraction", type=float, default=1.0, help="grad_worker_fraction")
    parser.add_argument("--method", default="kfac", choices=["kfac", "shampoo", "gauss_newton", "psgd", "psgd_hessian"])
    parser.add_argument("--device-path", action="store_true", help="the accelerator's path, on a deeper MLP")
    parser.add_argument("--float32", action="store_true", help="float32 model and statistics (default float64)")
    args = parser.parse_args()
    torch.manual_seed(0)
    per_rank = 32 // args.devices  # the global batch is 32 either way
    model = ShardedMLP(batch_size=per_rank)
    model = model if args.float32 else model.double()
    if args.device_path:  # flags decided on the device, equal layers stacked and banked: as on one GPU per rank
        linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU = False, True
        relu = torch.nn.ReLU
        model.net = torch.nn.Sequential(
            torch.nn.Linear(12, 16),
            relu(),
            torch.nn.Linear(16, 16),
            relu(),
            torch.nn.Linear(16, 16),
            relu(),
            torch.nn.Linear(16, 16),
            relu(),
            torch.nn.Linear(16, 4),
        ).double()
    if args.method == "shampoo":
        cb = ShampooCallback(preconditioner_interval=2, damping=1e-3, grad_worker_fraction=args.fraction)
    elif args.method == "gauss_newton":
        cb = GaussNewtonCallback(preconditioner_interval=2, grad_worker_fraction=args.fraction)
    elif args.method.startswith("psgd"):
        fit = "hessian" if args.method == "psgd_hessian" else "whitening"
        cb = PSGDCallback(fit=fit, grad_worker_fraction=args.fraction)
    else:
        cb = KFACCallback(preconditioner_interval=2, kl_clip=None, grad_worker_fraction=args.fraction)
    last = LastGrads(cb)
    cbs = [last] if "--plain" in sys.argv else [cb, last]
    kwargs = {"strategy": "ddp", "devices": args.devices} if args.devices > 1 else {"devices": 1}
    t = trainer(
        max_steps=args.steps,
        callbacks=cbs,
        precision="32-true" if args.float32 else "64-true",
        accelerator="cpu",
        use_distributed_sampler=False,
        **kwargs,
    )
    t.fit(model, ckpt_path=args.ckpt_in, weights_only=True if args.ckpt_in else None)
    if args.ckpt_out:
        t.save_checkpoint(args.ckpt_out)
    result = {
        "params": [p.detach() for p in model.parameters()],
        "grads": last.grads,
        "state": cb.state_dict(),
        "banked": last.banked,
    }
    if t.is_global_zero:
        torch.save(result, args.out)
    elif t.world_size > 1:
        torch.save(result, f"{args.out}.rank{t.global_rank}")


if __name__ == "__main__":
    main()
