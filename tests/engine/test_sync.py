"""The hot path stays on the device: on steps that do not refresh, at most one host synchronisation per optimizer
step, whatever the depth, for every method (statistics collected or frozen; KL clip, grafting, norm cap on or off).

Counted the way a GPU would feel them: every ``Tensor.item``, ``float(t)``, ``bool(t)``, ``int(t)``, ``tolist``
from ``begin_step`` to the end of ``step`` (the CPU has no device queue, but each of these would drain one). The
accelerator's path runs here: on the CPU the library reads its flags on the host, where that is free
(``linalg.HOST_DECIDES_ON_CPU``), and these tests turn that off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from lightning_soo import PreconditionerManager, linalg
from lightning_soo.preconditioners.gauss_newton import GaussNewton

SYNCS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist")


@contextmanager
def counting() -> Iterator[list[int]]:
    count = [0]
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counted(fn):  # type: ignore[no-untyped-def]
        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            count[0] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counted(fn))
    try:
        yield count
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _mlp(depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 10))


def _syncs_per_step(method: str, depth: int, frozen: bool, **options: object) -> list[int]:
    torch.manual_seed(0)
    model = _mlp(depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    interval = None if frozen else 1000
    manager = PreconditionerManager(model, method, preconditioner_interval=interval, **options)
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    counts = []
    host, linalg.HOST_DECIDES_ON_CPU = linalg.HOST_DECIDES_ON_CPU, False  # the accelerator's path
    # Gauss-Newton collects only on steps a refresh reads: here on every statistics step, to count those
    running, GaussNewton.running_statistics = GaussNewton.running_statistics, True
    try:
        for step in range(4):
            opt.zero_grad()
            with counting() as count:
                manager.begin_step()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                manager.step(opt)
            opt.step()
            if step >= 2:  # steady state: past the refresh at step 0 (and, frozen, past the freeze at step 1)
                counts.append(count[0])
    finally:
        linalg.HOST_DECIDES_ON_CPU, GaussNewton.running_statistics = host, running
    return counts


SETTINGS = [
    {},
    {"kl_clip": 1e-3, "grafting": "sgd", "max_update_norm": 1.0},
    {"kl_clip": None, "grafting": None, "max_update_norm": None},
]


@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
@pytest.mark.parametrize("frozen", [False, True], ids=["collecting", "frozen"])
@pytest.mark.parametrize("options", SETTINGS, ids=["defaults", "all-on", "all-off"])
def test_at_most_one_sync_per_step_whatever_the_depth(method: str, frozen: bool, options: dict) -> None:
    shallow = _syncs_per_step(method, 5, frozen, **options)
    deep = _syncs_per_step(method, 17, frozen, **options)
    assert max(shallow) <= 1 and max(deep) <= 1, (shallow, deep)
