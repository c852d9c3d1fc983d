"""torch.distributed support: statistics summed across ranks in one bucketed all-reduce.

Every rank then holds the factors of the global batch. (Splitting the inverse work across ranks is planned;
until then each rank refreshes every layer, which gives identical preconditioners on every rank.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensors: Sequence[Tensor]) -> int:
    """Sum ``tensors`` in place across ranks with one all-reduce per dtype; returns the bytes sent per rank."""
    sent = 0
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
        sent += flat.numel() * flat.element_size()
    return sent
