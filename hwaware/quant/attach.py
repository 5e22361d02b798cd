"""Attach fake quantization to a user's own modules without changing what research code sees.

``attach_quantization(model, ...)`` gives each supported layer (``nn.Linear``, ``nn.Conv1d``,
``nn.Conv2d``, ``nn.Embedding``, ``nn.EmbeddingBag``) a :class:`QuantState` and swaps its class for
a generated subclass whose ``forward`` fake-quantizes (the technique ``torch.nn.utils.parametrize``
uses), so ``isinstance(layer, nn.Linear)`` keeps working. Unlike parametrization:

- the module's ``state_dict`` keys never change (``weight`` stays a Parameter named ``weight``), so
  a checkpoint written in any phase loads into a fresh, unquantized model; the quantizers' own
  state (scales, observer statistics) is kept outside the module tree and saved by the callback;
- embedding tables fake-quantize only the rows a batch gathers: row-wise scales depend on the row
  alone, so this equals quantizing the whole table, at a cost proportional to the lookups.

Modules whose class overrides ``forward`` (a user's ``LoRALinear(nn.Linear)``) are never touched:
they are reported as skipped with the reason.

``nn.MultiheadAttention`` multiplies its ``in_proj_weight`` (a bare Parameter) and ``out_proj.weight``
itself. The planner lists them as the Linear layers ``<attention>.in_proj`` and
``<attention>.out_proj``, and attaching either routes the attention module
(:mod:`hwaware.quant.attention`): its class becomes one whose forward calls both layers, with
``state_dict`` keys and FP32 results unchanged. Attention that cannot be routed (separate
``kdim`` / ``vdim`` weights, ``add_bias_kv``, ``add_zero_attn``, a subclass) is reported as skipped,
with the reason. ``nn.TransformerEncoderLayer`` calls its ``linear1`` / ``linear2`` and
``self_attn`` in training, but in eval under ``no_grad`` torch's fused fast path reads their
weights directly; where those layers are quantized, routed (or replaced by deploy modules)
:func:`keep_layers_called` turns that layer's fast path off, and its ``nn.TransformerEncoder``'s
NestedTensor path, so eval runs what training ran.
"""
from __future__ import annotations

import fnmatch
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwaware.quant.attention import (InProjection, RoutedMultiheadAttention, child_name, in_projection_view, route_attention,
                                     route_refusal, unroute_attention)
from hwaware.quant.fake_quant import FakeQuantizer
from hwaware.quant.spec import QuantSpec

__all__ = [
    "QuantState",
    "attach_quantization",
    "detach_quantization",
    "find_quantizable",
    "normalize_layer_specs",
    "check_activation_spec",
    "quant_state",
    "quant_states",
    "set_fp32_reference",
    "quantization_disabled",
    "fp32_reference",
    "QUANTIZABLE_TYPES",
]

_ATTR = "_hwaware_quant"
_REF_ATTR = "_hwaware_fp32_reference"
_OTHER_REFS_ATTR = "_hwaware_other_fp32_references"
QUANTIZABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.EmbeddingBag)


@dataclass
class QuantState:
    """The quantization attached to one layer.

    ``weight`` fake-quantizes the weight (embedding tables: the gathered rows); ``activation`` the
    layer input (``None`` for embeddings or weight-only schemes). ``enabled=False`` makes the layer
    compute in FP32 with its live weights (used for KL validation and fallbacks).
    """

    name: str
    kind: str  # "linear" | "conv" | "embedding" | "embedding_bag"
    weight: FakeQuantizer
    activation: Optional[FakeQuantizer] = None
    enabled: bool = True
    original_class: type = field(default=nn.Module, repr=False)

    def quantizers(self) -> Iterable[FakeQuantizer]:
        yield self.weight
        if self.activation is not None:
            yield self.activation

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "weight": self.weight.spec.short(),
            "activation": self.activation.spec.short() if self.activation is not None else None,
            "enabled": self.enabled,
        }


# -- quantized forwards (one per layer kind); the disabled path is the original class's forward --


def _state(module: nn.Module) -> QuantState:
    return module.__dict__[_ATTR]


def _linear_forward(self, input: Tensor) -> Tensor:
    st = _state(self)
    if not st.enabled:
        return st.original_class.forward(self, input)
    if st.activation is not None:
        input = st.activation(input, self.training)  # observers record training batches only
    return F.linear(input, st.weight(self.weight, self.training), self.bias)  # (weight observers too)


def _conv_forward(self, input: Tensor) -> Tensor:
    st = _state(self)
    if not st.enabled:
        return st.original_class.forward(self, input)
    if st.activation is not None:
        input = st.activation(input, self.training)  # observers record training batches only
    return self._conv_forward(input, st.weight(self.weight, self.training), self.bias)  # (weight observers too)


def _embedding_forward(self, input: Tensor) -> Tensor:
    st = _state(self)
    if not st.enabled:
        return st.original_class.forward(self, input)
    # rows: [*input.shape, D]; row-wise fake quant of the gathered rows only
    rows = F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
    return st.weight(rows)


def _embedding_bag_forward(self, input: Tensor, offsets: Optional[Tensor] = None, per_sample_weights: Optional[Tensor] = None) -> Tensor:
    st = _state(self)
    if not st.enabled:
        return st.original_class.forward(self, input, offsets, per_sample_weights)
    last = self.include_last_offset
    if input.dim() == 2:  # [B, L] fixed-length bags -> flat ids + offsets, as nn.EmbeddingBag does
        if offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None, as input is treated is a mini-batch of fixed length sequences")
        b, l = input.shape
        offsets = torch.arange(0, b * l, l, device=input.device, dtype=input.dtype)
        input = input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
        last = False  # B start offsets, no end: torch ignores include_last_offset here (B bags, not B - 1)
    if _single_row_bags(self, input, offsets, per_sample_weights, last):
        # a bag of one row is that row (sum, mean and max alike): gather through the bag op itself
        # (its backward is the one FP32 training uses, cheaper than embedding's) and stop there
        rows = F.embedding_bag(input, self.weight, offsets, self.max_norm, self.norm_type, self.scale_grad_by_freq, "sum", self.sparse)
        return st.weight(rows)
    # rows: [n, D], each gathered row fake-quantized with its own scale/offset (FBGEMM row-wise)
    rows = st.weight(F.embedding(input, self.weight, None, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse))
    n = rows.shape[0]
    idx = torch.arange(n, device=input.device, dtype=input.dtype)
    pad = None
    if self.padding_idx is not None:  # padded positions point at an extra zero row excluded from pooling
        idx = torch.where(input == self.padding_idx, torch.full_like(idx, n), idx)
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        pad = n
    return F.embedding_bag(
        idx, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
        include_last_offset=last, padding_idx=pad,
    )


_ARANGE: Dict[Tuple[int, torch.device, torch.dtype], Tensor] = {}


def _single_row_bags(module: nn.EmbeddingBag, input: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor],
                     include_last_offset: bool) -> bool:
    """True when every bag holds exactly one id (offsets == arange(n)): single-hot features, the
    usual CTR case. Then pooling is the identity and the second bag op (and its backward) is skipped."""
    n = input.numel()
    if per_sample_weights is not None or module.padding_idx is not None or include_last_offset or offsets.numel() != n:
        return False
    key = (n, offsets.device, offsets.dtype)
    ar = _ARANGE.get(key)
    if ar is None:
        if len(_ARANGE) > 64:
            _ARANGE.clear()
        ar = _ARANGE[key] = torch.arange(n, device=offsets.device, dtype=offsets.dtype)
    return torch.equal(offsets, ar)


_FORWARDS = {"linear": _linear_forward, "conv": _conv_forward, "embedding": _embedding_forward, "embedding_bag": _embedding_bag_forward}
_STOCK_FORWARD = {nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Embedding: "embedding", nn.EmbeddingBag: "embedding_bag"}
_CLASS_CACHE: Dict[type, type] = {}


def _reduce_quantized(self: nn.Module, protocol: int):
    """Pickle (and deepcopy) a quantized layer as its original class plus kind, so it loads in a
    fresh process where the generated class for a non-torch layer class does not exist yet."""
    return _unpickle_quantized, (_state(self).original_class, _state(self).kind), self.__getstate__()


def _unpickle_quantized(original: type, kind: str) -> nn.Module:
    cls = _quantized_class(original, kind)
    return cls.__new__(cls)


def _quantized_class(cls: type, kind: str) -> type:
    """``QuantizedLinear(nn.Linear)`` etc., registered in this module under a name that includes the
    original class's module for classes other than the five torch ones (two classes named
    ``Linear`` never overwrite each other's entry). Instances pickle as their original class and
    kind (:func:`_reduce_quantized`), so a pickled model loads in a fresh process whatever its
    layer classes.
    """
    if cls not in _CLASS_CACHE:
        name = f"Quantized{cls.__name__}"
        if cls not in _STOCK_FORWARD:
            name = f"Quantized_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        new = type(name, (cls,), {"forward": _FORWARDS[kind], "__module__": __name__, "__reduce_ex__": _reduce_quantized})
        new.__qualname__ = name
        setattr(sys.modules[__name__], name, new)
        _CLASS_CACHE[cls] = new
    return _CLASS_CACHE[cls]


for _cls, _kind in _STOCK_FORWARD.items():
    _quantized_class(_cls, _kind)


# layers with weights of their own that hwaware does not quantize: listed as skipped (and left FP32
# at export) with the reason, not passed over without a word
UNSUPPORTED_LAYERS = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.RNNBase, nn.Bilinear)


def _kind_of(module: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """(kind, None) for a module we can attach to, else (None, reason)."""
    for base, kind in _STOCK_FORWARD.items():
        if isinstance(module, base):
            if type(module).forward is not base.forward and quant_state(module) is None:
                return None, f"{type(module).__name__} overrides forward(); hwaware leaves custom layers untouched"
            return kind, None
    if isinstance(module, UNSUPPORTED_LAYERS):
        return None, (f"hwaware has no quantization for {type(module).__name__} (it quantizes Linear, Conv1d/2d, "
                      "Embedding and EmbeddingBag): stays FP32")
    return None, None


def quant_state(module: nn.Module) -> Optional[QuantState]:
    return module.__dict__.get(_ATTR)


def quant_states(model: nn.Module) -> Dict[str, QuantState]:
    """``{layer name: QuantState}`` for every layer of ``model`` that has quantization attached."""
    return {name: st for name, m in model.named_modules() if (st := quant_state(m)) is not None}


def matching_pattern(name: str, patterns: Sequence[str]) -> Optional[str]:
    """The first pattern matching ``name`` or a parent of it (``"top_mlp"`` matches ``"top_mlp.0"``)."""
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*"):
            return p
    return None


def alias_hint(model: nn.Module, pattern: str) -> str:
    """A note for a pattern that matches no module because it names a module's second name (``self.b
    = self.a``): patterns match each module under its first name, as ``named_modules`` lists it."""
    first: Dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        first.setdefault(id(m), name)
        if name and first[id(m)] != name and matching_pattern(name, [pattern]):
            return (f" ({name!r} is {first[id(m)]!r} under a second name: patterns match a module by its first name, "
                    f"so use {first[id(m)]!r})")
    return ""


def lazy_reason(m: nn.Module) -> Optional[str]:
    """Why ``m``, a lazy module whose parameters are not materialized yet (``nn.LazyLinear`` before
    its first forward), cannot be quantized or pruned now; None for any other module."""
    if not any(nn.parameter.is_lazy(p) for p in m.parameters(recurse=False)):
        return None
    return (f"{type(m).__name__} has not been materialized yet (a lazy module's weights take their shape on its first "
            "forward, which also turns it into a plain layer): run one batch through the model before fit "
            "(model(batch)), or let Lightning's sanity check run (num_sanity_val_steps > 0) before quantization or "
            "pruning starts")


def skip_patterns(skip: Any) -> Tuple[str, ...]:
    """``skip=`` as a tuple of ``fnmatch`` patterns: one pattern (a str) or a sequence of them.

    Raises:
        ValueError: anything else (``3``, ``None``, a list holding a non-str), naming it.
    """
    patterns = (skip,) if isinstance(skip, str) else tuple(skip) if isinstance(skip, Iterable) else skip
    if not isinstance(patterns, tuple) or not all(isinstance(p, str) for p in patterns):  # (3 / None: a raw TypeError)
        raise ValueError(f"skip={skip!r} is invalid; expected a sequence of fnmatch patterns (str)")
    return patterns


def skip_match(name: str, module: nn.Module, skip: Sequence[str]) -> Optional[str]:
    """The ``skip`` pattern matching layer ``name`` (or a parent), or None. An attention module's
    ``in_proj`` layer is its ``in_proj_weight``: a pattern naming that weight skips the layer."""
    pat = matching_pattern(name, skip)
    if pat is None and isinstance(module, InProjection):
        pat = matching_pattern(child_name(name.rpartition(".")[0], "in_proj_weight"), skip)
    return pat


def check_skip_matches(model: nn.Module, skip: Sequence[str], layers: Sequence[str], what: str) -> None:
    """Refuse a ``skip`` pattern that names nothing in ``model``: a typo there would silently
    quantize or prune the layer the user meant to keep. ``layers`` (the candidates) go in the
    message; a pattern matching any module or bare weight, candidate or not, is accepted."""
    names = [n for n, m in attention_candidates(model) if n]
    names += [w for n, m in model.named_modules() for w in bare_weights(n, m)]
    names += [child_name(n, "in_proj_weight") for n, m in model.named_modules() if isinstance(m, RoutedMultiheadAttention)]
    for pattern in skip:
        if not any(matching_pattern(n, [pattern]) for n in names):
            some = ", ".join(layers[:12]) + (f", ... ({len(layers)} in all)" if len(layers) > 12 else "")
            raise ValueError(f"skip pattern {pattern!r} matches no layer of {type(model).__name__}"
                             f"{alias_hint(model, pattern)}; the {what} layers are: {some or 'none'}")


def table_spec(spec: QuantSpec) -> QuantSpec:
    """A table's spec with the scale dtype its row format stores (FBGEMM: float32 scale and offset
    for int8 rows, float16 for int4), so that QAT rounds them as the artifact stores them: with
    float32 int4 scales, 0.15% of a trial's codes differed from the packed ones."""
    if spec.bits not in (4, 8):
        return spec  # no row format (export leaves such tables FP32, with a warning)
    return spec.replace(scale_dtype="float32" if spec.bits == 8 else "float16")


def _specs_for(module: nn.Module, kind: str, weight_spec: QuantSpec, activation_spec: Optional[QuantSpec],
               embedding_spec: Optional[QuantSpec]) -> Tuple[Optional[QuantSpec], Optional[QuantSpec], Optional[str]]:
    """The (weight, activation) specs a layer gets, or a reason it cannot be quantized."""
    if kind in ("embedding", "embedding_bag"):
        if embedding_spec is None:
            return None, None, "embedding quantization disabled (embedding_spec=None)"
        if module.max_norm is not None:  # (no deploy op renormalizes: QAT would train what export leaves FP32)
            return None, None, (f"max_norm={module.max_norm} renormalizes the rows it looks up, which no row-wise "
                                "deploy op does: stays FP32")
        if kind == "embedding_bag" and module.mode == "max" and module.padding_idx is not None:
            return None, None, "mode='max' with padding_idx: no row-wise deploy op serves it, stays FP32"
        return table_spec(embedding_spec), None, None
    if kind == "conv":
        if weight_spec.granularity == "per_group":
            return None, None, "per_group weights are defined for Linear layers only"
        act = activation_spec
        if act is not None and act.granularity == "per_row":  # no token axis in NC(H)W: one scale per tensor
            act = act.replace(granularity="per_tensor")
        return weight_spec, act, None
    if weight_spec.granularity == "per_group" and module.in_features % weight_spec.group_size != 0:
        return None, None, f"in_features={module.in_features} is not a multiple of group_size={weight_spec.group_size}"
    return weight_spec, activation_spec, None


# Parents that multiply a child Linear's .weight themselves instead of calling the child
_WEIGHT_READING_PARENTS = (nn.MultiheadAttention,)


def weight_read_by_parent(modules: Dict[str, nn.Module], name: str) -> Optional[str]:
    """Why layer ``name`` never runs its own forward (its parent reads ``.weight`` directly), or None.
    A routed ``nn.MultiheadAttention`` calls its layers."""
    parent = modules.get(name.rpartition(".")[0]) if "." in name else None
    if isinstance(parent, _WEIGHT_READING_PARENTS) and not isinstance(parent, RoutedMultiheadAttention):
        return (f"its parent {type(parent).__name__} multiplies .weight itself and never calls the layer, so a "
                "quantized or deploy version would not run: stays FP32")
    return None


def bare_weights(name: str, module: nn.Module) -> List[str]:
    """The weights ``module`` multiplies as bare Parameters (no layer of their own: hwaware's
    callbacks, which work on layers, leave them FP32 and dense), by their full names."""
    if not isinstance(module, nn.MultiheadAttention) or isinstance(module, RoutedMultiheadAttention):
        return []
    prefix = f"{name}." if name else ""
    return [prefix + p for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
            if getattr(module, p, None) is not None]


def keep_layers_called(model: nn.Module) -> None:
    """Turn off torch's fused fast paths where they would bypass a quantized or deploy layer.

    - ``nn.TransformerEncoderLayer`` whose ``linear1`` or ``linear2`` is not a plain ``nn.Linear``
      any more (quantized, or an exported deploy module): in eval under ``no_grad`` its fused path
      multiplies their ``.weight`` directly, skipping fake quant (and a deploy module has no
      ``.weight``). The switch is the instance's ``activation_relu_or_gelu``, which only the
      fast-path check reads; the activation itself is unchanged.
    - ``nn.TransformerEncoder`` holding such a layer: given a ``src_key_padding_mask`` in eval under
      ``no_grad``, it packs the batch into a NestedTensor (``use_nested_tensor``, decided once in its
      ``__init__``), which fake quant and the ``hwaware::*`` ops cannot take. Off, the encoder runs
      on the padded batch with the mask, as in training; the positions the mask pads are then the
      layers' outputs there instead of the nested path's zeros.
    """
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and hasattr(m, "activation_relu_or_gelu"):
            if not _plain_feed_forward(m):
                m.__dict__.setdefault(_FAST_PATH_ATTR, m.activation_relu_or_gelu)  # for detach_quantization
                m.activation_relu_or_gelu = 0
        elif isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            if not all(_plain_feed_forward(layer) for layer in m.layers):
                m.__dict__.setdefault(_NESTED_ATTR, m.use_nested_tensor)
                m.use_nested_tensor = False


def _plain_feed_forward(layer: nn.Module) -> bool:
    return (all(type(getattr(layer, lin, None)) is nn.Linear for lin in ("linear1", "linear2"))
            and not isinstance(getattr(layer, "self_attn", None), RoutedMultiheadAttention))


def routable(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` (exactly: a subclass may compute attention its own way) that is
    not routed yet and can be (:func:`hwaware.quant.attention.route_refusal`)."""
    return type(module) is nn.MultiheadAttention and route_refusal(module) is None


def attention_candidates(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``named_modules()``, with the ``<attention>.in_proj`` layer each routable attention module
    would get listed right after it (routing puts it first among its children: the same order)."""
    for name, module in model.named_modules():
        yield name, module
        if routable(module):
            yield child_name(name, "in_proj"), in_projection_view(module)


def route_for(model: nn.Module, names: Iterable[str]) -> None:
    """Route each routable attention module one of ``names`` is the ``in_proj`` / ``out_proj`` of."""
    modules = dict(model.named_modules())
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if leaf in ("in_proj", "out_proj") and routable(m := modules.get(parent)):
            route_attention(m)


_NESTED_ATTR = "_hwaware_use_nested_tensor"
_FAST_PATH_ATTR = "_hwaware_activation_relu_or_gelu"


def check_activation_spec(spec: Optional[QuantSpec], where: str) -> None:
    """Refuse an activation spec whose scales would be one per batch position: an activation
    ``[batch, ..., features]`` is viewed as ``[channels, values]`` along dim 0 (``per_channel``), in
    groups of the flattened rows (``per_group``) or one row per sample / token (static
    ``per_row``), so stored scales would have the training batch's size, and a smaller last batch
    or an eval batch of another size would fail. What activations support: ``per_tensor`` (static,
    ranges calibrated by an observer, or ``dynamic=True``) and ``per_row`` with ``dynamic=True``
    (per token, computed from each tensor as it arrives). ``None`` (weight-only) passes.

    Raises:
        ValueError: naming ``where``, the granularity and what to write instead.
    """
    if spec is None or spec.granularity == "per_tensor" or (spec.granularity == "per_row" and spec.dynamic):
        return
    what = "granularity='per_row' with dynamic=False" if spec.granularity == "per_row" else f"granularity={spec.granularity!r}"
    default = (" (QuantSpec's default granularity is 'per_channel', a weight's)"
               if spec.granularity == "per_channel" else "")
    raise ValueError(
        f"{where}: {what} ({spec.short()}) is invalid for activations{default}: its scales would be one per batch "
        "position, so a batch of another size (the last one, or eval) would fail. Activations take granularity="
        "'per_tensor' (static, calibrated; or dynamic=True) or granularity='per_row' with dynamic=True (per token); "
        f"write QuantSpec(bits={spec.bits}, granularity='per_row', dynamic=True) (the default activation spec's "
        f"granularity) or QuantSpec(bits={spec.bits}, granularity='per_tensor')")


LAYER_SPEC_KEYS = ("weight", "activation")
LayerSpecs = Dict[str, Dict[str, Optional[QuantSpec]]]


def normalize_layer_specs(layer_specs: Optional[Mapping[str, Any]]) -> LayerSpecs:
    """Check the kind-independent shape of per-layer overrides and give them one form.

    ``layer_specs`` maps ``fnmatch`` patterns (matched like ``skip``: a pattern also matches every
    layer under a matching name) to a :class:`QuantSpec` (the weight spec of a Linear/Conv, the
    table spec of an embedding) or a dict with keys among ``"weight"`` (a QuantSpec) and
    ``"activation"`` (a QuantSpec, or None for weight-only). Returns ``{pattern: {key: spec}}`` in
    the given order (the first matching pattern wins) with only the keys given. What depends on a
    layer's kind is checked by :func:`find_quantizable`.

    Raises:
        TypeError: not a mapping, a pattern that is not a str, a value that is neither a QuantSpec
            nor a dict, a ``"weight"`` that is not a QuantSpec or an ``"activation"`` that is
            neither a QuantSpec nor None.
        ValueError: an empty pattern, unknown dict keys, or an ``"activation"`` spec whose scales
            would be one per batch position (see :func:`check_activation_spec`).
    """
    if layer_specs is None:
        return {}
    if not isinstance(layer_specs, Mapping):
        raise TypeError(f"layer_specs must be a mapping {{fnmatch pattern: QuantSpec or dict}}, got {type(layer_specs).__name__}")
    out: LayerSpecs = {}
    for pattern, value in layer_specs.items():
        if not isinstance(pattern, str):
            raise TypeError(f"layer_specs key {pattern!r} is a {type(pattern).__name__}; expected an fnmatch pattern (str)")
        if not pattern:
            raise ValueError("layer_specs key '' is invalid; expected a non-empty fnmatch pattern of layer names")
        if isinstance(value, QuantSpec):
            out[pattern] = {"weight": value}
            continue
        if not isinstance(value, Mapping):
            raise TypeError(f"layer_specs[{pattern!r}] is a {type(value).__name__}; expected a hwaware.QuantSpec or a dict "
                            f"with keys among {LAYER_SPEC_KEYS}")
        unknown = [k for k in value if k not in LAYER_SPEC_KEYS]
        if unknown:
            raise ValueError(f"layer_specs[{pattern!r}] has unknown keys {unknown}; expected keys among {LAYER_SPEC_KEYS}")
        entry: Dict[str, Optional[QuantSpec]] = {}
        if "weight" in value:
            if not isinstance(value["weight"], QuantSpec):
                raise TypeError(f"layer_specs[{pattern!r}]['weight'] must be a hwaware.QuantSpec, got "
                                f"{type(value['weight']).__name__} (use skip= to leave a layer in FP32)")
            entry["weight"] = value["weight"]
        if "activation" in value:
            if value["activation"] is not None and not isinstance(value["activation"], QuantSpec):
                raise TypeError(f"layer_specs[{pattern!r}]['activation'] must be a hwaware.QuantSpec or None "
                                f"(weight-only), got {type(value['activation']).__name__}")
            check_activation_spec(value["activation"], f"layer_specs[{pattern!r}]['activation']")
            entry["activation"] = value["activation"]
        out[pattern] = entry
    return out


def layer_specs_to_state(layer_specs: LayerSpecs) -> List[List[Any]]:
    """``[[pattern, {key: spec dict or None}], ...]`` (plain types, for checkpoints; order kept)."""
    return [[p, {k: (v.to_dict() if v is not None else None) for k, v in e.items()}] for p, e in layer_specs.items()]


def _override_specs(pattern: str, entry: Dict[str, Optional[QuantSpec]], name: str, kind: str, weight_spec: QuantSpec,
                    activation_spec: Optional[QuantSpec], embedding_spec: Optional[QuantSpec]):
    """The global specs with layer ``name``'s override applied, checked for its kind (ValueError)."""
    where = f"layer_specs[{pattern!r}] for {kind} layer {name!r}"
    if kind in ("embedding", "embedding_bag"):
        if entry.get("activation") is not None:
            raise ValueError(f"{where}: an activation spec is invalid; embedding layers quantize their table rows only "
                             "(give the table spec as the QuantSpec or 'weight')")
        table = entry.get("weight", embedding_spec)
        if "weight" in entry:
            if table.granularity != "per_row":
                raise ValueError(f"{where}: granularity={table.granularity!r} ({table.short()}) is invalid for an "
                                 "embedding table; expected 'per_row' (row-wise, the FBGEMM layout)")
            if table.learnable:
                raise ValueError(f"{where}: learnable=True is invalid; row-wise table scales are computed from each row")
            if not table.dynamic:
                table = table.replace(dynamic=True)  # row scales always follow the row
        return weight_spec, None, table
    w = entry.get("weight", weight_spec)
    if w.dynamic:
        raise ValueError(f"{where}: weight dynamic=True ({w.short()}) is invalid; weights are quantized with fixed scales")
    if w.granularity == "per_row":
        raise ValueError(f"{where}: weight granularity='per_row' is invalid; expected 'per_channel', 'per_group' or 'per_tensor'")
    return w, entry.get("activation", activation_spec), embedding_spec


def find_quantizable(model: nn.Module, *, weight_spec: QuantSpec, activation_spec: Optional[QuantSpec] = None,
                     embedding_spec: Optional[QuantSpec] = None, skip: Sequence[str] = (),
                     layer_specs: Optional[Mapping[str, Union[QuantSpec, Mapping[str, Optional[QuantSpec]]]]] = None,
                     ) -> Tuple[Dict[str, Tuple[str, QuantSpec, Optional[QuantSpec]]], Dict[str, str]]:
    """Plan without touching the model: ``({name: (kind, weight_spec, act_spec)}, {name: skip reason})``.

    ``layer_specs`` (see :func:`normalize_layer_specs`) overrides the global specs per layer: the
    first pattern that matches a layer's name gives its overrides; ``skip`` wins over it. A layer
    an override makes unquantizable (``per_group`` on a conv, a ``group_size`` that does not divide
    ``in_features``) is skipped with the reason, as under the global ``weight_spec``.

    Raises:
        ValueError: a ``skip`` pattern that matches no module of ``model``; a ``layer_specs``
            pattern that matches no quantizable layer, or that matches
            only layers an earlier pattern already claims (it would never apply); an override
            invalid for a layer's kind (a table spec that is not ``per_row`` or is learnable, an
            activation spec on an embedding, a dynamic or ``per_row`` Linear/Conv weight); an
            activation spec (global or override) whose scales would be one per batch position
            (:func:`check_activation_spec`).
    """
    check_activation_spec(activation_spec, "activation_spec")
    overrides = normalize_layer_specs(layer_specs)
    plan, skipped = {}, {}
    modules = dict(model.named_modules())
    eligible: List[str] = []
    won: Dict[str, int] = dict.fromkeys(overrides, 0)
    overridden_by_skip: Dict[str, List[str]] = {p: [] for p in overrides}
    refused: List[str] = []  # layers an explicit override made unquantizable
    refused_global: List[str] = []  # ... and the global weight_spec (a group_size that does not divide in_features)
    for name, module in attention_candidates(model):
        if (bare := bare_weights(name, module)) and not routable(module):
            why = route_refusal(module) if type(module) is nn.MultiheadAttention else (
                f"{type(module).__name__} subclasses nn.MultiheadAttention and may compute attention its own way, so "
                "hwaware does not route it into layers: stays FP32")
            skipped.update(dict.fromkeys(bare, f"a bare Parameter nn.MultiheadAttention multiplies "
                                         f"itself: {why}"))
        kind, reason = _kind_of(module)
        if kind is None:
            if reason:
                skipped[name] = reason
            continue
        if kind == "linear" and not routable(modules.get(name.rpartition(".")[0])) and (reason := weight_read_by_parent(modules, name)):
            skipped[name] = reason
            continue
        eligible.append(name)
        over = matching_pattern(name, list(overrides))
        if over is not None:
            won[over] += 1
        if (pat := skip_match(name, module, skip)) is not None:
            skipped[name] = f"matches skip pattern {pat!r}" + (f" (skip wins over layer_specs[{over!r}])" if over is not None else "")
            if over is not None:
                overridden_by_skip[over].append(name)
            continue
        w, a, e = weight_spec, activation_spec, embedding_spec
        if over is not None:
            w, a, e = _override_specs(over, overrides[over], name, kind, weight_spec, activation_spec, embedding_spec)
        w, a, reason = _specs_for(module, kind, w, a, e)
        if reason:
            skipped[name] = reason + (f" (layer_specs[{over!r}])" if over is not None else "")
            if over is not None:
                refused.append(f"{name}: {reason} (layer_specs[{over!r}])")
            elif kind not in ("embedding", "embedding_bag"):  # the global weight_spec: as silent a size loss
                refused_global.append(f"{name}: {reason}")
            continue
        plan[name] = (kind, w, a)
    for pattern, n in won.items():
        if n:
            continue
        some = ", ".join(eligible[:12]) + (f", ... ({len(eligible)} in all)" if len(eligible) > 12 else "")
        matched = [name for name in eligible if matching_pattern(name, [pattern])]
        if matched:
            raise ValueError(
                f"layer_specs pattern {pattern!r} never applies: every layer it matches ({', '.join(matched[:12])}) is "
                f"matched by an earlier pattern first (the first matching pattern wins; put more specific patterns first)")
        excluded = [n for n in skipped if n not in eligible and matching_pattern(n, [pattern])]
        why = (f" (it matches {', '.join(excluded[:4])}{', ...' if len(excluded) > 4 else ''}, which stay FP32: "
               f"{skipped[excluded[0]]})" if excluded else "")
        raise ValueError(f"layer_specs pattern {pattern!r} matches no quantizable layer of {type(model).__name__}{why}"
                         f"{alias_hint(model, pattern)}; quantizable layers are: {some or 'none'}")
    for pattern, names in overridden_by_skip.items():
        if names and len(names) == won[pattern]:
            warnings.warn(f"layer_specs pattern {pattern!r} applies to no layer: every layer it matches "
                          f"({', '.join(names[:12])}) is skipped by skip= (skip wins over layer_specs), so they stay FP32",
                          UserWarning, stacklevel=2)
    if refused:
        warnings.warn(f"layer_specs: {len(refused)} layer(s) cannot take the spec asked for and stay FP32: "
                      + "; ".join(refused[:8]) + (" ..." if len(refused) > 8 else ""), UserWarning, stacklevel=2)
    if refused_global:
        warnings.warn(f"weight_spec {weight_spec.short()}: {len(refused_global)} layer(s) cannot take it and stay FP32: "
                      + "; ".join(refused_global[:8]) + (" ..." if len(refused_global) > 8 else "")
                      + ". Give them another spec through layer_specs (e.g. int8 per_channel), or a group_size that "
                      "divides their in_features", UserWarning, stacklevel=2)
    check_skip_matches(model, skip, eligible, "quantizable")
    return plan, skipped


def attach_quantization(model: nn.Module, plan: Dict[str, Tuple[str, QuantSpec, Optional[QuantSpec]]]) -> Dict[str, QuantState]:
    """Attach a :class:`QuantState` to each layer named in ``plan`` (from :func:`find_quantizable`).

    Re-attaching a layer whose specs changed (a precision fallback) replaces its quantizers.
    New quantizers start with observing on and fake quantization off (the calibrate phase).
    """
    route_for(model, plan)
    modules = dict(model.named_modules())
    states = {}
    for name, (kind, wspec, aspec) in plan.items():
        if name not in modules:
            raise ValueError(f"layer {name!r} is not in the model; layers are {sorted(modules)[:20]}...")
        m = modules[name]
        if (why := lazy_reason(m)) is not None:  # materializing turns it into a plain layer: its quantizers would be lost
            raise ValueError(f"layer {name!r}: {why}")
        old = quant_state(m)
        device = m.weight.device
        wq = FakeQuantizer(wspec, f"{name}.weight", "weight").to(device)
        aq = FakeQuantizer(aspec, f"{name}.input", "activation").to(device) if aspec is not None else None
        original = old.original_class if old is not None else type(m)
        st = QuantState(name=name, kind=kind, weight=wq, activation=aq, enabled=True, original_class=original)
        m.__dict__[_ATTR] = st
        m.__class__ = _quantized_class(original, kind)
        states[name] = st
    keep_layers_called(model)
    return states


def detach_quantization(model: nn.Module, names: Optional[Iterable[str]] = None) -> None:
    """Remove every attachment (or those of the layers ``names``): layers get their original classes
    back, attention modules routed for them (:func:`route_for`) are plain ``nn.MultiheadAttention``
    again once neither projection is quantized or packed, and transformer layers and encoders get
    their fused fast paths back where :func:`keep_layers_called` turned them off and no quantized
    layer is left in them; weights are untouched."""
    chosen = None if names is None else set(names)
    for name, m in model.named_modules():
        if chosen is not None and name not in chosen:
            continue
        st = m.__dict__.pop(_ATTR, None)
        if st is not None:
            m.__class__ = st.original_class
    for m in model.modules():
        if (isinstance(m, RoutedMultiheadAttention) and type(m.in_proj) is InProjection and quant_state(m.in_proj) is None
                and isinstance(m.out_proj, nn.Linear) and quant_state(m.out_proj) is None):
            unroute_attention(m)
    for m in model.modules():
        if _FAST_PATH_ATTR in m.__dict__ and _plain_feed_forward(m):
            m.activation_relu_or_gelu = m.__dict__.pop(_FAST_PATH_ATTR)
        if _NESTED_ATTR in m.__dict__ and all(_plain_feed_forward(layer) for layer in m.layers):
            m.use_nested_tensor = m.__dict__.pop(_NESTED_ATTR)


def set_fp32_reference(model: nn.Module, state_dict: Optional[Dict[str, Tensor]], *, keep_others: bool = False) -> None:
    """Keep the FP32 weights (a ``state_dict``, on CPU) with the model, outside its module tree, so
    export's regression gate finds them without knowing which callback produced them. Any other
    references (:func:`set_other_fp32_references`) are dropped unless ``keep_others``: a reference
    set anew is the gate's, not measured beside a stale one."""
    model.__dict__[_REF_ATTR] = state_dict
    if not keep_others:
        model.__dict__.pop(_OTHER_REFS_ATTR, None)


def set_other_fp32_references(model: nn.Module, references: Dict[str, Dict[str, Tensor]]) -> None:
    """More FP32 models of the run for export's gate, ``{label: state_dict}``, beside the one
    :func:`set_fp32_reference` keeps (set after it: setting that one drops these): the gate measures each and
    compares the export against the best. With 2:4 pruning before QAT the primary is the dense
    model at pruning start; the model at QAT start is the other: a dense model that had not learned
    yet (pruning from an early epoch) scored near chance and gated nothing (a trial)."""
    model.__dict__[_OTHER_REFS_ATTR] = dict(references)


def other_fp32_references(model: nn.Module) -> Dict[str, Dict[str, Tensor]]:
    """What :func:`set_other_fp32_references` kept (empty: none)."""
    return model.__dict__.get(_OTHER_REFS_ATTR) or {}


def fp32_reference(model: nn.Module) -> Optional[Dict[str, Tensor]]:
    """The FP32 ``state_dict`` kept by :func:`set_fp32_reference` (at QAT start, or the dense model at
    2:4 pruning start when pruning came first), or None."""
    return model.__dict__.get(_REF_ATTR)


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in FP32 with its live weights for the block; every layer's ``enabled`` flag
    (fallback layers included) is restored afterwards, even on error."""
    states = quant_states(model)
    enabled = {n: st.enabled for n, st in states.items()}
    for st in states.values():
        st.enabled = False
    try:
        yield
    finally:
        for n, st in states.items():
            st.enabled = enabled[n]
