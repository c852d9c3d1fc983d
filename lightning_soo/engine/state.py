"""What a manager saves in a checkpoint and how it is loaded back: plain tensors and numbers only, so a checkpoint
loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from lightning_soo.capture.hooks import Capture
from lightning_soo.engine.layer import Layer
from lightning_soo.engine.schedule import ChangeMonitor, Schedule
from lightning_soo.engine.wiring import Wiring
from lightning_soo.options import StepOptions


class Stateful(Protocol):
    """What of a ``PreconditionerManager`` is saved and restored."""

    steps: int
    last_damping: float | None
    counters: dict[str, int]
    schedule: Schedule
    monitor: ChangeMonitor | None
    layers: dict[str, Layer]
    capture: Capture
    wiring: Wiring
    options: StepOptions
    warn: Callable[[str], None]


def manager_state(manager: Stateful) -> dict[str, Any]:
    """The step counter, counters, schedule, freeze monitor and every layer's preconditioner state."""
    return {
        "steps": manager.steps,
        "last_damping": manager.last_damping,
        "counters": dict(manager.counters),
        "schedule": manager.schedule.state_dict(),
        "monitor": manager.monitor.state_dict() if manager.monitor is not None else {},
        "layers": {name: layer.preconditioner.state_dict() for name, layer in manager.layers.items()},
        "calls": {name: list(modules) for name, modules in manager.wiring.calls.items()},
    }


def load_manager_state(manager: Stateful, state: dict[str, Any]) -> None:
    """The inverse of ``manager_state``; state of layers the manager does not have is ignored with a warning."""
    manager.steps = int(state["steps"])
    manager.last_damping = state.get("last_damping")
    manager.counters.update(state.get("counters", {}))
    manager.schedule.load_state_dict(state.get("schedule", {}))
    if manager.monitor is not None:
        manager.monitor.load_state_dict(state.get("monitor", {}))
    if manager.schedule.frozen:
        manager.capture.detach()
    missing = [name for name in state["layers"] if name not in manager.layers]
    if missing:
        manager.warn(f"checkpoint has preconditioner state for unknown layers {missing}; it was ignored")
    for name, layer in manager.layers.items():  # managed now, plain when the checkpoint was saved (another version,
        # other options; or left plain by the census, which runs again): refreshed at their next statistics step
        layer.catch_up = layer.catch_up or name not in state["layers"]
    manager.wiring.restore_calls(state.get("calls", {}))
    damping = rebuild_damping(manager)
    rebuilt: list[str] = []
    for name, layer_state in state["layers"].items():
        if name not in manager.layers:
            continue
        pre = manager.layers[name].preconditioner
        try:
            same = pre.load_state_dict(layer_state)
        except ValueError as err:
            raise ValueError(
                f"the checkpoint's state of layer '{name}' does not fit the model: {err}. Was the layer resized? "
                "Start without the checkpoint's callback state, or exclude the layer"
            ) from None
        if not same:
            rebuilt.append(name)
        manager.layers[name].catch_up = not pre.ready
        if not pre.ready and damping is not None:
            # options changed since the checkpoint (inverse mode, blocks, damping, ...), or saved by a rank that
            # did not own this layer: the derived state is rebuilt from the loaded statistics
            pre.refresh(damping)
    if rebuilt:
        manager.warn(
            f"the options differ from the checkpoint's for {len(rebuilt)} layer(s) ({', '.join(rebuilt[:5])}"
            f"{', ...' if len(rebuilt) > 5 else ''}): their preconditioners were rebuilt from the saved statistics"
        )


def rebuild_damping(manager: Stateful) -> float | None:
    """The damping for rebuilding at load: the configured constant, else the last one the rule gave."""
    value = manager.options.damping
    if isinstance(value, (int, float)) and manager.options.uses_damping:
        return float(value)
    if not manager.options.uses_damping:
        return 0.0
    return manager.last_damping
