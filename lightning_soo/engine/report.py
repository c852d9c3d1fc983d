"""Which parameters keep their plain gradient, and why: the manager's ``plain_parameters`` and the one warning that
lists them once the first refresh has given every layer its chance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from lightning_soo.engine.distributed import DistributedPlan
from lightning_soo.engine.layer import Layer
from lightning_soo.engine.wiring import Wiring


class Reporting(Protocol):
    """What of a ``PreconditionerManager`` the report reads."""

    skipped: dict[str, str]
    excluded: dict[str, str]
    layers: dict[str, Layer]
    plan: DistributedPlan | None
    wiring: Wiring
    warn: Callable[[str], None]


def plain_parameters(manager: Reporting) -> dict[str, str]:
    """Parameters that keep their plain gradient, with the reason: those left plain at set-up or by the census, and
    the layers without a preconditioner yet (unless another rank owns them, or they refresh at the next step)."""
    plain = dict(manager.skipped)
    plan = manager.plan
    for layer in manager.layers.values():
        elsewhere = plan is not None and plan.broadcast_gradients and not plan.owns(layer)
        if not layer.preconditioner.ready and not elsewhere and not (layer.catch_up or layer.retry):
            expert = isinstance(layer.adapter.weight.rows, int)  # one expert of a 3-d parameter: named by its layer
            why = layer.unready_reason()
            if expert and not layer.seen:
                why = f"{type(layer.module).__name__}: no statistics captured (no row routed to this expert yet)"
            for p in layer.adapter.params:
                plain.setdefault(layer.name if expert else manager.wiring.param_name(p, layer.name), why)
    return plain


def report_plain(manager: Reporting) -> bool:
    """Warn once with every plain parameter (and the excluded ones); False while a layer waits for its retry at the
    next statistics step (its chance is not over)."""
    if any(layer.retry for layer in manager.layers.values()):
        return False
    plain = plain_parameters(manager)
    if plain or manager.excluded:
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(plain.items()))
        if manager.excluded:
            lines += f"\n  excluded by you: {', '.join(sorted(manager.excluded))}"
        manager.warn(f"{len(plain) + len(manager.excluded)} parameter(s) keep their plain gradient:\n{lines}")
    return True
