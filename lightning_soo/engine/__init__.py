"""The engine: the manager that drives per-layer preconditioners through a training step, with its schedule,
damping rules, post-processing of the preconditioned gradients, checkpoint state and DDP support."""

from lightning_soo.engine.damping import Damping, ScaledDamping
from lightning_soo.engine.layer import Layer
from lightning_soo.engine.manager import PreconditionerManager
from lightning_soo.engine.schedule import ChangeMonitor, Schedule

__all__ = ["ChangeMonitor", "Damping", "Layer", "PreconditionerManager", "ScaledDamping", "Schedule"]
