"""The census: once, on the first statistics step, a ``TorchFunctionMode`` sees every torch call that uses a
managed parameter (``capture.hooks`` captures the calls it checks), and reports the uses made outside the modules
that capture it (``F.linear(x, wte.weight)`` in a parent's forward, ``x @ w.T``). An ``F.linear`` call on the whole
weight without a bias is then captured from the next statistics step on (``calls``); a parameter with any other
such use stays plain, never gets one use's curvature applied to the gradient of all. It also checks the uses inside
the modules that capture a weight at a call (a subclass's own call, its ``x @ self.weight.T``, a mixture of
experts' slices and grouped products, their biases gathered by expert), and reports a managed module whose output
is broadcast along the batch (``broadcast``): that layer has no per-example output gradients. Other steps carry no
mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_soo.capture.calls import (
    ADDS,
    ORIGINALS,
    adds_bias,
    expert_call,
    grouped_arguments,
    grouped_call,
    own_call,
    own_product,
    transposed_view,
)

#: torch calls that broadcast their operands, by name
_BROADCASTING = frozenset(
    f"{prefix}{op}{suffix}" if prefix else op
    for op in ("add", "sub", "mul", "truediv", "matmul")
    for prefix, suffix in (("", ""), ("__", "__"), ("__r", "__"), ("__i", "__"))
) | {"add_", "sub_", "mul_", "div", "div_", "where", "addcmul", "lerp", "expand", "expand_as", "broadcast_to", "repeat"}
_BROADCASTING |= {"scaled_dot_product_attention", "masked_fill"}  # an attention bias or mask of the layer's


#: calls that only reshape or retype a tensor: the census follows a managed module's output through them
_RESHAPING = frozenset(
    {"view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "flatten", "unflatten", "contiguous"}
    | {"__getitem__", "to", "float", "half", "bfloat16", "type_as", "clone", "movedim", "view_as", "reshape_as"}
)


class Census(TorchFunctionMode):
    """Finds the uses of managed parameters that capture does not see.

    ``owners`` maps a parameter id to the modules whose calls capture it; a torch call that takes the parameter (or
    a view of it) and returns a tensor that requires grad is a use, seen when the innermost module running is one of
    those owners (tracked by pre- and post-forward hooks during the census). ``foreign`` collects the others as
    parameter id -> description; ``calls`` maps a parameter id to the modules in whose forward it was used only
    as ``F.linear(x, weight)`` (the whole parameter, no bias), which ``Capture.attach_calls`` can capture.
    """

    def __init__(
        self,
        model: nn.Module,
        owners: dict[int, set[int]],
        batch_size: int | None = None,
        own: dict[int, nn.Module] | None = None,
        biases: dict[int, int] | None = None,
        experts: set[int] | None = None,
        transposed: set[int] | None = None,
        paired: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.experts = experts or set()  # 3-d parameters whose experts are layers: only ``F.linear(x, p[e])`` is theirs
        self.transposed = transposed or set()  # those stored ``(E, in, out)``: grouped on the parameter itself
        self.paired = paired or {}  # an expert bias ``(E, out)`` -> its 3-d weight: added per row after the product
        self._grouped: dict[int, tuple[Tensor, int, Tensor]] = {}  # grouped product -> (it, its weight, offsets)
        self._gathers: dict[int, tuple[Tensor, int, Tensor]] = {}  # ``bias[ids]`` -> (it, the bias, ids)
        self.biases = biases or {}  # weight id -> its layer's bias id (a call outside may pass it: torchvision's Swin)
        self.own = own or {}  # module id -> a layer module whose class overrides forward: its own call is checked
        self.unmatched: dict[int, str] = {}  # parameter id -> a use inside such a module that is not its own call
        self.own_seen: set[int] = set()  # modules whose own call was seen (with grad)
        self.batch_size = batch_size  # the step's, where known: which broadcast dimension is the batch
        self.owners = owners
        self.stack: list[int] = []
        self.foreign: dict[int, str] = {}
        self.calls: dict[int, dict[int, nn.Module]] = {}
        self._other: set[int] = set()  # parameters with a foreign use that is not a capturable F.linear call
        self.broadcast: dict[int, str] = {}  # parameter id -> the call that broadcast its module's output
        self._made_by: dict[int, set[int]] = {}  # module id -> the managed parameters whose calls it makes
        for pid, modules in owners.items():
            for mid in modules:
                self._made_by.setdefault(mid, set()).add(pid)
        self._outputs: dict[int, tuple[Tensor, set[int]]] = {}  # the census step's outputs of those modules
        self._per_example: set[int] = set()  # those of them (ids) made from the batch: rows one per example
        self._products: dict[int, list[Tensor]] = {}  # module id -> its ``x @ self.weight.T`` outputs (this step)
        self._made: dict[int, tuple[Any, Tensor]] = {}  # module id -> the product's input and the result, this call
        self.forward_form: set[int] = set()  # modules whose product is on their input and is their output (+ bias)
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(lambda m, a: self.stack.append(id(m))),
            nn.modules.module.register_module_forward_hook(self._pop, always_call=True),
        ]
        self._model_modules = {id(m): m for m in model.modules()}

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()
        product = self._made.pop(id(module), None)
        if product is not None:  # ``x @ self.weight.T (+ self.bias)``: on the module's input, its output?
            if args and args[0] is product[0] and output is product[1]:
                self.forward_form.add(id(module))
            else:
                self.unmatched.setdefault(id(module.weight), "x @ self.weight.T not on its own input and output")
        pids = self._made_by.get(id(module))
        if pids and isinstance(output, Tensor):
            made = self._outputs.get(id(output))  # made from another layer's output too (``wpe`` -> Linear)
            self._outputs[id(output)] = (output, pids | made[1] if made and made[0] is output else pids)
            x = args[0] if args else None
            batch = self.batch_size
            if isinstance(x, Tensor) and x.dim() > 0 and batch is not None and batch > 1 and x.shape[0] == batch:
                self._per_example.add(id(output))  # called on the batch: its rows are the examples'

    def _batchless(self, t: Tensor) -> bool:
        """``t`` has no batch dimension: a leading 1, or no dimension of the step's batch size where it is known."""
        batch = self.batch_size
        return t.dim() > 1 and (t.shape[0] == 1 or (batch is not None and batch > 1 and batch not in t.shape))

    def _copies_for_batch(self, name: str, arg: Tensor, out: Tensor) -> bool:
        """``repeat``/``tile`` copying ``arg`` for every example: ``arg`` has no batch dimension, or its leading
        dimension is copied a multiple of the batch size times (DeBERTa's ``repeat(b, 1, 1)`` of a
        ``(heads, 2k, d)`` tensor whose sizes happen to include the batch size)."""
        if name not in ("repeat", "tile") or out.numel() <= arg.numel():
            return False
        if self._batchless(arg):
            return True
        batch, lead = self.batch_size, out.dim() - arg.dim()
        copies = out.shape[0] // (arg.shape[0] if lead == 0 else 1)
        return batch is not None and batch > 1 and copies % batch == 0

    def _along_batch(self, arg: Tensor, out: Tensor) -> bool:
        """Whether ``out`` copies ``arg`` along its batch dimension: the first dimension of ``out`` of a multiple of
        the step's batch size (dimension 0 where it is not known) is one that ``arg`` lacks or has of size 1, or a
        dimension of exactly the batch size is, and ``arg`` has none of that size (a sequence-first model's position
        embedding). A dimension ``arg`` spreads that only happens to equal the batch size while ``arg`` keeps a
        batch dimension before it (grouped-query attention's ``expand`` of keys) is not one."""
        lead = out.dim() - arg.dim()  # arg's dimensions align with out's last ones
        spread = [i for i in range(out.dim()) if out.shape[i] > 1 and (i < lead or arg.shape[i - lead] == 1)]
        if not spread:
            return False
        batch = self.batch_size
        if batch is None or batch < 2:
            return 0 in spread
        multiples = [i for i in range(out.dim()) if out.shape[i] % batch == 0]
        if multiples and multiples[0] in spread:
            return True
        return any(out.shape[i] == batch for i in spread) and batch not in arg.shape

    def _watch_broadcast(self, func: Any, args: tuple[Any, ...], out: Tensor) -> None:
        """A managed module's output broadcast along the batch dimension (``wpe(arange(t))`` added to every
        sequence): the gradient each of its rows gets is a sum over examples (``_along_batch`` says which dimension
        is the batch's). Shape-only calls (``permute``, ``unsqueeze``, ``view``, ...) of an output are followed, and
        so are calls that keep its shape (scaled, masked, activated) and calls on an output without a batch
        dimension that keep its leading shape (normalised, through another layer: T5's relative-position bias,
        ``Linear(wpe(pos))``, Swin-V2's position-bias MLP)."""
        name = getattr(func, "__name__", "")
        for arg in args:
            made = self._outputs.get(id(arg)) if isinstance(arg, Tensor) else None
            if made is None or made[0] is not arg:
                continue
            batchless = self._batchless(arg)
            same = out.shape == arg.shape
            if name in _RESHAPING or same or (batchless and out.shape[:-1] == arg.shape[:-1]):
                self._outputs[id(out)] = (out, made[1])
                if id(arg) in self._per_example and (same or name in _RESHAPING):
                    self._per_example.add(id(out))
            if self._copies_for_batch(name, arg, out) and not (id(arg) in self._per_example and out.dim() == arg.dim()):
                # copies of rows one per example (Llama-4's ``repeat(experts, 1)`` of its tokens) are no broadcast
                for pid in made[1]:
                    self.broadcast.setdefault(pid, f"{name} {tuple(arg.shape)} -> {tuple(out.shape)}")
            if name in _BROADCASTING and not same and self._along_batch(arg, out):
                for pid in made[1]:
                    self.broadcast.setdefault(pid, f"{name} {tuple(arg.shape)} -> {tuple(out.shape)}")

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        # ``F.embedding`` (Python) dispatches to its global name, which capture may have replaced: call the original,
        # so that a call capture does not see (``embedding`` bound by name) is not captured here either
        func = ORIGINALS.get(getattr(func, "soo_function", ""), func)
        out = func(*args, **(kwargs or {}))
        if not isinstance(out, Tensor) or not out.requires_grad:
            return out
        if self._outputs and not isinstance(func, type):
            self._watch_broadcast(func, (*args, *(kwargs or {}).values()), out)
        inner = next((m for m in reversed(self.stack) if m in self._model_modules), None)
        kwargs = kwargs or {}
        own: bool | None = None  # whether this is the own call of ``inner`` (a subclass overriding forward)
        if self._gathers:
            self._gathered_use(func, args, kwargs)
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, Tensor) and arg is not out:
                base = arg if arg._base is None else arg._base
                owners = self.owners.get(id(base))
                if owners is None:
                    continue
                if inner in owners:
                    if id(base) in self.experts:
                        self._expert_use(id(base), func, args, kwargs, arg, out, inner)
                    elif id(base) in self.paired:
                        self._expert_bias_use(id(base), func, args, arg, out)
                    elif inner in self.own:
                        if out is base or transposed_view(out, self.own[inner].weight):
                            continue  # capture's ``weight._base``; ``self.weight.T``, whose use is the product
                        own = self._own_form(inner, func, args, kwargs, out) if own is None else own
                        self._own_use(id(base), own, func, out, inner)
                    continue
                self.foreign.setdefault(id(base), _call_name(func))
                role = self._linear_role(func, args, kwargs, arg, base) if inner is not None else None
                if role == "weight" and inner is not None:
                    self.calls.setdefault(id(base), {})[inner] = self._model_modules[inner]
                elif role != "bias":
                    self._other.add(id(base))
        return out

    def _linear_role(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], arg: Tensor, base: Tensor) -> str:
        """What ``arg`` is in a capturable ``F.linear(x, weight, bias)``: the whole ``weight`` of a layer with its own
        bias or none (as the layer has), or that ``bias``; "" for any other use."""
        if func is not ORIGINALS["linear"] or arg is not base:
            return ""
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not isinstance(weight, Tensor) or weight._base is not None:
            return ""
        own_bias = self.biases.get(id(weight))
        if (bias is None) != (own_bias is None) or (bias is not None and id(bias) != own_bias):
            return ""
        return "weight" if arg is weight else "bias"

    def _own_form(self, inner: int, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> bool:
        """Whether a call inside a module that overrides forward (or a router) is its own computation: its
        functional call with its settings (``own_call``), or ``x @ self.weight.T`` and then ``+ self.bias`` on
        that product (``FalconLinear``)."""
        module = self.own[inner]
        if own_call(module, func, args, kwargs):
            return True
        if own_product(module, func, args, kwargs):
            self._products.setdefault(inner, []).append(out)
            self._made[inner] = (args[0], out)
            return True
        if adds_bias(module, func, args, kwargs, self._products.get(inner, [])):
            made = self._made.get(inner)
            self._made[inner] = (made[0] if made is not None else None, out)
            return True
        return False

    def _own_use(self, pid: int, own: bool, func: Any, out: Tensor, module: int) -> None:
        """A use of a managed parameter inside a module that overrides forward: its own call (whose output the
        broadcast check follows), or another use, which leaves the layer plain."""
        if not own:
            self.unmatched.setdefault(pid, _call_name(func))
            return
        self.own_seen.add(module)
        self._outputs[id(out)] = (out, self._made_by.get(module, set()))

    def _expert_use(
        self, pid: int, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], arg: Tensor, out: Tensor, module: int
    ) -> None:
        """A use of a 3-d parameter inside its module: a view of it (``p[e]``, whose own uses are seen as calls), or
        an expert's ``F.linear(x, p[e])``, or all experts' ``grouped_mm(x, p.transpose(-2, -1), offs=offs)``; any
        other use (``p[e] @ x``, a bias, ``grouped_mm`` on ``p`` itself, a gather ``p[ids]``) leaves it plain."""
        base = arg if arg._base is None else arg._base
        if out is base or out._base is base:  # a view, or the parameter read back (capture's ``weight._base``)
            return
        grouped = grouped_arguments(func, args, kwargs)
        if pid in self.transposed:  # ``grouped_mm(x, p, offs=offs)`` on the parameter itself
            ok = grouped is not None and grouped[1] is base
        else:
            ok = expert_call(func, args, kwargs, arg, base) or grouped_call(func, args, kwargs, arg, base)
        if not ok:
            self.unmatched.setdefault(pid, _call_name(func))
            return
        self.own_seen.add(module)
        if grouped is not None:
            self._grouped[id(out)] = (out, pid, grouped[2])

    def _expert_bias_use(self, pid: int, func: Any, args: tuple[Any, ...], arg: Tensor, out: Tensor) -> None:
        """A use of an expert bias ``(E, out)`` inside its module: the rows' biases gathered by their experts,
        ``bias[ids]`` (to be added to its weight's grouped product: ``_gathered_use``); any other use leaves the
        experts plain (the eager ``x @ p[e] + b[e]``, whose ``@`` compiled code would not let capture see)."""
        base = arg if arg._base is None else arg._base
        if out is base or out._base is base:  # a view (``b[e]``, whose uses are seen as calls), or read back
            return
        ids = args[1] if func is Tensor.__getitem__ and len(args) == 2 and args[0] is arg else None
        if isinstance(ids, Tensor) and ids.dim() == 1 and not ids.is_floating_point() and out.dim() == 2:
            self._gathers[id(out)] = (out, pid, ids)
        else:
            self.unmatched.setdefault(pid, _call_name(func))

    def _gathered_use(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> None:
        """A use of gathered expert biases: added (in place) to their weight's grouped product, each row its own
        expert's (the ids, read on the host once here, are the experts of the rows as the offsets group them), is
        the bias of those experts' layers; any other use leaves them plain."""
        for arg in (*args, *(kwargs or {}).values()):
            gathered = self._gathers.get(id(arg)) if isinstance(arg, Tensor) else None
            if gathered is None or gathered[0] is not arg:
                continue
            _, pid, ids = gathered
            other = args[0] if len(args) == 2 and args[1] is arg and not kwargs else None
            made = self._grouped.get(id(other)) if func in ADDS or func is Tensor.add_ else None
            if made is None or made[0] is not other or made[1] != self.paired[pid] or not _by_expert(ids, made[2]):
                self.unmatched.setdefault(pid, _call_name(func))
            del self._gathers[id(arg)]

    def close(self) -> dict[int, str]:
        """Remove the hooks; returns ``foreign`` (``calls`` keeps only parameters with no other foreign use)."""
        for handle in self._handles:
            handle.remove()
        for pid in self._other:
            self.calls.pop(pid, None)
        for _, pid, _ in self._gathers.values():  # gathered and never added to the product
            self.unmatched.setdefault(pid, "__getitem__")
        self._outputs.clear()
        self._per_example.clear()
        self._products.clear()
        self._grouped.clear()
        self._gathers.clear()
        return self.foreign


def _call_name(func: Any) -> str:
    """A torch call's name for a message: an attribute read (``w.T``) as ``.T``, not its getter's ``__get__``."""
    name = getattr(func, "__name__", str(func))
    attribute = getattr(getattr(func, "__self__", None), "__name__", None) if name == "__get__" else None
    return f".{attribute}" if isinstance(attribute, str) else name


def _by_expert(ids: Tensor, offs: Tensor) -> bool:
    """Whether the rows' ``ids`` are the experts the offsets group them by (``e`` for the rows before
    ``offs[e]``; rows past the last offset are no expert's). Reads the device: the census's step only."""
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    expected = torch.repeat_interleave(torch.arange(offs.numel(), device=ids.device), counts.to(ids.device))
    return ids.shape[0] >= expected.shape[0] and bool(torch.equal(ids[: expected.shape[0]].long(), expected))
