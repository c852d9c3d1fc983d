"""torch.distributed support (DDP): statistics summed across ranks, inverse work split across ranks.

* Statistics: one bucketed all-reduce per statistics step, so every rank holds the factors of the global batch.
* Inverses: each layer has an owner, assigned once by cost (the n³ of its factors, greedy on the least-loaded
  rank); only the owner refreshes it. Then, as in KAISA (Pauloski et al., 2021), ``grad_worker_fraction`` chooses:
  1.0 — the owner broadcasts the new preconditioner and every rank preconditions its own (identical) gradient
  (communication at refreshes only, every rank holds every preconditioner); 1/world_size — the owner alone
  preconditions and broadcasts ``P·G`` every step (less memory, communication every step). Fractions in between
  are rounded to the nearer of the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_soo.engine.layer import Layer
from lightning_soo.preconditioners.statistics import Factor


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _flat_copy(tensors: Sequence[Tensor], flat: Tensor) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _pack(t: Tensor, symmetric: bool) -> Tensor:
    """A symmetric square matrix travels as its upper triangle (about half the bytes)."""
    if symmetric and t.dim() == 2 and t.shape[0] == t.shape[1] and t.shape[0] > 1:
        i, j = torch.triu_indices(t.shape[0], t.shape[1], device=t.device)
        return t[i, j]
    return t.reshape(-1)


def _unpack(t: Tensor, packed: Tensor, symmetric: bool) -> None:
    if symmetric and t.dim() == 2 and t.shape[0] == t.shape[1] and t.shape[0] > 1:
        i, j = torch.triu_indices(t.shape[0], t.shape[1], device=t.device)
        t[i, j] = packed
        t[j, i] = packed
    else:
        t.copy_(packed.view_as(t))


def by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices of ``tensors`` grouped by dtype (one collective per group), in a rank-independent order."""
    groups: dict[torch.dtype, list[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(k)
    return {dtype: groups[dtype] for dtype in sorted(groups, key=str)}


def all_reduce_sum(tensors: Sequence[Tensor], symmetric: Sequence[bool] | None = None) -> int:
    """Sum ``tensors`` in place across ranks with one all-reduce per dtype; tensors flagged ``symmetric`` are sent
    as their upper triangle. Returns the bytes sent per rank."""
    flags = list(symmetric) if symmetric is not None else [False] * len(tensors)
    sent = 0
    for group in by_dtype(tensors).values():
        parts = [_pack(tensors[k], flags[k]) for k in group]
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for k, part in zip(group, parts, strict=True):
            _unpack(tensors[k], flat[offset : offset + part.numel()], flags[k])
            offset += part.numel()
        sent += flat.numel() * flat.element_size()
    return sent


def all_gather_rows(tensors: Sequence[Tensor]) -> tuple[list[Tensor], int]:
    """Concatenate each tensor along dim 0 over ranks (rank order; row counts may differ between ranks): one
    all-gather of the row counts, then one per dtype of the row-padded tensors. Returns the results and bytes."""
    world = world_size()
    device = tensors[0].device if tensors else torch.device("cpu")
    counts = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64, device=device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    most = torch.stack(all_counts).amax(0).tolist()
    out: list[list[Tensor]] = [[] for _ in tensors]
    sent = counts.numel() * 8
    for group in by_dtype(tensors).values():
        padded = [
            torch.cat([tensors[k], tensors[k].new_zeros((most[k] - tensors[k].shape[0], *tensors[k].shape[1:]))])
            for k in group
        ]
        flat = torch.cat([t.reshape(-1) for t in padded])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        sent += flat.numel() * flat.element_size()
        for r, buf in enumerate(gathered):
            offset = 0
            for k in group:
                row = tensors[k].shape[1:]
                size = most[k] * row.numel()
                part = buf[offset : offset + size].reshape(most[k], *row)
                out[k].append(part[: int(all_counts[r][k])])
                offset += size
    return [torch.cat(parts) for parts in out], sent


def reduce_statistics(layers: Sequence[Layer]) -> int:
    """Sum (or, for methods that keep examples, gather) this step's statistics of ``layers`` across ranks;
    returns the bytes sent.

    Ranks may route differently (a mixture of experts): a layer this rank saw no call of in the step has counted the
    rank's examples already (``layer.count_missed_passes``), and a flag per factor (rows on this rank) travels with
    the sums, so a factor with rows on any rank folds on every rank (one read of the flags, on a rank that lacked
    rows for some factor)."""
    tensors: list[Tensor] = []
    symmetric: list[bool] = []
    factors: list[Factor] = []
    sent = 0
    gather: list[tuple[Layer, list[Tensor]]] = []
    for layer in layers:
        pre = layer.preconditioner
        if pre.uses_grad and not pre.uses_hooks:
            continue  # statistics from the all-reduced gradient are already global
        rows = pre.gather_tensors()
        if rows is not None:
            gather.append((layer, rows))
            continue
        factors.extend(f for f, _ in pre.statistics_factors())
        stats = pre.statistics_tensors()
        if stats is None:
            raise RuntimeError(
                f"{type(pre).__name__} cannot reduce its statistics across processes (layer '{layer.name}'); "
                "run it on a single process"
            )
        tensors.extend(stats)
        symmetric.extend([pre.symmetric_statistics] * len(stats))
    if gather:
        flat = [t for _, rows in gather for t in rows]
        result, sent = all_gather_rows(flat)
        offset = 0
        for layer, rows in gather:
            layer.preconditioner.gathered(result[offset : offset + len(rows)])
            offset += len(rows)
    if factors:
        held_rows = torch.tensor([f.pending for f in factors], dtype=tensors[0].dtype)  # on the host, then copied
        flags = held_rows.to(tensors[0].device, non_blocking=True)  # without waiting for the device's queue
        tensors.append(flags)
        symmetric.append(False)
    sent += all_reduce_sum(tensors, symmetric) if tensors else 0
    if not all(f.pending for f in factors):
        for f, ranks in zip(factors, flags.tolist(), strict=True):
            if ranks > 0 and not f.pending:
                f.rows_elsewhere()
    return sent


def broadcast_buckets(buckets: dict[int, list[Tensor]]) -> int:
    """For every rank r, broadcast the tensors of ``buckets[r]`` from r into the same-shaped tensors of the other
    ranks (one collective per rank and dtype); returns the bytes moved."""
    moved = 0
    for src in range(world_size()):
        bucket = buckets.get(src, [])
        for indices in by_dtype(bucket).values():
            group = [bucket[k] for k in indices]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=src)
            _flat_copy(group, flat)
            moved += flat.numel() * flat.element_size()
    return moved


def assign_owners(costs: dict[str, float], ranks: int) -> dict[str, int]:
    """Greedy longest-processing-time assignment: the costliest layer goes to the least-loaded rank."""
    load = [0.0] * ranks
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


class DistributedPlan:
    """Who refreshes which layer, and how the results reach the other ranks."""

    def __init__(self, layers: Sequence[Layer], grad_worker_fraction: float = 1.0) -> None:
        self.world, self.rank = world_size(), dist.get_rank()
        costs = {layer.name: layer.preconditioner.refresh_cost() for layer in layers}
        self.owners = assign_owners(costs, self.world)
        workers = min(self.world, max(1, round(grad_worker_fraction * self.world)))
        self.broadcast_gradients = workers * 2 <= self.world  # nearer to 1/world than to 1
        self.bytes = 0

    def owns(self, layer: Layer) -> bool:
        return self.owners[layer.name] == self.rank

    def refresh(self, layers: Sequence[Layer], refresh: Callable[[Layer], None]) -> None:
        """Owners refresh; in inverse-broadcast mode the new preconditioners are then sent to every rank."""
        for layer in layers:
            if self.owns(layer):
                refresh(layer)
        if self.broadcast_gradients:
            return
        buckets: dict[int, list[Tensor]] = {}
        for layer in layers:
            buckets.setdefault(self.owners[layer.name], []).extend(layer.preconditioner.inverse_tensors())
        self.bytes += broadcast_buckets(buckets)
        for layer in layers:
            if not self.owns(layer):
                layer.preconditioner.inverse_tensors_loaded()

    def precondition(self, items: Sequence[tuple[Layer, Tensor]]) -> list[Tensor]:
        """Gradient-broadcast mode: the owner of each layer computes ``P·G`` (or keeps G if it has no
        preconditioner yet) and broadcasts it; returns the result for every item."""
        outs: list[Tensor] = []
        buckets: dict[int, list[Tensor]] = {}
        for layer, g in items:
            pre = layer.preconditioner
            if self.owns(layer):
                out = pre.precondition(g) if pre.ready else g.to(pre.dtype).clone()
            else:
                out = torch.empty(g.shape, dtype=pre.dtype, device=g.device)
            outs.append(out)
            buckets.setdefault(self.owners[layer.name], []).append(out)
        self.bytes += broadcast_buckets(buckets)
        return outs
