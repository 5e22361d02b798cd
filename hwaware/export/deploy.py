"""Deploy modules: packed weights as buffers, forward on ``torch.ops.hwaware.*``.

Each has ``from_quantized(module, state)`` (pack exactly the scales QAT trained against),
``empty(meta)`` (shapes from the manifest, for loading), and ``describe()`` (its manifest entry).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

import hwaware.ops  # noqa: F401  (registers torch.ops.hwaware.*)
from hwaware.ops import INT8_KERNELS, packing
from hwaware.quant.attach import QuantState
from hwaware.quant.spec import QuantSpec

__all__ = ["Int8Linear", "Int4Linear", "Sparse24Linear", "RowwiseEmbeddingBag", "RowwiseEmbedding", "DEPLOY_TYPES",
           "fuse_relu", "Int8Chain", "chain_int8"]

_MODES = {"sum": 0, "mean": 1, "max": 2}


def _bytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _Packed(nn.Module):
    """A deploy layer whose ops cache weights derived from its buffers (fbgemm prepacked, dequantized).

    The cache sees an in-place write through the tensor's version counter, which tensors made under
    ``torch.inference_mode`` do not have: ``load_state_dict`` therefore drops this layer's entries
    itself. (Other in-place writes to such tensors, or through ``.data``, need
    :func:`hwaware.ops.clear_cache`.)
    """

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        hwaware.ops._CACHE.drop([b for b in self._buffers.values() if b is not None])

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
        # (an AttributeError still: hasattr(layer, "weight") stays False)
        raise AttributeError(
            f"{type(self).__name__} has no .weight: it holds its weight packed and multiplies it inside its own "
            "call. Something read the weight outside that call (a tied head, a parent using it): export finds such "
            "layers by running a batch and leaves them dense; export with example_inputs or val_dataloader") from None

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; dtype casts (``model.half()``) leave the format's float32 scales, biases
        and 2:4 values as they are: the ops take float32 there and float16 / bfloat16 inputs, which
        they answer in the input's dtype (a cast model failed at its first call: "w_scale must be
        float32")."""
        before = {k: b for k, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for k, b in before.items():
            now = self._buffers[k]
            if now is not None and now.dtype != torch.float32:  # the cast is not applied: not even and back (lossy)
                self._buffers[k] = b.to(now.device)
        return self


class _Int8Kernels(_Packed):
    """An int8 layer whose CPU kernel export chooses among ``int8_linear``'s implementations, unless
    QAT trained it weight-only: then it is pinned to ``dequant`` (float input, the int8 weight
    dequantized), since the other implementations quantize an input QAT never saw quantized."""

    weight_only = False

    def serve_weight_only(self) -> None:
        self.weight_only = True
        # every device (SPARSE24_INT8_KERNEL["dequant"] is "dequant" too): CUDA's W8A8 kernel quantized it
        self.kernels["cpu"] = self.kernels["cuda"] = "dequant"

    def _restore_weight_only(self, meta: Dict[str, Any]) -> None:
        wo = meta.get("weight_only", False)
        if not isinstance(wo, bool):
            raise ValueError(f"weight_only={wo!r}; expected true or false")
        if wo:
            if dict(meta.get("kernels") or {}).get("cpu", "dequant") != "dequant":
                raise ValueError(f"weight_only with CPU kernel {meta['kernels']['cpu']!r}; a weight-only layer runs 'dequant'")
            self.serve_weight_only()

    def _weight_only_entry(self) -> Dict[str, Any]:
        return {"weight_only": True} if self.weight_only else {}


class Int8Linear(_Int8Kernels):
    """W8A8 linear: int8 per-output-channel weights, dynamic per-token int8 activations.

    ``kernels`` maps a device type to the ``hwaware::int8_linear`` implementation (``impl``) the
    export measured fastest for this layer (manifest ``selection``); ``"auto"`` where none was chosen.
    ``relu``: the layer's own output is ``torch.relu`` of the linear (for a layer built that way by
    hand; export never sets it: a ReLU that follows an exported layer stays a module of its own, and
    the :class:`Int8Chain` holding the pair applies it in the layer's epilogue, see :func:`fuse_relu`).
    """

    scheme = "int8"

    def __init__(self, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                 kernels: Optional[Dict[str, str]] = None, relu: bool = False) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)  # int8 [N, K]
        self.register_buffer("w_scale", w_scale)  # float32 [N]
        self.register_buffer("bias", bias)  # float32 [N] or None
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.kernels: Dict[str, str] = dict(kernels or {})
        self.relu = bool(relu)

    @classmethod
    def from_quantized(cls, m: nn.Linear, st: QuantState) -> "Int8Linear":
        wq = st.weight
        scale = wq.current_scale() if wq.has_qparams else None
        q, s = packing.quantize_int8_weight(m.weight.detach().float(), scale=scale)
        return cls(q, s, None if m.bias is None else m.bias.detach().float().clone())

    @classmethod
    def empty(cls, meta: Dict[str, Any]) -> "Int8Linear":
        n, k = meta["shape"]
        bias = torch.empty(n, dtype=torch.float32) if meta.get("bias") else None
        # the manifest's relu=True names the ReLU module after the layer (fused_relu) that its
        # Int8Chain applies in the epilogue: the layer's own output stays the linear's
        relu = meta.get("relu", False) and "fused_relu" not in meta
        layer = cls(torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=torch.float32), bias, meta.get("kernels"), relu)
        layer._restore_weight_only(meta)
        return layer

    def forward(self, input: Tensor) -> Tensor:  # nn.Linear's argument name: keyword calls keep working
        impl = self.kernels.get(input.device.type, "auto")
        b = self._buffers  # not self.qweight etc.: nn.Module.__getattr__ is slow, per buffer per call
        return torch.ops.hwaware.int8_linear.default(input, b["qweight"], b["w_scale"], b["bias"], impl, self.relu)

    def forward_relu(self, input: Tensor) -> Tensor:
        """``torch.relu(self(input))`` in one op call (the ReLU in the epilogue), bit for bit; no hooks run."""
        impl = self.kernels.get(input.device.type, "auto")
        b = self._buffers
        return torch.ops.hwaware.int8_linear.default(input, b["qweight"], b["w_scale"], b["bias"], impl, True)

    def describe(self) -> Dict[str, Any]:
        return {"scheme": self.scheme, "shape": [self.out_features, self.in_features], "bias": self.bias is not None,
                "kernels": dict(self.kernels), "relu": self.relu, **self._weight_only_entry(),
                "bytes": _bytes(self.qweight, self.w_scale, self.bias), "dense_bytes": 4 * self.out_features * (self.in_features + 1)}


class Int4Linear(_Packed):
    """W4A16 linear: int4 weights in groups of ``group_size`` along K, packed two per byte."""

    scheme = "int4"

    def __init__(self, packed: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor], in_features: int, group_size: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed)  # uint8 [N, K/2]
        self.register_buffer("scales", scales)  # float32 [N, K/g]
        self.register_buffer("zeros", zeros)  # int8 [N, K/g] (asymmetric) or None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features, self.group_size = in_features, packed.shape[0], group_size

    @classmethod
    def from_quantized(cls, m: nn.Linear, st: QuantState) -> "Int4Linear":
        wq = st.weight
        spec = wq.spec
        scale = wq.current_scale() if wq.has_qparams else None
        zp = wq.zero_point if (wq.has_qparams and not spec.symmetric) else None
        packed, scales, zeros = packing.quantize_int4_weight(
            m.weight.detach().float(), spec.group_size, spec.symmetric, scale=scale, zero_point=zp)
        return cls(packed, scales, zeros, None if m.bias is None else m.bias.detach().float().clone(), m.in_features, spec.group_size)

    @classmethod
    def empty(cls, meta: Dict[str, Any]) -> "Int4Linear":
        n, k = meta["shape"]
        g = meta["group_size"]
        if type(g) is not int or g <= 0 or k % g or k % 2:  # (the op's own check, before its first call)
            raise ValueError(f"group_size={g!r} must be a positive int dividing the even K = {k}")
        zeros = torch.empty(n, k // g, dtype=torch.int8) if not meta["symmetric"] else None
        bias = torch.empty(n, dtype=torch.float32) if meta.get("bias") else None
        return cls(torch.empty(n, (k + 1) // 2, dtype=torch.uint8), torch.empty(n, k // g, dtype=torch.float32), zeros, bias, k, g)

    def forward(self, input: Tensor) -> Tensor:
        return torch.ops.hwaware.int4_linear(input, self.packed, self.scales, self.zeros, self.group_size, self.bias)

    def describe(self) -> Dict[str, Any]:
        return {"scheme": self.scheme, "shape": [self.out_features, self.in_features], "group_size": self.group_size,
                "symmetric": self.zeros is None, "bias": self.bias is not None,
                "bytes": _bytes(self.packed, self.scales, self.zeros, self.bias), "dense_bytes": 4 * self.out_features * (self.in_features + 1)}


class Sparse24Linear(_Int8Kernels):
    """2:4 linear on the compressed form (``values [N, K/2]`` + 2-bit position ``meta``): float values
    (the layer's FP32 weights) or int8 values with per-channel ``w_scale`` (W8A8, as :class:`Int8Linear`).

    ``kernels`` maps a device type to the ``hwaware::sparse24_linear`` implementation the export
    measured fastest for this layer's shape among those that keep its math (manifest ``selection``).
    """

    def __init__(self, values: Tensor, meta: Tensor, w_scale: Optional[Tensor], bias: Optional[Tensor],
                 kernels: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        self.register_buffer("values", values)  # float32 or int8 [N, K/2]
        # uint8 [N, ceil(K/8)]; not named "meta": torch.export's GraphModule has a .meta attribute
        self.register_buffer("metadata", meta)
        self.register_buffer("w_scale", w_scale)  # float32 [N] for int8 values, else None
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = values.shape[0], 2 * values.shape[1]
        self.kernels: Dict[str, str] = dict(kernels or {"cpu": "dense"})

    @property
    def scheme(self) -> str:
        return "sparse24_int8" if self.values.dtype == torch.int8 else "sparse24"

    @classmethod
    def from_linear(cls, m: nn.Linear, st: Optional[QuantState] = None) -> "Sparse24Linear":
        """Compress a 2:4 Linear: FP32 values, or (with an int8 per-channel ``st``) the int8 codes
        QAT trained against. Raises ``ValueError`` when the weight is not 2:4."""
        if st is None:
            values, meta = packing.compress_24(m.weight.detach().float())
            return cls(values, meta, None, None if m.bias is None else m.bias.detach().float().clone())
        dense = Int8Linear.from_quantized(m, st)  # the int8 codes and scales QAT trained against
        values, meta = packing.compress_24(dense.qweight)  # 0 quantizes to 0: the codes keep the 2:4 pattern
        return cls(values, meta, dense.w_scale, dense.bias)

    @classmethod
    def empty(cls, meta: Dict[str, Any]) -> "Sparse24Linear":
        n, k = meta["shape"]
        int8 = meta["scheme"] == "sparse24_int8"
        layer = cls(torch.empty(n, k // 2, dtype=torch.int8 if int8 else torch.float32),
                    torch.empty(n, (k // 4 + 1) // 2, dtype=torch.uint8), torch.empty(n, dtype=torch.float32) if int8 else None,
                    torch.empty(n, dtype=torch.float32) if meta.get("bias") else None, meta.get("kernels"))
        if meta.get("weight_only", False) is not False and not int8:
            raise ValueError("weight_only on a 2:4 layer with float values (its input is never quantized)")
        layer._restore_weight_only(meta)
        return layer

    def verify(self, metadata: Optional[Tensor] = None) -> None:
        """Raise ``ValueError`` unless the layer's ``metadata`` (or the one given, e.g. read for it
        before it is loaded) obeys the 2:4 rule (two distinct positions per group)."""
        packing.check_24_meta(self.metadata if metadata is None else metadata, self.in_features, name="metadata")

    def forward(self, input: Tensor) -> Tensor:
        kernel = self.kernels.get(input.device.type, "dense")
        return torch.ops.hwaware.sparse24_linear(input, self.values, self.metadata, self.w_scale, self.bias, kernel)

    def describe(self) -> Dict[str, Any]:
        return {"scheme": self.scheme, "shape": [self.out_features, self.in_features], "bias": self.bias is not None,
                "kernels": dict(self.kernels), **self._weight_only_entry(),
                "bytes": _bytes(self.values, self.metadata, self.w_scale, self.bias),
                "dense_bytes": 4 * self.out_features * (self.in_features + 1)}


_OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _out_dtype(meta: Dict[str, Any]) -> torch.dtype:
    name = meta.get("dtype", "float32")
    if name not in _OUT_DTYPES:
        raise ValueError(f"dtype {name!r}; expected one of {sorted(_OUT_DTYPES)}")
    return _OUT_DTYPES[name]


class RowwiseEmbeddingBag(nn.Module):
    """Row-wise int8/int4 embedding bag in the FBGEMM fused layout (codes + scale + offset per row).

    Keeps the table attributes a forward reads (``num_embeddings``, ``embedding_dim``, ``padding_idx``,
    ``mode``, ``include_last_offset``; ``max_norm`` None: such tables are never packed), as the
    linear deploy layers keep ``in_features`` / ``out_features``."""

    max_norm = None

    @property
    def embedding_dim(self) -> int:
        return self.dim

    def __init__(self, weight: Tensor, bits: int, dim: int, mode: str, include_last_offset: bool,
                 padding_idx: Optional[int] = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype not in _OUT_DTYPES.values():
            raise ValueError(f"{type(self).__name__} dtype={dtype!r}; expected one of {sorted(_OUT_DTYPES)}")
        self.out_dtype = dtype  # the table's dtype before packing: what a lookup returns, as the original layer did
        if mode not in _MODES:
            raise ValueError(f"RowwiseEmbeddingBag mode={mode!r}; expected one of {tuple(_MODES)}")
        if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
                                        or not 0 <= padding_idx < weight.shape[0] or mode == "max"):
            raise ValueError(f"RowwiseEmbeddingBag padding_idx={padding_idx!r}; expected None or a row index in "
                             f"[0, {weight.shape[0]}) with mode 'sum' or 'mean' (got mode {mode!r})")
        if bits not in (4, 8) or isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 \
                or weight.dim() != 2 or weight.shape[1] != packing.rowwise_cols(dim, bits):
            raise ValueError(f"{type(self).__name__} bits={bits!r}, dim={dim!r} with a packed table of shape "
                             f"{tuple(weight.shape)}; expected bits 4 or 8 and [rows, rowwise_cols(dim, bits)]")
        if not isinstance(include_last_offset, bool):
            raise ValueError(f"{type(self).__name__} include_last_offset={include_last_offset!r}; expected True or False")
        self.register_buffer("weight", weight)  # uint8 [R, cols]
        self.bits, self.dim, self.mode, self.include_last_offset = bits, dim, mode, include_last_offset
        self.padding_idx = padding_idx
        self.num_embeddings = weight.shape[0]

    @property
    def scheme(self) -> str:
        return f"rowwise_int{self.bits}"

    @classmethod
    def from_quantized(cls, m: nn.EmbeddingBag, st: QuantState) -> "RowwiseEmbeddingBag":
        if m.padding_idx is not None and m.mode == "max":
            raise ValueError("embedding bags with padding_idx in mode 'max' are not supported by the row-wise op "
                             "(mode 'sum' and 'mean' are)")
        if m.max_norm is not None:  # served as stored, never renormalized: a trial's bags came out 4x longer
            raise ValueError("embedding bags with max_norm (renormalized rows on lookup) are not supported by the row-wise op")
        fused = packing.quantize_rowwise(m.weight.detach().float(), st.weight.spec.bits, st.weight.spec)
        return cls(fused, st.weight.spec.bits, m.embedding_dim, m.mode, bool(m.include_last_offset), m.padding_idx, m.weight.dtype)

    @classmethod
    def empty(cls, meta: Dict[str, Any]) -> "RowwiseEmbeddingBag":
        r, d = meta["shape"]
        return cls(torch.empty(r, meta["cols"], dtype=torch.uint8), meta["bits"], d, meta["mode"], meta["include_last_offset"],
                   meta.get("padding_idx"), _out_dtype(meta))

    def forward(self, input: Tensor, offsets: Optional[Tensor] = None, per_sample_weights: Optional[Tensor] = None) -> Tensor:
        return self._in_table_dtype(self._bags(input, offsets, per_sample_weights))

    def _apply(self, fn, recurse: bool = True):
        """A cast of the model (``model.half()``) casts what a lookup returns: the packed rows stay."""
        super()._apply(fn, recurse)
        probe = fn(torch.zeros((), dtype=self.out_dtype))
        if probe.dtype in _OUT_DTYPES.values():
            self.out_dtype = probe.dtype
        return self

    def _in_table_dtype(self, out: Tensor) -> Tensor:
        """The op's float32 rows as the dtype of the table they replaced."""
        return out if self.out_dtype == torch.float32 else out.to(self.out_dtype)

    def _bags(self, input: Tensor, offsets: Optional[Tensor], per_sample_weights: Optional[Tensor]) -> Tensor:
        if offsets is not None and (offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool):
            raise TypeError(f"{type(self).__name__}: offsets must be an int64 or int32 tensor, got {offsets.dtype} "
                            "(as nn.EmbeddingBag refuses it)")
        if per_sample_weights is not None and per_sample_weights.dtype != torch.float32:
            per_sample_weights = per_sample_weights.float()  # a bf16/fp16 model passes its own dtype; the op sums in fp32
        last = self.include_last_offset
        if input.dim() == 2:  # [B, L] fixed-length bags
            if offsets is not None:
                raise ValueError(f"{type(self).__name__}: 2-D input is a batch of fixed-length bags and takes no offsets, "
                                 f"got offsets of shape {list(offsets.shape)} (as nn.EmbeddingBag refuses it)")
            b, l = input.shape
            offsets = torch.arange(0, b * l, l, device=input.device, dtype=input.dtype)
            input = input.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
            last = False  # B start offsets: B bags, as torch gives whatever include_last_offset says
        elif offsets is None:
            raise ValueError("RowwiseEmbeddingBag: 1-D input needs offsets")
        if offsets.dtype != input.dtype:
            offsets = offsets.to(input.dtype)
        if self.padding_idx is not None:
            return self._padded(input, offsets, per_sample_weights, last)
        return torch.ops.hwaware.embedding_bag_rowwise.default(
            self.weight, self.bits, self.dim, input, offsets, _MODES[self.mode], per_sample_weights, last)

    def _padded(self, input: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor], last: bool) -> Tensor:
        """``nn.EmbeddingBag``'s padding_idx: entries at it are left out of the bag. A sum weighs them
        by 0 (exactly the sum without them: the rows are finite); a mean divides that sum by the bags'
        counts of other entries (a bag of padding only, or empty, gives zeros, as torch's does)."""
        if per_sample_weights is not None and self.mode != "sum":  # as torch refuses it (and the op without padding_idx)
            raise ValueError(f"per_sample_weights is only supported for mode='sum', got mode={self.mode!r}")
        keep = input != self.padding_idx
        w = keep.to(torch.float32) if per_sample_weights is None else per_sample_weights * keep
        out = torch.ops.hwaware.embedding_bag_rowwise.default(
            self.weight, self.bits, self.dim, input, offsets, _MODES["sum"], w, last)
        if self.mode == "sum":
            return out
        # each bag's count of kept entries: a sum bag over a one-entry table of ones, weighted by keep
        # (the same offsets rule as the lookup; no slicing of offsets, so torch.export keeps the
        # batch dynamic down to 1)
        ones = torch.ones(1, 1, dtype=torch.float32, device=input.device)
        count = F.embedding_bag(torch.zeros_like(input), ones, offsets, mode="sum", per_sample_weights=keep.to(torch.float32),
                                include_last_offset=last)
        return out / count.clamp_(min=1)

    def describe(self) -> Dict[str, Any]:
        return {"scheme": self.scheme, "shape": [self.num_embeddings, self.dim], "bits": self.bits, "cols": self.weight.shape[1],
                "mode": self.mode, "include_last_offset": self.include_last_offset,
                **({"padding_idx": self.padding_idx} if self.padding_idx is not None else {}),
                **({"dtype": str(self.out_dtype).replace("torch.", "")} if self.out_dtype != torch.float32 else {}),
                "bytes": _bytes(self.weight), "dense_bytes": 4 * self.num_embeddings * self.dim}


class RowwiseEmbedding(RowwiseEmbeddingBag):
    """Row-wise int8/int4 ``nn.Embedding``: a bag of one row per index."""

    @classmethod
    def from_quantized(cls, m: nn.Embedding, st: QuantState) -> "RowwiseEmbedding":
        if m.max_norm is not None:  # (padding_idx only stops gradients: a lookup returns the row as stored)
            raise ValueError("embeddings with max_norm (renormalized rows on lookup) are not supported by the row-wise op")
        fused = packing.quantize_rowwise(m.weight.detach().float(), st.weight.spec.bits, st.weight.spec)
        # padding_idx kept as the attribute a forward may read (ids != emb.padding_idx); a lookup of the
        # row returns it as stored, as nn.Embedding's does
        return cls(fused, st.weight.spec.bits, m.embedding_dim, "sum", False, m.padding_idx, m.weight.dtype)

    def forward(self, input: Tensor) -> Tensor:  # input: any shape -> [*input.shape, D]
        flat = input.reshape(-1)
        offsets = torch.arange(flat.numel(), device=flat.device, dtype=flat.dtype)
        out = torch.ops.hwaware.embedding_bag_rowwise(self.weight, self.bits, self.dim, flat, offsets, 0, None, False)
        return self._in_table_dtype(out.reshape(*input.shape, self.dim))


DEPLOY_TYPES = {c.__name__: c for c in (Int8Linear, Int4Linear, Sparse24Linear, RowwiseEmbeddingBag, RowwiseEmbedding)}


def no_deploy_op(kind: str, weight_spec: QuantSpec) -> Optional[str]:
    """Why a layer of ``kind`` quantized with ``weight_spec`` has no deploy op (export leaves it
    dense), or None when one packs it: int8 per-channel symmetric or int4 group-wise linear weights,
    int8 or int4 row-wise tables."""
    if kind == "linear":
        if (weight_spec.bits == 8 and weight_spec.granularity == "per_channel" and weight_spec.symmetric
                and weight_spec.narrow_range) or (weight_spec.bits == 4 and weight_spec.granularity == "per_group"):
            return None
        if weight_spec.bits == 8 and weight_spec.symmetric and not weight_spec.narrow_range:
            return (f"no deploy op for {weight_spec.short()} linear weights with narrow_range=False: int8 layers are "
                    "packed in [-127, 127], so code -128 would change (int8 per_channel sym narrow-range or int4 per_group)")
        return f"no deploy op for {weight_spec.short()} linear weights (int8 per_channel sym or int4 per_group)"
    if kind in ("embedding_bag", "embedding"):
        return None if weight_spec.bits in (4, 8) else f"no deploy op for {weight_spec.short()} {kind} tables (int8 or int4 rows)"
    if kind == "conv":
        return "no hwaware conv op yet: runs dense"
    return f"no deploy op for {weight_spec.short()} {kind}"


def unpackable_specs(layers: Dict[str, Tuple[str, QuantSpec]]) -> Dict[str, str]:
    """``{layer: why}`` for the layers (``{name: (kind, weight spec)}``) whose spec no deploy op packs:
    a spec choice worth a warning. Conv layers are left out: no conv op exists yet whatever their
    spec (README and the manifest's ``dense_layers`` say so)."""
    return {n: why for n, (kind, spec) in layers.items() if kind != "conv" and (why := no_deploy_op(kind, spec))}


def _hooked(m: nn.Module) -> bool:
    """Hooks on ``m``, or global module hooks (which would see every fused child called)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or _torch_module._global_forward_hooks
                or _torch_module._global_forward_pre_hooks)


def _relu_follows(mods: list, i: int) -> bool:
    """Whether ``mods[i + 1]`` is a ReLU that an :class:`Int8Chain` applies in the epilogue of the
    :class:`Int8Linear` ``mods[i]``: a plain ``nn.ReLU`` with no hook (nor a global one) to see it called."""
    return i + 1 < len(mods) and type(mods[i + 1]) is nn.ReLU and not _hooked(mods[i + 1])


def fuse_relu(model: nn.Module) -> Dict[str, str]:
    """Make every plain ``nn.Sequential`` in which an :class:`Int8Linear` is directly followed by an
    ``nn.ReLU`` an :class:`Int8Chain` (in place: the same children and keys), whose forward runs the
    pair as one ``int8_linear`` call with the ReLU in the layer's epilogue. Bit-identical (the
    epilogue applies ``torch.relu``'s max(v, 0)).

    The fusion lives in the container's forward only: both children stay as they were, so a model
    that also calls the layer on its own (``self.mlp[0](x)``, a pre-activation tap) or the ReLU on its
    own gets what they computed before. Only plain ``nn.Sequential`` containers qualify: their forward
    is "each child on the previous output", so the pair's composition is known. A ReLU with hooks is
    not fused. Returns ``{linear name: relu name}`` (the manifest's ``fused_relu``).
    """
    fused: Dict[str, str] = {}
    for seq_name, seq in model.named_modules():
        if type(seq) not in (nn.Sequential, Int8Chain):
            continue
        names, mods = list(seq._modules), list(seq._modules.values())
        prefix = f"{seq_name}." if seq_name else ""
        pairs = {prefix + names[i]: prefix + names[i + 1] for i, m in enumerate(mods)
                 if type(m) is Int8Linear and _relu_follows(mods, i)}
        if pairs:
            seq.__class__ = Int8Chain
            fused.update(pairs)
    return fused


def _cpu_impl(m: "Int8Linear") -> str:
    impl = m.kernels.get("cpu", "auto")
    return INT8_KERNELS["cpu"][0] if impl == "auto" else impl  # "auto" is the device's first


def _chains(m: nn.Module, any_impl: bool) -> bool:
    """Whether ``m`` can be a layer of an ``int8_mlp`` run: an :class:`Int8Linear` on CPU ``int_mm``, or
    a :class:`Sparse24Linear` with int8 values on CPU ``"dense"`` (int_mm's math on its decompressed
    codes); with ``any_impl``, either on any implementation that quantizes its input (not weight-only)."""
    if type(m) is Int8Linear:
        return not m.weight_only if any_impl else _cpu_impl(m) == "int_mm"
    if type(m) is Sparse24Linear and m._buffers["values"].dtype == torch.int8:
        return not m.weight_only if any_impl else m.kernels.get("cpu", "dense") == "dense"
    return False


def _int_mm_run(mods: list, start: int, any_impl: bool = False) -> Tuple[List[int], List[bool], int]:
    """The indices of the layers from ``mods[start]`` on that run ``int_mm`` on CPU (:func:`_chains`;
    ``any_impl``: that would chain if they did), chained output to input with only hook-free
    ``nn.Identity`` between them, whether each applies a ReLU (its own ``relu``, or the plain
    ``nn.ReLU`` right after it: :func:`_relu_follows`), and the index after the last (after its ReLU)."""
    run: List[int] = []
    relus: List[bool] = []
    end, i, n = start, start, len(mods)
    while i < n:
        m = mods[i]
        if type(m) is nn.Identity and run and not _hooked(m):
            i += 1
            continue
        if not _chains(m, any_impl) or _hooked(m) or (run and m.in_features != mods[run[-1]].out_features):
            break
        run.append(i)
        i += 1
        if i < n and type(mods[i]) is nn.ReLU and not _hooked(mods[i]):  # _relu_follows, inlined: per call
            relus.append(True)
            i += 1
        else:
            relus.append(getattr(m, "relu", False))
        end = i
    return run, relus, end


def run_call(layers: list, relus: List[bool], quantized: bool = False) -> Tuple[Any, tuple]:
    """The op that runs these chained layers (:func:`_int_mm_run`) as one call and its arguments after
    the input: ``hwaware::int8_mlp`` (``_quantized``: the input given as per-token codes and scales)
    over their ``(qweights, w_scales, biases, relus)``, or ``int8_mlp24`` (``_quantized``) when a
    layer is 2:4 compressed, with each layer's stored values and metadata. Read from the buffer
    dicts: ``nn.Module`` attribute lookups cost about a microsecond each, per call."""
    bufs = [m._buffers for m in layers]
    scales, biases = [b["w_scale"] for b in bufs], [b["bias"] for b in bufs]
    if all("qweight" in b for b in bufs):
        op = torch.ops.hwaware.int8_mlp_quantized if quantized else torch.ops.hwaware.int8_mlp
        return op.default, ([b["qweight"] for b in bufs], scales, biases, relus)
    op = torch.ops.hwaware.int8_mlp24_quantized if quantized else torch.ops.hwaware.int8_mlp24
    return op.default, ([b["qweight"] if "qweight" in b else b["values"] for b in bufs],
                        [b.get("metadata") for b in bufs], scales, biases, relus)


class Int8Chain(nn.Sequential):
    """An ``nn.Sequential`` that runs its :class:`Int8Linear` layers fused with what follows them:
    a run of two or more that run ``int_mm`` (with only ``nn.Identity`` or the ReLUs below between
    them) is one ``hwaware::int8_mlp`` call on CPU: each layer's epilogue writes the next layer's int8
    codes, so the float activations between them are never written and read back. Int8 2:4 layers
    (:class:`Sparse24Linear` on ``"dense"``: int_mm on their decompressed codes) join such runs, which
    are then one ``hwaware::int8_mlp24`` call. And a plain,
    hook-free ``nn.ReLU`` right after an :class:`Int8Linear` is applied in that layer's epilogue, not
    called. Bit for bit the same as calling the children in turn (tested), and the children are
    untouched: called on their own they compute what they did. Children with hooks (or any global
    module hook), inputs off CPU or not float32 where a run starts, and other implementations run
    one by one (a ReLU still in the epilogue). The ``state_dict`` keys are the ``nn.Sequential``'s;
    :func:`chain_int8` and :func:`fuse_relu` make one."""

    def forward(self, input: Tensor) -> Tensor:
        return self._forward_from(input, 0)

    def takes_quantized(self) -> bool:
        """Whether :meth:`forward_quantized` applies: the first child starts a run of CPU ``int_mm``
        layers, and no hook (on this module or global) would miss seeing a float input."""
        mods = list(self._modules.values())
        return not _hooked(self) and len(mods) > 0 and len(_int_mm_run(mods, 0)[0]) > 0  # (bool(list): no torch 2.11 dynamo)

    def forward_quantized(self, codes: Tensor, scales: Tensor) -> Tensor:
        """``self(x)`` given ``(codes, scales) = quantize_per_token_ref(x)`` for a float32 CPU ``x``
        [M, K]: bit for bit the same, the first run through ``hwaware::int8_mlp_quantized``. A producer
        that quantizes while it writes (DLRM's ``hwaware::dot_interaction_int8``) never writes ``x``.
        Check :meth:`takes_quantized` first."""
        mods = list(self._modules.values())
        run, relus, end = _int_mm_run(mods, 0)
        if not run:
            raise RuntimeError("forward_quantized: the first child is not a CPU int_mm Int8Linear (check takes_quantized())")
        op, args = run_call([mods[j] for j in run], relus, quantized=True)
        return self._forward_from(op(codes, scales, *args), end)

    def _forward_from(self, input: Tensor, start: int) -> Tensor:
        mods = list(self._modules.values())
        x, i = input, start
        while i < len(mods):
            # CPU float32 input to the run only (checked where each run starts: an earlier child or
            # autocast may change it): per layer, other dtypes round each activation to that dtype
            fusable = isinstance(x, Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
            run, relus, end = _int_mm_run(mods, i) if fusable else ([], [], i)
            if len(run) >= 2:
                op, args = run_call([mods[j] for j in run], relus)
                x = op(x, *args)
                i = end
            elif type(mods[i]) is Int8Linear and not _hooked(mods[i]) and _relu_follows(mods, i):
                x = mods[i].forward_relu(x)  # the ReLU in the epilogue
                i += 2
            else:
                x = mods[i](x)
                i += 1
        return x


def chain_int8(model: nn.Module) -> Dict[str, list]:
    """Make every plain ``nn.Sequential`` holding a run of two or more CPU ``int_mm`` layers
    (:class:`Int8Linear`, or int8 :class:`Sparse24Linear` on ``"dense"``) an :class:`Int8Chain` (in
    place: the same children and keys).
    Returns ``{sequential name: [[layer names of each run], ...]}``."""
    chained: Dict[str, list] = {}
    for seq_name, seq in model.named_modules():
        if type(seq) not in (nn.Sequential, Int8Chain):
            continue
        names, mods = list(seq._modules), list(seq._modules.values())
        runs, i = [], 0
        while i < len(mods):
            run, _, end = _int_mm_run(mods, i)
            if len(run) >= 2:
                prefix = f"{seq_name}." if seq_name else ""
                runs.append([prefix + names[j] for j in run])
                i = end
            else:
                i += 1
        if runs:
            seq.__class__ = Int8Chain
            chained[seq_name] = runs
    return chained
