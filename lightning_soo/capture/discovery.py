"""Which layers of a model can be preconditioned, how each is captured, and why the other parameters cannot.

A managed layer is one weight (a parameter, a block of rows of one, or one expert ``p[e]`` of a 3-d one) and its
bias, preconditioned once per step from the statistics of all its uses. A use is a module call whose forward hook
sees the input and output (``nn.Linear``, ``nn.Conv*``, ``nn.Embedding``, Hugging Face's ``Conv1D``) or a
functional call inside a module's forward: ``F.linear`` inside ``nn.MultiheadAttention`` (its projections never run
as modules), the own call of a layer whose class overrides forward or of a router (``calls``), an expert's
``F.linear(x, p[e])`` inside the module holding ``p``; ``F.linear`` calls on a managed weight
elsewhere are found by the census (``hooks``) and added by ``functional_use``. A use is ``"normal"`` when its input
side is the layer's input side, ``"transposed"`` when the orientation is swapped: a weight tied between an
``nn.Embedding`` (layer ``W = weightᵀ``, vocabulary on the input side) and an ``nn.Linear`` head (vocabulary on
its output side). Uses that capture cannot see (a tied weight in a convolution, a call of the weight outside its
modules found by the census of ``hooks``) leave the whole parameter plain, with the reason. A trainable parameter
outside every such layer is a layer of its own without uses (``ParameterAdapter``), which only the methods that
fit from the gradient take.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn
from torch.nn.utils import parametrize

from lightning_soo.capture.adapters import (
    Conv1DAdapter,
    ConvAdapter,
    EmbeddingAdapter,
    GroupConvAdapter,
    LayerAdapter,
    LinearAdapter,
    Part,
    UnsupportedLayerError,
    WeightSharing,
)
from lightning_soo.capture.calls import functional_linear, overridden_base
from lightning_soo.capture.gradient_only import ParameterAdapter
from lightning_soo.capture.make import make_adapter

Role = Literal["normal", "transposed"]


@dataclass
class Use:
    """One way a layer's weight is called: by ``module``'s forward (hooked) or by ``F.linear`` calls inside
    ``module``'s forward (``calls=True``: the projections of ``nn.MultiheadAttention``, a head written as
    ``F.linear(x, wte.weight)``); ``rows`` makes the rows."""

    module: nn.Module
    rows: LayerAdapter
    role: Role = "normal"
    calls: bool = False
    own: bool = False  # the calls are the module's own (a subclass overriding forward): the census checks them


def _use(module: nn.Module, rows: LayerAdapter, role: Role = "normal") -> Use:
    """The use of a layer module's call: hooked, or its own functional call where its class overrides forward or is
    not a torch layer (a router whose forward calls ``F.linear`` on its weight)."""
    own = overridden_base(module) is not None or functional_linear(module)
    return Use(module, rows, role, calls=own, own=own)


def _expert_specs(
    name: str, module: nn.Module, pname: str, param: nn.Parameter, sharing: WeightSharing
) -> list[LayerSpec]:
    """One linear layer per expert ``param[e]`` of a 3-d parameter of ``module``, captured at the
    ``F.linear(x, param[e])`` calls of ``module``'s forward or its grouped products; the census checks that they
    are its only uses. transformers' experts stored ``(E, in, out)`` (``is_transposed``, GPT-OSS) are transposed
    layers, with their bias ``<name>_bias`` (``has_bias``) a row of ``(E, out)`` each."""
    transposed = getattr(module, "is_transposed", False) is True
    out = param.shape[2] if transposed else param.shape[1]
    bias = module._parameters.get(f"{pname}_bias") if getattr(module, "has_bias", False) is True else None
    if bias is not None and tuple(bias.shape) != (param.shape[0], out):
        bias = None
    kind = Conv1DAdapter if transposed else LinearAdapter
    specs = []
    for e in range(param.shape[0]):
        adapter = kind(module, sharing, weight=Part(param, e), bias=Part(bias, e) if bias is not None else None)
        specs.append(LayerSpec(f"{name}.{e}", adapter, [Use(module, adapter, calls=True, own=True)]))
    return specs


@dataclass
class LayerSpec:
    """A managed layer: its adapter (the matrix view) and its uses."""

    name: str
    adapter: LayerAdapter
    uses: list[Use] = field(default_factory=list)

    @property
    def module(self) -> nn.Module:
        return self.adapter.module

    @property
    def transposed_uses(self) -> bool:
        return any(use.role == "transposed" for use in self.uses)


def _attention_specs(name: str, mha: nn.MultiheadAttention, sharing: WeightSharing) -> list[LayerSpec]:
    """``in_proj`` (packed) or ``q/k/v_proj`` (separate, bias a block of ``in_proj_bias``), and ``out_proj``."""
    specs = []
    e = mha.embed_dim
    bias = mha.in_proj_bias
    if mha._qkv_same_embed_dim:
        weights = [("in_proj", mha.in_proj_weight, None)]
        ranges = [slice(0, 3 * e)]
    else:
        weights = [(f"{k}_proj", getattr(mha, f"{k}_proj_weight"), None) for k in "qkv"]
        ranges = [slice(i * e, (i + 1) * e) for i in range(3)]
    for (short, w, _), rows in zip(weights, ranges, strict=True):
        b = None if bias is None else Part(bias, None if mha._qkv_same_embed_dim else rows)
        adapter = LayerAdapter(mha, "expand", weight=Part(w), bias=b)  # positions: (seq, batch) or (batch, seq)
        specs.append(LayerSpec(f"{name}.{short}" if name else short, adapter, [Use(mha, adapter, calls=True)]))
    out = LinearAdapter(mha.out_proj, "expand")
    oname = f"{name}.out_proj" if name else "out_proj"
    specs.append(LayerSpec(oname, out, [Use(mha, out, calls=True)]))
    return specs


def functional_use(spec_adapter: LayerAdapter, module: nn.Module) -> Use | None:
    """The use ``F.linear(x, weight[, bias])`` inside ``module``'s forward of a layer's whole weight (with the
    layer's own bias where it has one: the census admits no other call), or None when it cannot join the layer: a
    weight of a convolution or a block."""
    if type(spec_adapter) not in (LinearAdapter, EmbeddingAdapter) or spec_adapter.weight.rows is not None:
        return None
    bias = None if spec_adapter.transposed else spec_adapter.bias
    if bias is not None and bias.rows is not None:
        return None
    rows = LayerAdapter(module, spec_adapter.weight_sharing, weight=spec_adapter.weight, bias=bias)
    return Use(module, rows, "transposed" if spec_adapter.transposed else "normal", calls=True)


def eager_name(name: str) -> str:
    """The name without ``torch.compile``'s ``_orig_mod`` segments, so that ``exclude`` patterns, warnings and
    checkpoints use the names of the eager model."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def excluded_by(name: str, patterns: Sequence[str]) -> bool:
    """``name`` or one of the modules it lies in matches a pattern (``fnmatch``): ``"decoder"`` excludes every layer
    under the module ``decoder``, ``"*.out_proj"`` every ``out_proj``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))] if name else [""]
    return any(fnmatch.fnmatchcase(prefix, pat) for prefix in prefixes for pat in patterns)


def unmatched_patterns(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The ``exclude`` patterns that match no module or parameter name of ``model`` (eager names)."""
    names = [eager_name(n) for n, _ in model.named_modules()] + [eager_name(n) for n, _ in model.named_parameters()]
    return [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]


def discover(
    model: nn.Module, exclude: Sequence[str] = (), weight_sharing: WeightSharing = "expand", max_conv_groups: int = 0
) -> tuple[list[LayerSpec], dict[str, str], dict[str, str]]:
    """(managed layers, parameter name -> reason it stays plain, parameter name -> excluded by the user).

    Layers whose name, or the name of a module they lie in, matches an ``exclude`` pattern (``excluded_by``) are
    listed apart; frozen layers are managed (and listed): they cost nothing while frozen and are preconditioned once
    unfrozen (fine-tuning). A convolution of 2 to ``max_conv_groups`` groups is also a layer per group, for the
    methods that take rows.
    """
    by_param: dict[int, LayerSpec] = {}  # weight parameter -> its layer (a tied weight has one layer)
    specs: list[LayerSpec] = []
    plain: dict[str, str] = {}
    excluded: dict[str, str] = {}
    inside_attention: set[int] = set()
    names: dict[int, str] = {}  # parameter -> its first name (as ``named_parameters()`` lists a shared one)
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), eager_name(n))

    refused: dict[str, tuple[nn.Module, str]] = {}  # parameter name -> (module, why its layer's rows are refused)

    def skip(mname: str, module: nn.Module, reason: str) -> None:
        """Every direct parameter of ``module``, and those of its parametrizations (weight_norm's), has no layer
        rows: each is a parameter of its own for the methods that fit from the gradient, plain for the others."""
        own = list(module.named_parameters(recurse=False))
        if parametrize.is_parametrized(module):
            own += module.get_submodule("parametrizations").named_parameters(prefix="parametrizations")
        for pname, _ in own:
            refused.setdefault(f"{mname}.{pname}" if mname else pname, (module, reason))

    broken: dict[int, str] = {}  # tied weights with a use capture cannot see
    experts: dict[int, nn.Module] = {}  # 3-d parameter -> its module (its experts are layers)
    for raw_name, module in model.named_modules(remove_duplicate=False):
        mname = eager_name(raw_name)
        if id(module) in inside_attention:
            continue
        attention = isinstance(module, nn.MultiheadAttention)
        try:
            adapter = None if attention else make_adapter(module, weight_sharing)
        except UnsupportedLayerError as err:
            skip(mname, module, str(err))
            continue
        if adapter is None and not attention:
            if isinstance(module, parametrize.ParametrizationList):
                continue  # weight_norm's ``original0/1``: plain with their module (``skip``)
            for pname, p in module.named_parameters(recurse=False):  # the experts of a mixture-of-experts layer
                if p.dim() != 3 or p.shape[0] < 2 or min(p.shape[1:]) < 2:
                    continue  # experts are matrices: not a per-head scale ``(heads, 1, 1)``
                seen = id(p) in experts  # in another module, or in this one registered under two names
                if experts.setdefault(id(p), module) is not module:
                    broken[id(p)] = f"3-d parameter also in {type(module).__name__} '{mname}', a use not captured"
                if seen:
                    continue
                full = f"{mname}.{pname}" if mname else pname
                if excluded_by(full, exclude):
                    excluded[full] = "excluded by you"
                    continue
                specs.extend(_expert_specs(full, module, pname, p, weight_sharing))
            continue
        if excluded_by(mname, exclude):
            for pname, _ in module.named_parameters():
                excluded[f"{mname}.{pname}" if mname else pname] = "excluded by you"
            inside_attention.update(id(m) for m in module.modules())
            continue
        if attention:
            inside_attention.update(id(m) for m in module.modules())
            specs.extend(_attention_specs(mname, module, weight_sharing))
            continue
        assert adapter is not None
        if isinstance(adapter, ConvAdapter) and 1 < module.groups <= max_conv_groups:  # for the methods taking rows
            adapter.split_for_hooks = True
            for g in range(module.groups):
                group = GroupConvAdapter(module, g, weight_sharing)
                specs.append(LayerSpec(f"{mname}.group{g}", group, [_use(module, group)]))
        known = by_param.get(id(adapter.weight.param))
        if known is None:
            spec = LayerSpec(mname, adapter, [_use(module, adapter)])
            by_param[id(adapter.weight.param)] = spec
            specs.append(spec)
            continue
        if any(u.module is module for u in known.uses):
            continue  # the same module registered under two names
        # a weight tied to a layer found before: another use, in the same or the swapped orientation
        if not {type(known.adapter), type(adapter)} <= {LinearAdapter, EmbeddingAdapter}:
            broken[id(adapter.weight.param)] = f"weight tied between {type(known.module).__name__} and " + (
                f"{type(module).__name__} '{mname}', a use that is not captured"
            )
            continue
        same = adapter.transposed == known.adapter.transposed
        # an embedding's rows are one-hot in either orientation (``IndexRows`` on the layer's output side when the
        # tied head came first); a head's are dense rows of the embedding's layer
        keep_own = same or isinstance(adapter, EmbeddingAdapter)
        rows = adapter if keep_own else LinearAdapter(module, weight_sharing, weight=adapter.weight)
        known.uses.append(_use(module, rows, "normal" if same else "transposed"))
        if adapter.has_bias and (not same or known.adapter.bias is None):  # not part of the tied layer
            bias = adapter.bias.param  # type: ignore[union-attr]
            plain[names.get(id(bias), f"{mname}.bias" if mname else "bias")] = (  # its first name: reported once
                f"{type(module).__name__}: bias of a module whose weight is tied"
            )
            rows.bias = None
        elif adapter.has_bias and adapter.bias.param is not known.adapter.bias.param:  # type: ignore[union-attr]
            broken[id(adapter.weight.param)] = "weight tied between modules with different biases"
    for spec in [s for s in specs if id(s.adapter.weight.param) in broken]:
        specs.remove(spec)
        for p in spec.adapter.params:
            plain[names.get(id(p), spec.name)] = (
                f"{type(spec.module).__name__}: {broken[id(spec.adapter.weight.param)]}"
            )
    covered = {id(p) for spec in specs for p in spec.adapter.params}
    for raw_name, p in model.named_parameters():
        pname = eager_name(raw_name)
        if id(p) in covered or pname in plain or pname in excluded or not p.requires_grad:
            continue
        owner = raw_name.rsplit(".", 1)[0] if "." in raw_name else ""
        if excluded_by(pname, exclude):
            excluded[pname] = "excluded by you"
            continue
        module, why = refused.get(pname, (model.get_submodule(owner) if owner else model, ""))
        if p.numel() == 0:
            plain[pname] = f"{type(module).__name__}: {why or 'not in a supported module'} (empty)"
            continue
        specs.append(LayerSpec(pname, ParameterAdapter(module, p, weight_sharing, why)))  # for gradient methods
    for spec in specs:
        if not all(p.requires_grad for p in spec.adapter.params):
            for p in spec.adapter.params:
                plain.setdefault(
                    names.get(id(p), spec.name), "frozen (requires_grad=False); preconditioned once unfrozen"
                )
    return specs, plain, excluded
