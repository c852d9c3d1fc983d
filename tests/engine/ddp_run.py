"""Run by tests/engine/test_distributed.py (and test_distributed_experts.py) in a subprocess: trains the test MLP (or,
with ``--model moe``, a mixture of experts) on 1 or 2 CPU processes (DDP, gloo) and saves the final parameters and
the callback state (rank 0)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_soo import GaussNewtonCallback, KFACCallback, PSGDCallback, ShampooCallback, linalg
from tests.capture.test_experts import C, E, Experts, Router
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

    def data(self) -> TensorDataset:
        return classification_data()

    def train_dataloader(self) -> DataLoader:
        data = self.data()
        if self.trainer.world_size == 1:
            return DataLoader(data, batch_size=self.batch_size, shuffle=False)
        sampler = DistributedSampler(data, shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


#: per step, the expert of each example on rank 0 and on rank 1 (two ranks of 4, or one process on the 8 examples
#: r0, r1, r0, r1, ...): an expert with rows on one rank only (step 0: 1 and 2; 1: 1 and 2; 2: 3; 3: 0, 1 and 3) and
#: one with none on any rank (step 0: 3, never seen before; 2: 0; 3: 2)
ROUTES = [
    ([0, 1, 0, 1], [0, 2, 0, 2]),
    ([3, 2, 0, 2], [1, 1, 3, 0]),
    ([1, 1, 2, 2], [1, 2, 3, 3]),
    ([0, 0, 0, 3], [1, 1, 1, 1]),
    ([0, 1, 2, 3], [3, 2, 1, 0]),
]


def moe_data(classes: int = 6) -> TensorDataset:
    """Inputs, their expert (``ROUTES``, interleaved as ``DistributedSampler`` deals them) and labels."""
    g = torch.Generator().manual_seed(0)
    routes = torch.tensor([[a, b] for r0, r1 in ROUTES for a, b in zip(r0, r1, strict=True)]).reshape(-1)
    return TensorDataset(
        torch.randn(len(routes), C, generator=g), routes, torch.randint(0, classes, routes.shape, generator=g)
    )


class ShardedMoE(ShardedMLP):
    """A top-1 mixture of experts as transformers' eager loop writes it (``tests/capture/test_experts.py``: the
    experts 3-d parameters called as ``F.linear(x, p[e])``, a router of its own class), between the inputs and a
    linear head; the data fix each example's expert (``ROUTES``), weighted by the router's probability, so which
    expert gets rows on which rank is known."""

    def __init__(self, batch_size: int, classes: int = 6) -> None:
        super().__init__(lr=0.1, batch_size=batch_size)
        self.norm = nn.Identity()
        self.net = nn.ModuleDict({"router": Router(), "experts": Experts(), "head": nn.Linear(C, classes)})

    def forward(self, x: Tensor, route: Tensor) -> Tensor:
        probs = torch.softmax(self.net["router"](x), -1)
        out = torch.zeros_like(x)
        for e in range(E):
            rows = torch.where(route == e)[0]
            if len(rows):
                out = out.index_add(0, rows, self.net["experts"](x[rows], e) * probs[rows, e : e + 1])
        return self.net["head"](torch.tanh(out))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, route, y = batch
        return F.cross_entropy(self(x, route), y)

    def data(self) -> TensorDataset:
        return moe_data()


METHODS = ("kfac", "shampoo", "gauss_newton", "psgd", "psgd_hessian")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt-in", default=None)
    parser.add_argument("--ckpt-out", default=None)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--fraction", type=float, default=1.0, help="grad_worker_fraction")
    parser.add_argument("--method", default="kfac", help=f"one of {METHODS}, or several with commas: one fit each")
    parser.add_argument("--device-path", action="store_true", help="the accelerator's path, on a deeper MLP")
    parser.add_argument("--float32", action="store_true", help="float32 model and statistics (default float64)")
    parser.add_argument("--interval", type=int, default=2, help="preconditioner_interval (not PSGD)")
    parser.add_argument("--model", default="mlp", choices=["mlp", "moe"], help="moe: ShardedMoE, global batch 8")
    parser.add_argument("--vectors", action="store_true", help="PSGD's precondition_vectors (the LayerNorm's)")
    args = parser.parse_args()
    methods = args.method.split(",")
    if not set(methods) <= set(METHODS):
        parser.error(f"--method: {args.method} (choose from {METHODS})")
    results = {}
    for method in methods:  # several fits in one launch: the process group is set up once
        t, results[method] = fit(args, method)
    result = results[methods[0]] if len(methods) == 1 else results
    if t.is_global_zero:
        torch.save(result, args.out)
    elif t.world_size > 1:
        torch.save(result, f"{args.out}.rank{t.global_rank}")


def fit(args: argparse.Namespace, method: str) -> tuple[L.Trainer, dict]:
    """Train with ``method``; the trainer and what ``main`` saves."""
    torch.manual_seed(0)
    per_rank = (8 if args.model == "moe" else 32) // args.devices  # the global batch is the same either way
    model = ShardedMoE(per_rank) if args.model == "moe" else ShardedMLP(batch_size=per_rank)
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
    if method == "shampoo":
        cb = ShampooCallback(preconditioner_interval=args.interval, damping=1e-3, grad_worker_fraction=args.fraction)
    elif method == "gauss_newton":
        cb = GaussNewtonCallback(preconditioner_interval=args.interval, grad_worker_fraction=args.fraction)
    elif method.startswith("psgd"):
        form = "hessian" if method == "psgd_hessian" else "whitening"
        cb = PSGDCallback(fit=form, grad_worker_fraction=args.fraction, precondition_vectors=args.vectors)
    else:
        cb = KFACCallback(preconditioner_interval=args.interval, kl_clip=None, grad_worker_fraction=args.fraction)
    last = LastGrads(cb)
    cbs = [last] if args.plain else [cb, last]
    kwargs = {"strategy": "ddp", "devices": args.devices} if args.devices > 1 else {"devices": 1}
    t = trainer(
        max_steps=args.steps,
        callbacks=cbs,
        precision="32-true" if args.float32 else "64-true",
        accelerator="cpu",
        use_distributed_sampler=False,
        limit_val_batches=0 if args.model == "moe" else None,
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
    return t, result


if __name__ == "__main__":
    main()
