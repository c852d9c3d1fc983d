"""Hook registration. Knows nothing of the maths: it hands a layer's input to ``on_input`` during the forward
pass and the gradient w.r.t. the layer's output to ``on_output_grad`` during the backward pass.

The output gradient comes from a tensor hook registered on the output inside the forward hook (only when the
output requires grad). Unlike ``register_full_backward_hook`` this works when an in-place op such as
``ReLU(inplace=True)`` follows the layer. Capture happens only while ``active`` is set and grad mode is on, so
validation, sanity checks and ``torch.no_grad`` cost one flag check per layer call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

InputSink = Callable[[Tensor], Any]
GradSink = Callable[[Tensor, Any], None]


class Capture:
    """Forward hooks on a set of modules, all removable at once."""

    def __init__(self) -> None:
        self.active = False
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, module: nn.Module, on_input: InputSink, on_output_grad: GradSink) -> None:
        def forward_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.active or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not output.requires_grad or not args:
                return
            ctx = on_input(args[0].detach())

            def grad_hook(grad: Tensor) -> None:
                on_output_grad(grad.detach(), ctx)

            output.register_hook(grad_hook)

        self._handles.append(module.register_forward_hook(forward_hook))

    def detach(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.active = False
