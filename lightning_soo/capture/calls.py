"""The functional call a layer module makes on its own weight, for subclasses that override ``forward``.

``nn.Linear``, ``nn.Embedding`` and ``nn.Conv*d`` compute their output with one call (``F.linear``, ``F.embedding``,
``F.conv*d``) on their own weight. A subclass that overrides ``forward`` may do more around it: compute positions
from a mask (OPT), scale the output (Gemma's and BART's word embeddings), pad the input (timm's ``Conv2dSame``). Its
module call's input and output are then not the layer's; the functional call made inside is. Such a layer is
captured at that call (``Capture.attach_calls``), and the census checks once that the override uses its weight
(and bias) in that call only, with the module's own settings (``own_call``); any other use leaves it plain.

Two more forms are captured at their ``F.linear`` calls the same way (mixture-of-experts models): a module of any
class whose 2-d ``weight`` (and 1-d ``bias``) is used only as ``F.linear(x, self.weight[, self.bias])`` (a router,
``functional_linear``), and each expert slice ``param[e]`` of a module's 3-d parameter used only as
``F.linear(x, param[e])`` (``expert_index``): each expert is a linear layer of its own. transformers' default
experts implementation makes one grouped product of all experts instead, ``grouped_mm(x, param.transpose(-2, -1),
offs=offs)`` on rows sorted by expert (``grouped_call``): expert ``e``'s rows are ``x[offs[e-1]:offs[e]]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the convolution layers capture supports (grouped and transposed ones are refused by their adapter)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: the functional API's originals (``Capture.attach_calls`` replaces them during a module's forward)
ORIGINALS: dict[str, Any] = {name: getattr(F, name) for name in ("linear", "embedding", "conv1d", "conv2d", "conv3d")}
#: the product ``x @ w`` (the torch-function mode sees ``Tensor.matmul`` for the operator)
MATMULS: tuple[Any, ...] = (torch.Tensor.matmul, torch.Tensor.__matmul__)
#: the additions ``h + b`` calls
ADDS: tuple[Any, ...] = (torch.Tensor.add, torch.add, torch.Tensor.__add__, torch.Tensor.__radd__)
#: torch's grouped product (``F.grouped_mm`` calls it by this name; None in a torch without it)
GROUPED_MM: Any = getattr(torch, "_grouped_mm", None)
_SIGNATURES = {
    "linear": ("input", "weight", "bias"),
    "embedding": ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
}
_DEFAULTS: dict[str, Any] = {
    "bias": None, "padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False,
    "sparse": False, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
}  # fmt: skip


def overridden_base(module: nn.Module) -> type[nn.Module] | None:
    """The torch layer class whose ``forward`` the class of ``module`` overrides (None: it does not)."""
    base = next((b for b in (nn.Linear, nn.Embedding, *CONV_TYPES) if isinstance(module, b)), None)
    return base if base is not None and type(module).forward is not base.forward else None


def functional_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a candidate linear layer of a class capture does not know (a mixture-of-experts router): a
    2-d parameter ``weight`` and no bias, or a 1-d parameter ``bias`` of its rows. The census checks that its forward
    uses them only as ``F.linear(x, self.weight[, self.bias])``; any other use leaves it plain."""
    if isinstance(module, (nn.Linear, nn.Embedding, *CONV_TYPES, nn.MultiheadAttention)):
        return False
    weight, bias = module._parameters.get("weight"), getattr(module, "bias", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or type(module).__name__ == "Conv1D":
        return False  # Hugging Face's ``Conv1D`` is a layer of its own (``addmm`` on a transposed weight)
    return bias is None or (isinstance(bias, nn.Parameter) and bias.shape == weight.shape[:1])


def expert_index(weight: Tensor, base: Tensor) -> int | None:
    """``e`` where ``weight`` is the view ``base[e]`` of a 3-d ``base`` (one expert's matrix), else None: its shape,
    strides and offset say so (no host read of tensor data)."""
    if base.dim() != 3 or weight.shape != base.shape[1:] or weight.stride() != base.stride()[1:]:
        return None
    offset = weight.data_ptr() - base.data_ptr()
    step = base.element_size() * base.stride(0)
    e, rest = divmod(offset, step) if step else (0, offset)
    return e if rest == 0 and 0 <= e < base.shape[0] else None


def expert_call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], arg: Tensor, base: Tensor) -> bool:
    """Whether ``func(*args, **kwargs)`` is ``F.linear(x, base[e])`` with ``arg`` as that weight and no bias: an
    expert's own call."""
    b = _bound("linear", args, kwargs) if func is ORIGINALS["linear"] else None
    return b is not None and b["weight"] is arg and b["bias"] is None and expert_index(arg, base) is not None


def transposed_view(t: Tensor, weight: Any) -> bool:
    """Whether ``t`` is ``weight.T`` (a 2-d weight's transposed view: shape, strides and storage, no data read)."""
    return isinstance(weight, Tensor) and (
        t._base is weight and weight.dim() == 2 and t.shape == weight.shape[::-1]
        and t.stride() == weight.stride()[::-1] and t.data_ptr() == weight.data_ptr()
    )  # fmt: skip


def own_product(module: nn.Module, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``func(*args, **kwargs)`` is ``x @ module.weight.T`` (``FalconLinear``'s form of a linear layer, its
    bias added to the product after: ``adds_bias``)."""
    return (
        function_name(module) == "linear" and func in MATMULS and len(args) == 2 and not kwargs
        and isinstance(args[0], Tensor) and isinstance(args[1], Tensor) and transposed_view(args[1], module.weight)
    )  # fmt: skip


def adds_bias(
    module: nn.Module, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], products: list[Tensor]
) -> bool:
    """Whether ``func(*args, **kwargs)`` adds ``module.bias`` to one of ``products`` (its ``x @ weight.T``)."""
    bias = getattr(module, "bias", None)
    if func not in ADDS or kwargs or len(args) != 2 or bias is None:
        return False
    a, b = args
    other = b if a is bias else a if b is bias else None
    return other is not None and any(other is t for t in products)


def grouped_call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], arg: Tensor, base: Tensor) -> bool:
    """Whether ``func(*args, **kwargs)`` is ``torch._grouped_mm(x, base.transpose(-2, -1), offs=offs)`` with ``arg``
    as that weight (2-d rows sorted by group, no bias, no output dtype): every expert's ``F.linear(x_e, base[e])``
    in one call."""
    b = grouped_arguments(func, args, kwargs)
    return b is not None and b[1] is arg and expert_transposed(arg, base)


def grouped_arguments(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(x, weight, offs)`` of a ``torch._grouped_mm`` call of 2-d rows by a 3-d weight, grouped by ``offs``,
    without a bias or an output dtype (None: another call)."""
    if GROUPED_MM is None or func is not GROUPED_MM:
        return None
    names = ("self", "mat2", "offs", "bias", "out_dtype")
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    b = {**dict.fromkeys(names), **dict(zip(names, args, strict=False)), **kwargs}
    x, weight, offs = b["self"], b["mat2"], b["offs"]
    if b["bias"] is not None or b["out_dtype"] is not None or not isinstance(offs, Tensor):
        return None
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or x.dim() != 2 or weight.dim() != 3:
        return None
    return x, weight, offs


def expert_transposed(weight: Tensor, base: Tensor) -> bool:
    """Whether ``weight`` is the view ``base.transpose(-2, -1)`` of a 3-d ``base`` (shape and strides: no host
    read of tensor data)."""
    if base.dim() != 3 or weight.dim() != 3 or weight.data_ptr() != base.data_ptr():
        return False
    e, o, i = base.shape
    s0, s1, s2 = base.stride()
    return tuple(weight.shape) == (e, i, o) and weight.stride() == (s0, s2, s1)


def function_name(module: nn.Module) -> str:
    """The ``torch.nn.functional`` name of the call ``module``'s own forward makes (``linear``, ``conv2d``, ...)."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, CONV_TYPES):
        return f"conv{len(module.kernel_size)}d"
    return "linear"


def _bound(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    names = _SIGNATURES[kind]
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    bound = {**{n: _DEFAULTS.get(n) for n in names}, **dict(zip(names, args, strict=False)), **kwargs}
    return bound


def _tuple(value: Any, n: int) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def own_call(module: nn.Module, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``func(*args, **kwargs)`` is ``module``'s own computation: its functional call on the whole weight,
    with its bias and settings (what ``nn.Linear``/``nn.Embedding``/``nn.Conv*d.forward`` would call)."""
    name = function_name(module)
    if func is not ORIGINALS[name]:
        return False
    b = _bound("conv" if name.startswith("conv") else name, args, kwargs)
    if b is None or b["weight"] is not module.weight:
        return False
    if name == "embedding":
        pad = b["padding_idx"]
        pad = pad + module.weight.shape[0] if isinstance(pad, int) and pad < 0 else pad
        return (pad, b["max_norm"], b["scale_grad_by_freq"], b["sparse"]) == (
            module.padding_idx, module.max_norm, module.scale_grad_by_freq, module.sparse
        )  # fmt: skip
    if b["bias"] is not getattr(module, "bias", None):
        return False
    if name == "linear":
        return True
    assert isinstance(module, CONV_TYPES)
    nd = len(module.kernel_size)
    padding = b["padding"] if isinstance(b["padding"], str) else _tuple(b["padding"], nd)
    own = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return module.padding_mode == "zeros" and (
        _tuple(b["stride"], nd), padding, _tuple(b["dilation"], nd), b["groups"]
    ) == (tuple(module.stride), own, tuple(module.dilation), module.groups)  # fmt: skip
