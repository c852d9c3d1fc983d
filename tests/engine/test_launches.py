"""Kernel launches per layer: on an accelerator every tensor operation of the hot path is a kernel launch, a few
microseconds of fixed cost that a narrow layer's short kernels cannot hide. This counts, on the accelerator's path
(``linalg.HOST_DECIDES_ON_CPU`` off, as in ``test_sync``), the operations one more layer adds to a steady-state step
beyond what the plain model's forward and backward launch, and holds each method to its count.

Counted: every ATen operation that computes (views, host reads and the host-side wrapping of Python numbers are
not kernels). The budgets are the counts of the code that set them: lower one when you remove operations, and
explain a rise in the commit that makes it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soo import PreconditionerManager, linalg
from lightning_soo.preconditioners.gauss_newton import GaussNewton
from tests.engine.test_sync import _mlp

#: operations that launch nothing on a device
NOT_KERNELS = {"_local_scalar_dense", "scalar_tensor", "detach", "lift_fresh"}

#: (method, frozen) -> kernels one more layer adds to a step that does not refresh, default options, each layer on
#: its own (as under ``torch.distributed``, or for layers of a shape no other layer has)
BUDGETS = {
    ("kfac", False): 35,
    ("kfac", True): 11,
    ("shampoo", False): 42,
    ("shampoo", True): 17,
    ("gauss_newton", False): 28,
    ("gauss_newton", True): 22,
    ("psgd", False): 93,
    ("psgd", True): 14,
}

#: the same where equal layers are stacked (one accelerator): the products (``engine.batched``), the statistics'
#: close (``preconditioners.banks``) and PSGD's fit (``psgd_math.fit_stacked``) take a handful of kernels per stack,
#: whatever its depth; what is left per layer is the hooks' own work (PSGD: the gradient matrix and its probe). The
#: padding rule's count is reduced per bank as it closes (``capture.rows.RowCount``), not per layer
STACKED_BUDGETS = {
    ("kfac", False): 6,
    ("kfac", True): 0,
    ("shampoo", False): 8,
    ("shampoo", True): 0,
    ("psgd", False): 2,
    ("psgd", True): 0,
    ("gauss_newton", False): 6,
    ("gauss_newton", True): 0,
}


class _Kernels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NOT_KERNELS:
            self.names[name] += 1
        return func(*args, **(kwargs or {}))


def _kernels(method: str | None, depth: int, frozen: bool, stacked: bool) -> Counter[str]:
    """Kernels of the fourth step (steady state: past the refresh at step 0 and, frozen, the freeze at step 1)."""
    torch.manual_seed(0)
    model = _mlp(depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    interval = None if frozen else 1000
    manager = PreconditionerManager(model, method, preconditioner_interval=interval) if method else None
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    host, linalg.HOST_DECIDES_ON_CPU = linalg.HOST_DECIDES_ON_CPU, False
    batch, linalg.BATCH_ON_CPU = linalg.BATCH_ON_CPU, stacked
    running, GaussNewton.running_statistics = GaussNewton.running_statistics, True  # collecting steps' cost
    try:
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            with _Kernels() as counted:
                if manager is not None:
                    manager.begin_step()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                if manager is not None:
                    manager.step(opt)
            opt.step()
    finally:
        linalg.HOST_DECIDES_ON_CPU, linalg.BATCH_ON_CPU = host, batch
        GaussNewton.running_statistics = running
    return counted.names


def _per_layer(method: str | None, frozen: bool, stacked: bool = False) -> Counter[str]:
    """What 12 more layers add, divided by 12 (all layers between the first and last are 16 x 16)."""
    shallow, deep = _kernels(method, 5, frozen, stacked), _kernels(method, 17, frozen, stacked)
    return Counter({k: v / 12 for k, v in (deep - shallow).items()})


def _check(method: str, frozen: bool, stacked: bool, budget: int) -> None:
    plain = _per_layer(None, frozen, stacked)
    ours = _per_layer(method, frozen, stacked)
    extra = sum(ours.values()) - sum(plain.values())
    detail = dict((ours - plain).most_common())
    assert extra <= budget, f"{extra:g} kernels per layer > budget {budget}: {detail}"
    assert extra >= budget - 0.5, f"{extra:g} kernels per layer: lower the budget of {budget} to it ({detail})"


@pytest.mark.parametrize("frozen", [False, True], ids=["collecting", "frozen"])
@pytest.mark.parametrize("method", ["kfac", "shampoo", "gauss_newton", "psgd"])
def test_kernels_per_layer_stay_within_budget(method: str, frozen: bool) -> None:
    _check(method, frozen, False, BUDGETS[(method, frozen)])


@pytest.mark.parametrize("frozen", [False, True], ids=["collecting", "frozen"])
@pytest.mark.parametrize("method", ["kfac", "shampoo", "psgd", "gauss_newton"])
def test_stacked_layers_add_few_kernels(method: str, frozen: bool) -> None:
    """One accelerator: a deeper stack of equal layers costs almost no further launches."""
    _check(method, frozen, True, STACKED_BUDGETS[(method, frozen)])
