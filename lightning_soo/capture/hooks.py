"""Hook registration. Knows nothing of the maths: it hands a call's input to ``on_call`` during the forward pass,
which returns what to do with the gradient w.r.t. the call's output during the backward pass (or None: nothing).

The output gradient comes from a tensor hook registered on the output inside the forward hook (only when the
output requires grad). Unlike ``register_full_backward_hook`` this works when an in-place op such as
``ReLU(inplace=True)`` follows the layer. Capture happens only while ``active`` is set and grad mode is on, so
validation, sanity checks and ``torch.no_grad`` cost one flag check per layer call; which layers are still
collecting is the sink's business (capture is per layer).

Two mechanisms:

* ``Capture.attach``: a forward hook on a module whose forward makes the call (``nn.Linear``, ``nn.Conv*``,
  ``nn.Embedding``, ``Conv1D``).
* ``Capture.attach_calls``: ``F.linear`` calls made inside a module's forward on given weights.
  ``nn.MultiheadAttention`` makes its projections this way (inside ``F.multi_head_attention_forward``, on its
  parameters or on row blocks of them), and so does a model whose head is ``F.linear(x, wte.weight)``, a
  mixture-of-experts router, and the experts of a 3-d parameter (``F.linear(x, p[e])``). During the module's
  forward ``torch.nn.functional.linear`` is replaced by a function that hands calls on those weights to their
  sinks, with the row block the weight is of the parameter (an expert's slice goes to that expert's sink). The
  experts' grouped product (``grouped_mm(x, p.transpose(-2, -1), offs=offs)``, transformers' default) is
  captured the same way at ``torch._grouped_mm``, each expert's block of rows to its sink.

The census of the first statistics step, which checks that these calls are a weight's only uses, is
``capture.census``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_soo.capture.calls import (
    GROUPED_MM,
    MATMULS,
    ORIGINALS,
    expert_index,
    expert_transposed,
    grouped_arguments,
    own_call,
    own_product,
)

GradCallback = Callable[[Tensor], None]
#: ``on_call(x, rows)``: the call's input and the block of the layer's output rows it makes (None: all)
OnCall = Callable[[Tensor, slice | None], GradCallback | None]


def _hook_output(output: Tensor, callback: GradCallback | None) -> None:
    """Hand ``output``'s gradient to ``callback``. A layer's output on inputs of three or more dimensions is a
    reshaping view of the 2-d product; a hook on such a view never fires once an in-place op (``ReLU(inplace=True)``)
    has rewritten it, while one on its base does, with the gradient of the value before that op. So the hook goes on
    the base where the view is all of it in the same order."""
    if callback is None:
        return
    base = output._base
    if (
        base is not None
        and base.numel() == output.numel()
        and base.data_ptr() == output.data_ptr()
        and base.is_contiguous()
        and output.is_contiguous()
        and base.requires_grad
    ):
        shape = output.shape
        base.register_hook(lambda grad: callback((grad.detach() if grad.requires_grad else grad).reshape(shape)))
        return
    output.register_hook(lambda grad: callback(grad.detach() if grad.requires_grad else grad))


class Capture:
    """Forward hooks (and attention-module patches) on a set of modules, all removable at once."""

    def __init__(self) -> None:
        self.active = False
        self._handles: list[RemovableHandle] = []
        #: linear layers written ``x @ self.weight.T (+ self.bias)`` on their input, whose module call the census
        #: found to be the layer's own: captured by a forward hook (seen under ``torch.compile``, which does not
        #: call a replaced ``@``), not at the product
        self.by_forward: set[int] = set()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, module: nn.Module, on_call: OnCall) -> None:
        def forward_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.active or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not output.requires_grad or not args:
                return
            _hook_output(output, on_call(args[0].detach(), None))

        self._handles.append(module.register_forward_hook(forward_hook))

    def attach_calls(
        self,
        module: nn.Module,
        weights: dict[int, OnCall],
        outside: Sequence[nn.Module] = (),
        function: str = "linear",
        own: bool = False,
        experts: Mapping[int, Mapping[int, OnCall]] | None = None,
        transposed: Set[int] = frozenset(),
    ) -> None:
        """Capture the ``F.<function>`` calls (``linear`` by default; ``embedding``, ``conv2d``, ...) ``module``'s
        forward makes on the given weights (or on blocks of their rows): ``weights`` maps a parameter id to its
        sink. During the forward (a pre-hook and an always-called forward hook) ``torch.nn.functional.<function>``
        is replaced by a function that hands those calls to their sinks. Calls made inside the ``outside`` modules
        (the weight's own modules, captured by their hooks) are not handed over twice. ``own``: only ``module``'s
        own call (``calls.own_call``: its weight, bias and settings) is handed over. ``experts`` maps a 3-d
        parameter's id to its experts' sinks: a call on its slice ``p[e]`` goes to expert ``e``'s; ``transposed``:
        those of them stored ``(E, in, out)``, whose grouped product takes the parameter itself."""
        by_expert = experts or {}
        saved: list[Any] = []
        depth = [0]
        busy = [False]  # a Python functional (``F.embedding``) dispatches a torch-function mode to its global name

        def call(*args: Any, **kwargs: Any) -> Any:
            if busy[0]:
                return saved[-1](*args, **kwargs)
            busy[0] = True
            try:
                out = saved[-1](*args, **kwargs)
            finally:
                busy[0] = False
            if depth[0] or not self.active or not torch.is_grad_enabled():
                return out
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if not isinstance(out, Tensor) or not out.requires_grad or not isinstance(weight, Tensor):
                return out
            base = weight if weight._base is None else weight._base
            sinks = by_expert.get(id(base)) if weight._base is not None else None
            if sinks is not None:  # an expert's call, or another use the census leaves plain
                e = expert_index(weight, base)
                on_call = None if e is None else sinks.get(e)
            else:
                on_call = weights.get(id(base))
            if own and on_call is not None and not own_call(module, ORIGINALS[function], args, kwargs):
                return out  # other settings: the census leaves the layer plain
            if on_call is not None and isinstance(x, Tensor):
                rows = None if sinks is not None else _row_block(weight, base)
                _hook_output(out, on_call(x.detach(), rows))
            return out

        # run eagerly under torch.compile: which weight a call is on is known from real tensors only
        call = torch.compiler.disable(call)
        call.soo_function = function  # type: ignore[attr-defined]  # what the census's check takes it for

        # more names replaced during the forward: the experts' grouped product, a linear layer's ``x @ weight.T``
        patches = []
        if by_expert and GROUPED_MM is not None:  # ``F.grouped_mm`` calls it by this name
            patches.append((torch, "_grouped_mm", self._grouped(by_expert, depth, GROUPED_MM, transposed)))
            if (fallback := _transformers_fallback()) is not None:  # what transformers calls in its place
                stand_in = self._grouped(by_expert, depth, fallback, transposed)
                patches.append((torch.ops.transformers, "grouped_mm_fallback", stand_in))
        if own and function == "linear" and id(module.weight) in weights:
            patches += self._products(module, weights[id(module.weight)], depth)
            self._handles.append(module.register_forward_hook(self._by_forward(weights[id(module.weight)])))
        saved_patches: list[list[Any]] = []

        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if self.active and torch.is_grad_enabled():
                saved.append(getattr(F, function))
                setattr(F, function, call)  # the functional module's names are looked up at call time
                saved_patches.append([getattr(target, name) for target, name, _ in patches])
                for target, name, replacement in patches:
                    setattr(target, name, replacement)

        def post_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if saved:
                for (target, name, _), original in zip(patches, saved_patches.pop(), strict=True):
                    setattr(target, name, original)
                for _, _, replacement in patches:
                    getattr(replacement, "ends", {}).clear()
                setattr(F, function, saved.pop())

        def enter(mod: nn.Module, args: tuple[Any, ...]) -> None:
            depth[0] += 1

        def leave(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            depth[0] -= 1

        self._handles.append(module.register_forward_pre_hook(pre_hook))
        # prepended: calls attached later to the same module restore first (last in, first out)
        self._handles.append(module.register_forward_hook(post_hook, always_call=True, prepend=True))
        for other in outside:
            self._handles.append(other.register_forward_pre_hook(enter))
            self._handles.append(other.register_forward_hook(leave, always_call=True))

    def _products(self, module: nn.Module, on_call: OnCall, depth: list[int]) -> list[tuple[Any, str, Any]]:
        """A stand-in for the product ``x @ module.weight.T`` (the operator) during the forward of a linear layer
        that computes itself that way (``FalconLinear``; its bias, added after, gets the same output gradient): the
        call's input and output go to the layer's sink, as an ``F.linear`` call's (on the census step; from then on
        its forward hook does, ``by_forward``)."""

        def stand_in(original: Any) -> Any:
            def product(a: Any, b: Any, *rest: Any, **kw: Any) -> Any:
                out = original(a, b, *rest, **kw)
                if rest or kw or depth[0] or not self.active or not torch.is_grad_enabled():
                    return out
                if id(module) in self.by_forward:
                    return out  # its forward hook hands the call over
                if isinstance(out, Tensor) and out.requires_grad and own_product(module, MATMULS[0], (a, b), {}):
                    _hook_output(out, on_call(a.detach(), None))
                return out

            return torch.compiler.disable(product)

        # only the operator: the torch-function mode finds ``Tensor.matmul`` by name, so replacing it would hand the
        # census the stand-in
        patches = [(torch.Tensor, "__matmul__", stand_in(torch.Tensor.__matmul__))]
        return patches

    def _by_forward(self, on_call: OnCall) -> Any:
        """The forward hook of a layer in ``by_forward``: its module call's input and output are the layer's."""

        def forward_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if id(mod) not in self.by_forward or not self.active or not torch.is_grad_enabled():
                return
            if isinstance(output, Tensor) and output.requires_grad and args and isinstance(args[0], Tensor):
                _hook_output(output, on_call(args[0].detach(), None))

        return forward_hook

    def _grouped(
        self, by_expert: Mapping[int, Mapping[int, OnCall]], depth: list[int], original: Any, transposed: Set[int]
    ) -> Any:
        """The stand-in for ``torch._grouped_mm`` (or ``original``, an op of the same meaning) during an experts
        module's forward: a grouped product of rows sorted by expert with ``p.transpose(-2, -1)`` (transformers'
        ``grouped_mm`` experts; ``p`` itself where it is in ``transposed``) hands each expert's rows
        ``x[offs[e-1]:offs[e]]`` to its sink, and the same rows of the output's gradient. The offsets are read on the
        host once per forward (one synchronisation per experts module on statistics steps; the module's products
        share one ``offs``): the rows of each expert are then known sizes, as in the eager loop."""
        ends: dict[int, tuple[Tensor, list[int]]] = {}  # id(offs) -> (offs, its values), for one forward

        def grouped(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if depth[0] or not self.active or not torch.is_grad_enabled():
                return out
            found = grouped_arguments(GROUPED_MM, args, kwargs)
            if found is None or not isinstance(out, Tensor) or not out.requires_grad:
                return out
            x, weight, offs = found
            base = weight if weight._base is None else weight._base
            sinks = by_expert.get(id(base))
            stored = id(base) in transposed  # ``(E, in, out)``: the parameter itself, else its transpose
            if sinks is None or not (weight is base if stored else expert_transposed(weight, base)):
                return out  # another use: the census leaves the experts plain
            known = ends.get(id(offs))
            if known is None or known[0] is not offs:
                known = ends[id(offs)] = (offs, [int(v) for v in offs.tolist()])  # reads the device
            parts = []
            start = 0
            for e, end in enumerate(known[1]):
                on_call = sinks.get(e)
                callback = on_call(x[start:end].detach(), None) if end > start and on_call is not None else None
                if callback is not None:
                    parts.append((start, end, callback))
                start = max(start, end)

            def split(grad: Tensor) -> None:
                for a, b, callback in parts:
                    callback(grad[a:b])

            if parts:
                _hook_output(out, split)
            return out

        grouped = torch.compiler.disable(grouped)
        grouped.ends = ends  # type: ignore[attr-defined]
        return grouped

    def detach(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.active = False


def _transformers_fallback() -> Any:
    """transformers' grouped product for where ``grouped_mm`` cannot run (under ``torch.compile`` in another dtype
    than bfloat16, misaligned CPU tensors): a custom op of the same arguments and meaning (None: not registered)."""
    namespace = getattr(torch.ops, "transformers", None)
    return getattr(namespace, "grouped_mm_fallback", None) if namespace is not None else None


def _row_block(weight: Tensor, base: Tensor) -> slice | None:
    """The rows of ``base`` that the view ``weight`` is (None: all of it)."""
    if weight is base or weight.shape == base.shape:
        return None
    start = (weight.data_ptr() - base.data_ptr()) // (base.element_size() * base.stride(0))
    return slice(start, start + weight.shape[0])
