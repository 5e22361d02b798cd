"""``hwaware::*`` custom ops, registered on import.

Each op is defined on a ``torch.library.Library`` with a schema, a fake (meta) implementation, a CPU
kernel and a thin autograd kernel (:class:`_Op`), so it passes ``torch.library.opcheck``,
``torch.compile(fullgraph=True)`` and ``torch.export.export/save/load``. (DESIGN.md, "How ops are
registered", names ``torch.library.custom_op``; its per-call Python cost about twice this, see
:class:`_Op`.) ``import hwaware.ops``
before ``torch.export.load`` of a program that uses them.

Ops (shapes; ``...`` = any leading dims):

- ``hwaware::int8_linear(x [..., K] float, qweight int8 [N, K], w_scale float32 [N], bias [N]?, impl="auto",
  relu=False) -> [..., N]`` W8A8: dynamic per-token symmetric int8 activations, per-channel int8
  weights; ``impl`` names the implementation (:data:`INT8_KERNELS`; the export measures and records
  it per layer); ``relu`` applies a fused following ReLU.
- ``hwaware::int8_mlp(x [..., K] float, qweights [L x int8 [N_i, K_i]], w_scales, biases, relus) -> [..., N_L]``:
  L ``int8_linear`` layers (``impl="int_mm"``) in a row, bit for bit, without writing the float
  activations between them.
- ``hwaware::int4_linear(x [..., K] float, packed uint8 [N, K/2], scales float32 [N, K/g],
  zeros int8 [N, K/g]?, group_size, bias [N]?) -> [..., N]``: weight-only int4, group-wise.
- ``hwaware::embedding_bag_rowwise(weight uint8 [R, cols], bits, dim, indices [L], offsets [B(+1)],
  mode, per_sample_weights [L]?, include_last_offset) -> float32 [B, dim]``: FBGEMM row-wise
  8/4-bit tables; mode 0 sum, 1 mean, 2 max.
- ``hwaware::embedding_bags_rowwise(weights [T x uint8 [R_t, cols_t]], bits [T], dim, indices [T, N],
  offsets [B], mode) -> float32 [T, B, dim]``: T row-wise tables in one call (sum or mean), equal to
  T calls of ``embedding_bag_rowwise`` bit for bit.
- ``hwaware::sparse24_linear(x [..., K] float, values [N, K/2] float|int8, meta uint8 [N, ceil(K/8)],
  w_scale float32 [N]?, bias [N]?, kernel) -> [..., N]``: 2:4 compressed weights (packing.py). Float
  values: ``x @ W^T``; int8 values (with ``w_scale``): the W8A8 math of ``int8_linear``. ``kernel``
  names the implementation the export measured and chose (:data:`SPARSE24_KERNELS`).

The CUDA kernels (Triton, ``kernels/``, installed as ``hwaware.kernels``) are registered with
``<op>.register_kernel("cuda")`` by :mod:`hwaware.ops._cuda`, imported at the bottom of this file;
triton itself is imported on the first CUDA call, so this module imports without it.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hwaware.ops.packing import INT8_MAX_K, decompress_24, dequantize_int4_weight, rowwise_cols
from hwaware.ops.reference import (dot_interaction_backward_ref, dot_interaction_ref, int8_linear_ref,
                                   quantize_per_token_ref, w8a8_epilogue_ref)

__all__ = ["int8_linear", "int8_mlp", "int8_mlp_quantized", "int8_mlp24", "int8_mlp24_quantized", "dot_interaction_int8", "embedding_interaction", "embedding_interaction_int8", "int4_linear", "embedding_bag_rowwise", "embedding_bags_rowwise", "sparse24_linear", "dot_interaction",
           "INT8_KERNELS", "SPARSE24_KERNELS", "REDUCE_RANGE", "FBGEMM_MAX_K", "clear_cache"]

_FLOAT_X = (torch.float32, torch.bfloat16, torch.float16)
_MODES = (0, 1, 2)


# -- input validation (shared by the fake and the real kernels) ---------------------------------

def _dt(name: str, t: Tensor, dtypes: Sequence[torch.dtype], expected: str) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {expected} (dtype in {[str(d) for d in dtypes]}), got dtype {t.dtype}")


def _shape(name: str, t: Tensor, shape: tuple, expected: str) -> None:
    if t.dim() != len(shape) or any(a != b for a, b in zip(t.shape, shape)):
        raise ValueError(f"{name} must have shape {expected} = {list(shape)}, got {list(t.shape)}")


def _check_bias(bias: Optional[Tensor], n) -> None:
    if bias is not None:
        _dt("bias", bias, _FLOAT_X, "[N] float")
        _shape("bias", bias, (n,), "[N]")


def _check_width(name: str, n: int, k: int) -> None:
    if n < 1 or k < 1:
        raise ValueError(f"{name} describes a [N, K] = [{n}, {k}] weight; a packed layer needs N >= 1 and K >= 1")


# fbgemm quantizes the activation per tensor to uint8 codes up to 255 away from its zero point
# (full range; REDUCE_RANGE: 127), times int8 weights, summed in int32: a lower K than the exact
# paths' INT8_MAX_K (measured: wrong sums from K = 66000 on all-positive rows).
FBGEMM_MAX_K = (2**31 - 1) // (255 * 128)  # 65793


def _check_int8_k(name: str, k: int, impl: str, arg: str = "impl") -> None:
    """Refuse a K whose int32 accumulator could overflow under the integer implementation ``impl``
    (``"fbgemm"``: :data:`FBGEMM_MAX_K`; the exact ones: ``INT8_MAX_K``); ``"dequant"`` (float32
    on the dequantized weight) takes any K."""
    if impl == "dequant":
        return
    limit = FBGEMM_MAX_K if impl == "fbgemm" else INT8_MAX_K
    if k > limit:
        raise ValueError(f"{name} has K={k} inputs; {arg}={impl!r} sums K products of int8 codes in int32, which "
                         f"holds them exactly only for K <= {limit}: split the layer, or run {arg}='dequant' "
                         "(float32 on the dequantized weight, any K)")


def _check_int8_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> None:
    # the common case in one test (a serving call's checks cost a third of a small layer's F.linear);
    # anything else goes through the checks below, which name what is wrong
    qs, ws = qweight.shape, w_scale.shape
    if (len(qs) == 2 and qweight.dtype == torch.int8 and qs[0] >= 1 and qs[1] >= 1 and x.dtype in _FLOAT_X
            and x.dim() >= 1 and x.shape[-1] == qs[1] and w_scale.dtype == torch.float32 and len(ws) == 1
            and ws[0] == qs[0] and (bias is None or (bias.dtype in _FLOAT_X and bias.shape == ws))):
        return
    _dt("x", x, _FLOAT_X, "[..., K] float")
    _dt("qweight", qweight, (torch.int8,), "[N, K] int8")
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K] int8, got shape {list(qweight.shape)}")
    n, k = qweight.shape
    _check_width("qweight", n, k)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K] with K = qweight.shape[1] = {k}, got {list(x.shape)}")
    _dt("w_scale", w_scale, (torch.float32,), "[N] float32")
    _shape("w_scale", w_scale, (n,), "[N]")
    _check_bias(bias, n)


def _check_int4_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                       bias: Optional[Tensor]) -> None:
    _dt("x", x, _FLOAT_X, "[..., K] float")
    _dt("packed", packed, (torch.uint8,), "[N, K/2] uint8 (two int4 per byte)")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D [N, K/2] uint8, got shape {list(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    _check_width("packed", n, k)
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"group_size={group_size} must be positive and divide K = 2 * packed.shape[1] = {k}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K] with K = 2 * packed.shape[1] = {k}, got {list(x.shape)}")
    g = k // group_size
    _dt("scales", scales, (torch.float32,), "[N, K/group_size] float32")
    _shape("scales", scales, (n, g), "[N, K/group_size]")
    if zeros is not None:
        _dt("zeros", zeros, (torch.int8,), "[N, K/group_size] int8 (None when symmetric)")
        _shape("zeros", zeros, (n, g), "[N, K/group_size]")
    _check_bias(bias, n)


def _index_dtypes(indices: Tensor, offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """Mixed int32 / int64 ids and offsets, as ``F.embedding_bag`` takes them: both as int64. (A
    program traced with int64 ids builds int64 offsets, and is then called with int32 ids.)"""
    if indices.dtype != offsets.dtype:
        return indices.long(), offsets.long()
    return indices, offsets


def _check_embedding_bag(weight: Tensor, bits: int, dim: int, indices: Tensor, offsets: Tensor, mode: int,
                         per_sample_weights: Optional[Tensor], include_last_offset: bool) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported; expected 4 or 8")
    if mode not in _MODES:
        raise ValueError(f"mode={mode} is not supported; expected 0 (sum), 1 (mean) or 2 (max)")
    if dim < 1:
        raise ValueError(f"dim={dim} must be >= 1")
    _dt("weight", weight, (torch.uint8,), "[R, cols] uint8 (FBGEMM row-wise)")
    cols = rowwise_cols(dim, bits)
    if weight.dim() != 2 or weight.shape[1] != cols:
        raise ValueError(f"weight must have shape [R, {cols}] for a {bits}-bit row-wise table of dim={dim}, "
                         f"got {list(weight.shape)}")
    _dt("indices", indices, (torch.int64, torch.int32), "[L] int64 or int32")
    _dt("offsets", offsets, (torch.int64, torch.int32), "[B] (or [B + 1] with include_last_offset) int")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D [L], got shape {list(indices.shape)}")
    if offsets.dim() != 1 or (include_last_offset and offsets.shape[0] < 1):
        raise ValueError(f"offsets must be 1-D [B]{' with B + 1 >= 1 entries' if include_last_offset else ''}, "
                         f"got shape {list(offsets.shape)}")
    if per_sample_weights is not None:
        if mode != 0:
            raise ValueError(f"per_sample_weights is only supported with mode=0 (sum), got mode={mode}")
        _dt("per_sample_weights", per_sample_weights, (torch.float32,), "[L] float32")
        _shape("per_sample_weights", per_sample_weights, (indices.shape[0],), "[L] (same length as indices)")


# -- registration --------------------------------------------------------------------------------

# Kept alive for the life of the process: dropping a Library object unregisters its ops.
_LIB = torch.library.Library("hwaware", "DEF")
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
# What is left of a call's keys below autograd when every tensor is a plain CPU tensor (inference
# tensors lack ADInplaceOrView): nothing but the CPU kernel would run, so _Op calls it directly.
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_PLAIN_CPU = (_CPU_KEYS.raw_repr(), (_CPU_KEYS | torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)).raw_repr())
_DEVICE_KEYS = {"cuda": "CUDA"}


class _NoBackward(torch.autograd.Function):
    """Runs a deploy op below autograd; its outputs require grad but backward raises (the ops
    serve inference; ``torch.library.custom_op`` without a registered formula does the same)."""

    @staticmethod
    def forward(ctx, op, keyset, *args):
        ctx.op_name = op.name()
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _AFTER_AUTOGRAD, *args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.op_name} is an inference op and has no backward; run the deploy model under "
                           "torch.no_grad() or torch.inference_mode(), or train the float model")


class _Op:
    """``hwaware::<name>``: schema, CPU kernel (the decorated function), fake kernel
    (:meth:`register_fake`), device kernels (:meth:`register_kernel`) and an autograd kernel that
    calls straight through when no input needs a gradient.

    Why not ``torch.library.custom_op``: its Python wrapper around every call (autograd metadata,
    an aliasing check of the outputs) costs about twice this registration's per-call time on an
    empty op, under ``torch.no_grad()`` and under ``torch.inference_mode()``
    (``benchmarks/bench_ops_cpu.py``, "dispatch"), and a row-wise lookup of 2048 ids is only a few
    times that. The schemas are the ones ``custom_op`` inferred, so programs exported with it still
    load. Calling an ``_Op`` calls its ``.default`` overload. ``lib``: the library to define in.

    On plain CPU tensors (no mode, subclass or fake tensor below autograd) the autograd kernel calls
    the CPU kernel given here directly rather than through a second dispatcher crossing, so a CPU
    kernel registered for the op later from outside would be reached only under inference mode:
    change the CPU implementation here, not by overriding the registration.
    """

    def __init__(self, schema: str, cpu_kernel: Callable, lib: torch.library.Library = _LIB) -> None:
        self.name, self._lib = schema.split("(", 1)[0], lib
        lib.define(schema)
        lib.impl(self.name, cpu_kernel, "CPU")
        self.default = getattr(getattr(torch.ops, lib.ns), self.name).default
        lib.impl(self.name, self._autograd, "Autograd", with_keyset=True)
        self.__doc__, self.__wrapped__ = cpu_kernel.__doc__, cpu_kernel

    def _autograd(self, keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return _NoBackward.apply(self.default, keyset, *args)
        below = keyset & _AFTER_AUTOGRAD
        with torch._C._AutoDispatchBelowAutograd():  # the kernel's own aten calls skip autograd too
            if below.raw_repr() in _PLAIN_CPU:
                # plain CPU tensors, no mode or subclass below autograd: the redispatch would land on
                # the CPU kernel, through one more C++ -> Python crossing (about a third of a small op's cost)
                return self.__wrapped__(*args)
            return self.default.redispatch(below, *args)

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.default(*args, **kwargs)

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(f"{self._lib.ns}::{self.name}", fn, lib=self._lib)
        return fn

    def register_kernel(self, device: str) -> Callable[[Callable], Callable]:
        if device not in _DEVICE_KEYS:
            raise ValueError(f"register_kernel: device={device!r}; expected one of {tuple(_DEVICE_KEYS)}")

        def deco(fn: Callable) -> Callable:
            self._lib.impl(self.name, fn, _DEVICE_KEYS[device])
            return fn
        return deco

    def __repr__(self) -> str:
        return f"<hwaware op {self.default._schema}>"


def _define(schema: str) -> Callable[[Callable], _Op]:
    """Decorator: define ``hwaware::<schema>`` with the decorated function as its CPU kernel."""
    return lambda cpu_kernel: _Op(schema, cpu_kernel)


# -- packed-weight cache -----------------------------------------------------------------------

def _version(t: Tensor) -> int:
    # inference tensors track no version (asking raises, and the raise costs more than the cached
    # op's whole overhead): an in-place write to one is not seen here (see _PackCache)
    return -1 if t.is_inference() else t._version


class _PackCache:
    """Derived weights (fbgemm prepacked int8, dequantized int4/int8, decompressed 2:4): one entry per
    source tensors and kind, alive exactly as long as the source tensors.

    Keyed on each source tensor's ``(data_ptr, shape, stride, dtype)`` plus the kind; a hit also
    requires the same ``_version`` (an in-place update of a weight rebuilds its entry) and the
    source tensors alive at that address (weak references: memory freed and reused by another
    tensor never returns a stale entry). An entry is dropped when one of its source tensors is
    freed, so there is no count limit: serving holds one derived copy per live weight. (A 32-entry
    LRU used to be here; a model with more cached layers than that missed on every call and
    rebuilt every weight, which made the int4 layer several times slower.)

    Writes the version counter does not see: in place into a tensor made under
    ``torch.inference_mode`` (inference tensors have no version), or through ``.data``. The deploy
    layers drop their entries in ``load_state_dict``; after any other such write, call
    :func:`clear_cache`.
    """

    def __init__(self) -> None:
        self._entries: Dict[tuple, tuple] = {}

    def get(self, tensors: Sequence[Optional[Tensor]], extra: tuple, build: Callable[[], object]):
        live = [t for t in tensors if t is not None]
        key = tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in live) + extra
        versions = tuple(_version(t) for t in live)
        hit = self._entries.get(key)
        if hit is not None:
            refs, vers, value, _ = hit
            if vers == versions and all(r() is t for r, t in zip(refs, live)):
                return value
        value = build()
        entry_id = object()

        def drop(_ref, key=key, entry_id=entry_id):  # one source tensor was freed: its entry goes
            current = self._entries.get(key)
            if current is not None and current[3] is entry_id:
                del self._entries[key]

        self._entries[key] = (tuple(weakref.ref(t, drop) for t in live), versions, value, entry_id)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def drop(self, tensors: Sequence[Tensor]) -> int:
        """Drop every entry derived from one of ``tensors``; returns how many went."""
        ids = {id(t) for t in tensors}
        gone = [k for k, (refs, _, _, _) in self._entries.items() if any(id(r()) in ids for r in refs)]  # dead ref: id(None)
        for k in gone:
            del self._entries[k]
        return len(gone)

    def __len__(self) -> int:
        return len(self._entries)


_CACHE = _PackCache()


def clear_cache() -> None:
    """Drop every cached prepacked / dequantized weight, and this thread's int_mm scratch buffers."""
    _CACHE.clear()
    _SCRATCH.__dict__.clear()


# -- hwaware::int8_linear -----------------------------------------------------------------------

def _has_vnni() -> bool:
    """Whether fbgemm runs its VNNI kernels here: the CPU has VNNI, and fbgemm is not capped below
    it (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` or ``AVX512``, how older CPUs are emulated)."""
    if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() in ("AVX2", "AVX512"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# fbgemm's dynamic linear quantizes the activation per TENSOR to uint8 (affine, from its min/max).
# Full range (reduce_range=False) uses 256 levels; on AVX2 without VNNI its vpmaddubsw kernels add
# pairs of u8 x s8 products in int16 and can saturate (2 * 255 * 127 > 32767), which is why torch's
# dynamic Linear defaults to reduce_range=True (128 levels). Measured on this machine (Xeon with
# AVX-512 VNNI, torch 2.13, weights randn/sqrt(K), per-token pre-scaling below), SQNR in dB:
#                       vs int8_linear_ref        vs fp32 F.linear (ref itself: 39.5 / 39.8 / 28.9)
#   x ~ randn            False 41.9 | True 34.8   False 39.5 | True 35.5        (M=2048, K=N=512)
#   x ~ relu(randn)      False 41.9 | True 144.8  False 41.7 | True 39.8
#   randn, 4 cols x20    False 37.2 | True 21.3   False 28.9 | True 23.0
# (DLRM shape M=2048, K=367, N=256: the same within 1 dB.) No saturation shows with full range on a
# VNNI CPU, and it is 4-7 dB better on signed data, so full range is used where VNNI exists and
# the overflow-safe reduced range elsewhere. Re-measure with `pytest tests/ops -k reduce_range -s`.
REDUCE_RANGE: bool = not _has_vnni()


def _prepack_int8(qweight: Tensor, w_scale: Tensor):
    with warnings.catch_warnings():  # quantized tensor creation is deprecated; fbgemm prepack still needs one
        warnings.simplefilter("ignore", UserWarning)
        qt = torch._make_per_channel_quantized_tensor(
            qweight.contiguous(), w_scale.double(), torch.zeros(qweight.shape[0], dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qt, None)


# CPU implementations of hwaware::int8_linear (the export times both per layer and records its choice):
#   "int_mm": the op's exact math. Per-token int8 codes (native C pass, = quantize_per_token_ref),
#             an exact int8 x int8 -> int32 product, and a float64 epilogue: bit-identical to
#             int8_linear_ref for float32 inputs. Where hwaware's C library has an engine for this
#             CPU (native.int8_engine: AMX tiles; VPDPBUSD with AVX-512 VNNI or AVX-VNNI; VPMADDWD on
#             int16 codes with AVX2 or AVX-512BW), the whole layer (or int8_mlp's run of layers) is
#             one C pass, a block of rows at a time through every layer, the same bits. Elsewhere
#             (no compiler, another architecture) the product is torch._int_mm (oneDNN's s8s8s32
#             gemm) where it is exact, and where it saturates (x86 without VNNI or AMX:
#             _int_mm_exact_here) an fp32 GEMM over the codes, exact too, at about fp32's
#             speed plus the two C passes. Each implementation's speed depends on the CPU and the
#             layer, which is why the export times them all.
#   "fbgemm": fbgemm's dynamic linear on per-token pre-scaled rows (below): fast on AVX2 too, but
#             fbgemm quantizes per tensor (uint8 affine), so it approximates the per-token math
#             (~42 dB SQNR against int8_linear_ref).
#   "dequant": the int8 weight dequantized once (cached: codes x scales in float32, bit for bit the
#             weight QAT's fake quant trained against), then fp32 F.linear on activations that are
#             not quantized: the layer's weights at higher activation precision than W8A8, at fp32
#             speed, holding an fp32 copy of the weight (4x its codes) while in use. For layers too
#             small for the int8 passes to pay off: at M=2048 the recipe DLRM's 13->64, 64->16 and
#             128->1 ran 2-6x slower as int_mm than fp32 (benchmarks/bench_ops_cpu.py).
# An input row holding NaN or inf comes out non-finite under each: NaN under int_mm (its per-token
# scale is not finite); under fbgemm and dequant as float32 math on the dequantized weight has it.
# The integer implementations sum K int8 products in int32 and refuse a K where that could overflow
# (_check_int8_k: int_mm K <= INT8_MAX_K = 131071, fbgemm K <= 65793); dequant takes any K.
INT8_KERNELS = {"cpu": ("int_mm", "fbgemm", "dequant")}


def _check_int8_kernel(impl: str, device: str, k: Optional[int] = None) -> str:
    """The implementation to run; ``"auto"`` is the device's first (on CPU: the exact ``int_mm``).
    A fake / meta call names no real device: any device's implementation passes there. ``k``: the
    layer's K, refused where that implementation's int32 accumulator could overflow
    (:func:`_check_int8_k`; ``"auto"`` on a fake / meta call counts as an integer implementation,
    as every device's first is)."""
    if device not in INT8_KERNELS:
        known = sorted({i for impls in INT8_KERNELS.values() for i in impls})
        if impl != "auto" and impl not in known:
            raise ValueError(f"impl={impl!r} is not an implementation of hwaware::int8_linear on any device; "
                             f"expected 'auto' or one of {known}")
    elif impl == "auto":
        impl = INT8_KERNELS[device][0]
    elif impl not in INT8_KERNELS[device]:
        raise ValueError(f"impl={impl!r} is not a {device.upper()} implementation of hwaware::int8_linear; "
                         f"expected 'auto' or one of {INT8_KERNELS[device]}")
    if k is not None:
        _check_int8_k("qweight", k, impl)
    return impl


@_define('int8_linear(Tensor x, Tensor qweight, Tensor w_scale, Tensor? bias, str impl="auto", bool relu=False) -> Tensor')
def int8_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], impl: str = "auto",
                relu: bool = False) -> Tensor:
    """W8A8 linear on CPU; ``impl`` in ``"auto"`` + :data:`INT8_KERNELS` ``["cpu"]`` (see there).
    ``relu``: return ``torch.relu`` of the result, applied in the epilogue (a following ReLU fused
    by export; saves a pass over the output).

    (Not named ``kernel``: inductor passes a defaulted argument by keyword to
    ``FallbackKernel.create(kernel, ...)``, which then fails with "multiple values for 'kernel'".)
    """
    _check_int8_linear(x, qweight, w_scale, bias)
    impl = _check_int8_kernel(impl, "cpu", qweight.shape[1])
    if impl == "int_mm":
        return _int_mm_layers(x, [qweight], [w_scale], [bias], [relu])
    def dense() -> Tensor:
        return _int8_dequantized(qweight, w_scale)

    if impl == "dequant":
        return _linear_fp32(x, dense(), bias, relu)
    packed = _CACHE.get((qweight, w_scale), ("int8_linear",), lambda: _prepack_int8(qweight, w_scale))
    out = _int8_linear_prepacked(x, packed, qweight.shape[0], bias, dense)
    return out.relu_() if relu else out


# Scratch buffers of the int_mm path (codes, int32 accumulator), reused across calls per thread.
# Fresh multi-MB temporaries come back from glibc as new pages every call, and the page faults made
# the op much slower than its three parts run alone.
_SCRATCH = threading.local()


def _workspace(kind: str, numel: int, dtype: torch.dtype) -> Tensor:
    """A flat scratch tensor of at least ``numel`` elements; valid until the next call for ``kind``."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(kind)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = bufs[kind] = torch.empty(max(numel, 1), dtype=dtype)
    return buf[:numel]


# torch._int_mm on CPU is oneDNN's s8s8s32 gemm. On CPUs without VNNI or AMX its kernels multiply
# unsigned by signed bytes in pairs that saturate at int16 (VPMADDUBSW on the codes + 128): the
# int32 "product" is then off by up to ~1.6e7 at K = 1024 with full-range codes (measured here with
# oneDNN capped at AVX2 or AVX-512 without VNNI; tests/ops/test_int8_linear_exact.py). hwaware's
# int8 pass has an exact engine for those CPUs too (VPMADDWD); where the native library is not in use
# the product runs as an fp32 GEMM, exact.
_INT_MM_EXACT: Optional[bool] = None
_EXACT_FP32_K = 1024  # 1024 * 127^2 < 2^24: every partial sum of a chunk is an integer fp32 holds exactly


def _int_mm_exact_here() -> bool:
    """Whether ``torch._int_mm`` gives the exact product on this CPU: probed once, on codes at +-127
    (where the saturating kernels go wrong) at a small and a GEMM-sized shape."""
    global _INT_MM_EXACT
    if _INT_MM_EXACT is None:
        ok = True
        for m, k, n in ((8, 64, 16), (64, 512, 64)):
            a = torch.full((m, k), 127, dtype=torch.int8)
            a[1::2] = -127
            b = torch.full((k, n), 127, dtype=torch.int8)
            b[:, 1::2] = -127
            b[: k // 3, 2::4] = 5
            ok = ok and torch.equal(torch._int_mm(a, b), (a.double() @ b.double()).to(torch.int32))
        _INT_MM_EXACT = ok
    return _INT_MM_EXACT


def _fp32_matmul_is_ieee() -> bool:
    """False when the user let float32 matmuls run at lower precision (bf16 / tf32 on CPU)."""
    mkl = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return torch.get_float32_matmul_precision() == "highest" and getattr(mkl, "fp32_precision", "none") in ("none", "ieee")


def _int_mm_fp32(q: Tensor, qw: Tensor, out: Tensor) -> Tensor:
    """``torch._int_mm(q, qw.t())``, exactly, as float GEMMs: the codes as float32 in K-chunks of
    ``_EXACT_FP32_K`` (each chunk's sums are integers below 2^24, exact in any summation order),
    the chunks added in int32; float64 where float32 matmuls may run at lower precision."""
    k = q.shape[1]
    if not _fp32_matmul_is_ieee():
        return out.copy_(torch.mm(q.double(), qw.double().t()))  # |sum| < 2^53 for any K that fits int32
    wf = _CACHE.get((qw,), ("int_mm_fp32",), lambda: qw.float())  # [N, K], as dequant keeps its fp32 weight
    for c in range(0, k, _EXACT_FP32_K):
        part = torch.mm(q[:, c:c + _EXACT_FP32_K].float(), wf[:, c:c + _EXACT_FP32_K].t())
        if c == 0:
            out.copy_(part)
        else:
            out.add_(part.to(torch.int32))
    return out


def _int_mm_layers(x: Optional[Tensor], qweights: Sequence[Tensor], w_scales: Sequence[Tensor],
                   biases: Sequence[Optional[Tensor]], relus: Sequence[bool],
                   quantized: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Exact W8A8 layers in a row (one layer: int8_linear's ``"int_mm"``). Where the native library has
    an engine for this CPU: one C pass (``native.int8_mlp``, weights packed once into its tile layout
    and cached). Otherwise native (or
    reference) per-token codes, ``torch._int_mm`` against each ``qweight [N, K]`` transposed, float64 epilogue (native or
    eager, same arithmetic as ``int8_linear_ref``), then ReLU where ``relus`` says. Between two
    layers the epilogue writes the next layer's codes (``native.w8a8_epilogue_quant``; without the
    native library: the epilogue, then the quantize, the same math), so the float activations in
    between stay float32 and are never written: callers chain only float32 ``x``.
    ``quantized``: ``(codes int8 [M, K], scales float32 [M])`` contiguous, the first layer's input
    already quantized (``x`` is then None; the output is float32 ``[M, N]``)."""
    from hwaware.quant import native  # hwaware.quant imports hwaware.ops.packing: import at call time

    k, last = qweights[0].shape[1], len(qweights) - 1
    if quantized is not None:
        x2d = xf = None
        q, sx = quantized
        m, lead, dtype = q.shape[0], (q.shape[0],), torch.float32
    else:
        x2d = x.reshape(-1, k)
        m, lead, dtype = x2d.shape[0], tuple(x.shape[:-1]), x.dtype
    if m == 0:
        return torch.zeros((*lead, qweights[-1].shape[0]), dtype=dtype)
    dims = [k] + [qw.shape[0] for qw in qweights]
    if x2d is not None:
        xf = x2d.float().contiguous()
    if native.int8_engine() and min(dims) > 0:  # the same bits, on the engine, a block of rows at a time
        # keyed on the [N, K] weights the caller holds (a transposed view made per call would miss)
        out = native.int8_mlp(xf, [_CACHE.get((qw,), ("int8_pack",), lambda qw=qw: native.int8_pack(qw)) for qw in qweights],
                              dims, [s.contiguous() for s in w_scales],
                              [None if b is None else b.float().contiguous() for b in biases], relus, quantized,
                              check=False)  # _check_int8_mlp ran on the op's arguments; int8_pack made the rest
        if out is not None:
            return out.to(dtype).reshape(*lead, dims[-1])
    if quantized is None:
        qs = native.quant_tokens_i8(xf, out=_workspace("q", m * k, torch.int8).view(m, k))
        q, sx = qs if qs is not None else quantize_per_token_ref(xf)
    for i, (qw, w_scale, bias, relu) in enumerate(zip(qweights, w_scales, biases, relus)):
        n = qw.shape[0]
        # a [K, N] view: _int_mm takes it as fast as a copy here. At K = 1 the transpose of the
        # contiguous [N, 1] codes has strides (1, 1), which torch 2.13's _int_mm reads past the end
        # (garbage for N >= 2); the reshape is the same [1, N] with strides (N, 1).
        wt = qw.t() if qw.shape[1] > 1 else qw.reshape(1, n)
        acc = _workspace("acc", m * n, torch.int32).view(m, n)
        if _int_mm_exact_here():
            torch._int_mm(q, wt, out=acc)  # int32 [M, N], exact
        else:
            _int_mm_fp32(q, qw, acc)
        sw, b = w_scale.contiguous(), None if bias is None else bias.float().contiguous()
        if i < last:  # q is dead once _int_mm has read it: the next codes may reuse its buffer
            qs = native.w8a8_epilogue_quant(acc, sx, sw, b, relu, _workspace("q", m * n, torch.int8).view(m, n))
            if qs is not None:
                q, sx = qs
                continue
        out = native.w8a8_epilogue(acc, sx, sw, b, relu)
        if out is None:
            out = w8a8_epilogue_ref(acc, sx, sw, b).float()
            out = out.relu_() if relu else out
        if i == last:
            return out.to(dtype).reshape(*lead, n)
        q, sx = quantize_per_token_ref(out)
    raise AssertionError("unreachable")


# -- hwaware::int8_mlp: consecutive int_mm layers, the float activations between them never written --

def _check_int8_mlp(x: Tensor, qweights: Sequence[Tensor], w_scales: Sequence[Tensor],
                    biases: Sequence[Optional[Tensor]], relus: Sequence[bool]) -> None:
    if not (len(qweights) == len(w_scales) == len(biases) == len(relus)) or len(qweights) == 0:
        raise ValueError(f"int8_mlp needs one qweight, w_scale, bias (or None) and relu per layer and at least one "
                         f"layer, got {len(qweights)}, {len(w_scales)}, {len(biases)}, {len(relus)}")
    _check_int8_linear(x, qweights[0], w_scales[0], biases[0])
    _check_int8_k("qweights[0]", qweights[0].shape[1], "int_mm")
    for i in range(1, len(qweights)):
        qw, prev = qweights[i], qweights[i - 1]
        _dt(f"qweights[{i}]", qw, (torch.int8,), "[N, K] int8")
        if qw.dim() != 2 or qw.shape[1] != prev.shape[0]:
            raise ValueError(f"qweights[{i}] must be [N, K] with K = {prev.shape[0]} (layer {i - 1}'s outputs), "
                             f"got {list(qw.shape)}")
        _check_width(f"qweights[{i}]", qw.shape[0], qw.shape[1])  # every layer, as int8_linear's: no zero-width layer
        _check_int8_k(f"qweights[{i}]", qw.shape[1], "int_mm")
        _dt(f"w_scales[{i}]", w_scales[i], (torch.float32,), "[N] float32")
        _shape(f"w_scales[{i}]", w_scales[i], (qw.shape[0],), "[N]")
        _check_bias(biases[i], qw.shape[0])


@_define("int8_mlp(Tensor x, Tensor[] qweights, Tensor[] w_scales, Tensor?[] biases, bool[] relus) -> Tensor")
def int8_mlp(x: Tensor, qweights: List[Tensor], w_scales: List[Tensor], biases: List[Optional[Tensor]],
             relus: List[bool]) -> Tensor:
    """Consecutive W8A8 layers, each ``int8_linear(..., impl="int_mm", relu=relus[i])`` of the previous
    one's output, bit for bit (any float ``x``; bf16/fp16 run layer by layer). Between two layers
    the epilogue of the first writes the int8 codes and scales of the second's input directly
    (``native.w8a8_epilogue_quant``): the float activations between layers are never written and
    read back. The exported model runs a ``nn.Sequential``'s chain of ``int_mm`` layers this way
    (``deploy.Int8Chain``)."""
    _check_int8_mlp(x, qweights, w_scales, biases, relus)
    return _int8_mlp_checked(x, qweights, w_scales, biases, relus)


def _int8_mlp_checked(x: Tensor, qweights: Sequence[Tensor], w_scales: Sequence[Tensor],
                      biases: Sequence[Optional[Tensor]], relus: Sequence[bool]) -> Tensor:
    """:func:`int8_mlp` on arguments already checked."""
    # layer by layer: inputs other than float32 (each layer's output is rounded to x.dtype before
    # the next quantizes it)
    if x.dtype != torch.float32:
        for i in range(len(qweights)):
            x = _int_mm_layers(x, qweights[i:i + 1], w_scales[i:i + 1], biases[i:i + 1], relus[i:i + 1])
        return x
    return _int_mm_layers(x, qweights, w_scales, biases, relus)


@int8_mlp.register_fake
def _(x, qweights, w_scales, biases, relus):
    _check_int8_mlp(x, qweights, w_scales, biases, relus)
    return x.new_empty((*x.shape[:-1], qweights[-1].shape[0]))


@int8_mlp.register_kernel("cuda")
def _(x, qweights, w_scales, biases, relus):  # one int8_linear launch per layer
    _check_int8_mlp(x, qweights, w_scales, biases, relus)
    for qw, s, b, relu in zip(qweights, w_scales, biases, relus):
        x = torch.ops.hwaware.int8_linear.default(x, qw, s, b, "auto", relu)
    return x


# -- hwaware::int8_mlp_quantized: int8_mlp whose input arrives as per-token codes and scales ---------

def _check_int8_mlp_quantized(codes: Tensor, scales: Tensor, qweights: Sequence[Tensor], w_scales: Sequence[Tensor],
                              biases: Sequence[Optional[Tensor]], relus: Sequence[bool]) -> None:
    _dt("codes", codes, (torch.int8,), "[M, K] int8 per-token codes")
    _dt("scales", scales, (torch.float32,), "[M] float32 per-token scales")
    if codes.dim() != 2 or scales.shape != codes.shape[:1] or scales.device != codes.device:
        raise ValueError(f"codes must be [M, K] and scales [M] on one device, got {list(codes.shape)} on {codes.device} "
                         f"and {list(scales.shape)} on {scales.device}")
    if len(qweights) and qweights[0].dim() == 2 and codes.shape[1] != qweights[0].shape[1]:
        raise ValueError(f"codes must be [M, K] with K = qweights[0].shape[1] = {qweights[0].shape[1]}, "
                         f"got {list(codes.shape)}")
    # the layers' own checks, on an empty float input of codes' width
    _check_int8_mlp(codes.new_empty((0, codes.shape[1]), dtype=torch.float32), qweights, w_scales, biases, relus)


@_define("int8_mlp_quantized(Tensor codes, Tensor scales, Tensor[] qweights, Tensor[] w_scales, Tensor?[] biases, "
         "bool[] relus) -> Tensor")
def int8_mlp_quantized(codes: Tensor, scales: Tensor, qweights: List[Tensor], w_scales: List[Tensor],
                       biases: List[Optional[Tensor]], relus: List[bool]) -> Tensor:
    """:func:`int8_mlp` of a float32 ``x`` given as its per-token int8 quantization, ``(codes, scales)
    = quantize_per_token_ref(x)``: bit for bit ``int8_mlp(x, ...)`` whenever the codes are those of
    ``x`` (a NaN scale makes its row NaN, as a NaN or inf in ``x`` does). Float32 ``[M, N]``. The
    producer quantizes while it writes (``dot_interaction_int8``), so the float ``x`` never exists."""
    _check_int8_mlp_quantized(codes, scales, qweights, w_scales, biases, relus)
    return _int_mm_layers(None, qweights, w_scales, biases, relus, quantized=(codes.contiguous(), scales.contiguous()))


def _int8_mlp_quantized_any(codes, scales, qweights, w_scales, biases, relus):
    """The reference math on any device: the first layer as ``int8_linear_ref`` does it after its
    quantize (exact float64 product, float64 epilogue), the rest ``int8_linear_ref`` layer by layer."""
    _check_int8_mlp_quantized(codes, scales, qweights, w_scales, biases, relus)
    out = w8a8_epilogue_ref(codes.double() @ qweights[0].double().t(), scales, w_scales[0], biases[0]).float()
    out = out.relu_() if relus[0] else out
    for qw, s, b, relu in zip(qweights[1:], w_scales[1:], biases[1:], relus[1:]):
        out = int8_linear_ref(out, qw, s, b)
        out = out.relu_() if relu else out
    return out


@int8_mlp_quantized.register_fake
def _(codes, scales, qweights, w_scales, biases, relus):
    _check_int8_mlp_quantized(codes, scales, qweights, w_scales, biases, relus)
    return codes.new_empty((codes.shape[0], qweights[-1].shape[0]), dtype=torch.float32)


int8_mlp_quantized.register_kernel("cuda")(_int8_mlp_quantized_any)


# -- hwaware::int8_mlp24 / int8_mlp24_quantized: int8_mlp whose layers may be 2:4 compressed ---------
# A 2:4 layer with int8 values serves int8_linear's int_mm math on its decompressed codes (sparse24_linear
# kernel "dense"), so a run of such layers and plain int8 ones is an int8_mlp over those codes. These
# take each layer in the form the artifact stores it (``metas[i]`` None: ``qweights[i]`` is the [N, K]
# codes; otherwise it is the [N, K/2] 2:4 values and ``metas[i]`` their positions), so an exported
# program holds the compressed weights; the codes are decompressed once per weight (cached, the same
# entry sparse24_linear's "dense" kernel uses). Separate ops: int8_mlp's schema stays as programs
# exported before these recorded it.

def _mlp24_shapes(qweights: Sequence[Tensor], metas: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """Validate the 2:4 layers' values and metadata; return every layer's [N, K] int8 codes as a
    meta-device placeholder (for :func:`_check_int8_mlp`'s shape and dtype checks)."""
    if len(metas) != len(qweights):
        raise ValueError(f"int8_mlp24 needs one meta (or None) per layer, got {len(metas)} metas for "
                         f"{len(qweights)} qweights")
    shapes = []
    for i, (qw, meta) in enumerate(zip(qweights, metas)):
        if meta is None:
            shapes.append(qw)
            continue
        _dt(f"qweights[{i}]", qw, (torch.int8,), "[N, K/2] int8 2:4 values (metas[i] given)")
        if qw.dim() != 2:
            raise ValueError(f"qweights[{i}] must be 2-D [N, K/2] 2:4 values, got shape {list(qw.shape)}")
        n, k = qw.shape[0], 2 * qw.shape[1]
        _check_width(f"qweights[{i}]", n, k)
        if k % 4:
            raise ValueError(f"qweights[{i}] must have shape [N, K/2] with K a multiple of 4, got {list(qw.shape)} (K={k})")
        _dt(f"metas[{i}]", meta, (torch.uint8,), "[N, ceil(K/8)] uint8 (2:4 metadata)")
        _shape(f"metas[{i}]", meta, (n, (k // 4 + 1) // 2), "[N, ceil(K/8)]")
        shapes.append(torch.empty((n, k), dtype=torch.int8, device="meta"))
    return shapes


def _mlp24_codes(qweights: Sequence[Tensor], metas: Sequence[Optional[Tensor]]) -> List[Tensor]:
    return [qw if meta is None else _CACHE.get((qw, meta), ("sparse24_int8_codes",),
                                               lambda qw=qw, meta=meta: decompress_24(qw, meta, 2 * qw.shape[1]))
            for qw, meta in zip(qweights, metas)]


@_define("int8_mlp24(Tensor x, Tensor[] qweights, Tensor?[] metas, Tensor[] w_scales, Tensor?[] biases, "
         "bool[] relus) -> Tensor")
def int8_mlp24(x: Tensor, qweights: List[Tensor], metas: List[Optional[Tensor]], w_scales: List[Tensor],
               biases: List[Optional[Tensor]], relus: List[bool]) -> Tensor:
    """:func:`int8_mlp` over layers of which some are 2:4 compressed (``metas[i]`` given: ``qweights[i]``
    holds the int8 2:4 values): bit for bit ``int8_mlp`` of the decompressed codes, and so each 2:4
    layer ``sparse24_linear(..., kernel="dense")`` of the previous output (with ``torch.relu`` where
    ``relus`` says)."""
    _check_int8_mlp(x, _mlp24_shapes(qweights, metas), w_scales, biases, relus)
    return _int8_mlp_checked(x, _mlp24_codes(qweights, metas), w_scales, biases, relus)


@int8_mlp24.register_fake
def _(x, qweights, metas, w_scales, biases, relus):
    shapes = _mlp24_shapes(qweights, metas)
    _check_int8_mlp(x, shapes, w_scales, biases, relus)
    return x.new_empty((*x.shape[:-1], shapes[-1].shape[0]))


@int8_mlp24.register_kernel("cuda")
def _(x, qweights, metas, w_scales, biases, relus):  # the codes decompressed once, then int8_mlp's launches
    _check_int8_mlp(x, _mlp24_shapes(qweights, metas), w_scales, biases, relus)
    return torch.ops.hwaware.int8_mlp.default(x, _mlp24_codes(qweights, metas), w_scales, biases, relus)


@_define("int8_mlp24_quantized(Tensor codes, Tensor scales, Tensor[] qweights, Tensor?[] metas, Tensor[] w_scales, "
         "Tensor?[] biases, bool[] relus) -> Tensor")
def int8_mlp24_quantized(codes: Tensor, scales: Tensor, qweights: List[Tensor], metas: List[Optional[Tensor]],
                         w_scales: List[Tensor], biases: List[Optional[Tensor]], relus: List[bool]) -> Tensor:
    """:func:`int8_mlp_quantized` over layers of which some are 2:4 compressed (as :func:`int8_mlp24`)."""
    _check_int8_mlp_quantized(codes, scales, _mlp24_shapes(qweights, metas), w_scales, biases, relus)
    return _int_mm_layers(None, _mlp24_codes(qweights, metas), w_scales, biases, relus,
                          quantized=(codes.contiguous(), scales.contiguous()))


@int8_mlp24_quantized.register_fake
def _(codes, scales, qweights, metas, w_scales, biases, relus):
    shapes = _mlp24_shapes(qweights, metas)
    _check_int8_mlp_quantized(codes, scales, shapes, w_scales, biases, relus)
    return codes.new_empty((codes.shape[0], shapes[-1].shape[0]), dtype=torch.float32)


@int8_mlp24_quantized.register_kernel("cuda")
def _(codes, scales, qweights, metas, w_scales, biases, relus):
    return _int8_mlp_quantized_any(codes, scales, _mlp24_codes(qweights, metas), w_scales, biases, relus)


def _int8_dequantized(qweight: Tensor, w_scale: Tensor) -> Tensor:
    """The int8 weight as float32 (``qweight * w_scale`` per row), built once per weight (cached):
    what ``int8_linear``'s ``dequant`` multiplies on every device."""
    return _CACHE.get((qweight, w_scale), ("int8_dequant",), lambda: qweight.float() * w_scale[:, None])


def _linear_fp32(x: Tensor, w: Tensor, bias: Optional[Tensor], relu: bool = False) -> Tensor:
    """``F.linear`` in float32 on a float32 weight derived once from packed storage (dequantized int8
    or int4 codes, decompressed 2:4 values), ReLU applied in place when ``relu``, back in ``x``'s dtype."""
    if x.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):  # (no conversions: no calls)
        out = F.linear(x, w, bias)
        return out.relu_() if relu else out
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return (out.relu_() if relu else out).to(x.dtype)


def _int8_linear_prepacked(x: Tensor, packed, n: int, bias: Optional[Tensor], dense: Callable[[], Tensor]) -> Tensor:
    """fbgemm's dynamic linear on per-token pre-scaled rows. A row holding NaN or inf (fbgemm would
    quantize it to finite codes and return finite numbers) is computed in float32 on the
    dequantized weight ``dense()`` instead, so it comes out as the float math has it."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k).float()
    if x2d.shape[0] == 0:
        return x.new_zeros((*x.shape[:-1], n))
    # max|x| per row as max(amax, -amin): two reductions, no |x| temporary (faster than abs().amax here)
    a = torch.maximum(x2d.amax(dim=1, keepdim=True), x2d.amin(dim=1, keepdim=True).neg_())
    # a is NaN / inf exactly where the row has one; one sum tells (an overflow to inf only sends
    # the batch down the exact path below for nothing)
    any_bad = not math.isfinite(float(a.sum()))
    bad = ~torch.isfinite(a.squeeze(1)) if any_bad else None
    a = torch.where(a > 0, a, torch.ones_like(a))  # all-zero rows stay zero
    xs = x2d / a
    if any_bad:  # zeroed: fbgemm's per-tensor range would take them in and move every other row's codes
        xs[bad] = 0.0
    y = torch.ops.quantized.linear_dynamic(xs, packed, REDUCE_RANGE)
    y.mul_(a)
    if bias is not None:
        y.add_(bias.float())
    if any_bad:
        rows = bad.nonzero().squeeze(1)
        y[rows] = F.linear(x2d[rows], dense(), None if bias is None else bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@int8_linear.register_fake
def _(x, qweight, w_scale, bias, impl="auto", relu=False):
    _check_int8_linear(x, qweight, w_scale, bias)
    _check_int8_kernel(impl, x.device.type, qweight.shape[1])  # a typo fails at tracing (torch.export, compile), not when run
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# -- hwaware::int4_linear -----------------------------------------------------------------------

@_define('int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, SymInt group_size, Tensor? bias) -> Tensor')
def int4_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                bias: Optional[Tensor]) -> Tensor:
    """Weight-only int4 linear, CPU: the weight is dequantized once to fp32 (cached), then F.linear.

    No int4 CPU kernel here beats that: ``aten._weight_int4pack_mm_for_cpu`` was much slower than
    fp32 on the CPUs this was developed on.
    """
    _check_int4_linear(x, packed, scales, zeros, group_size, bias)
    w = _CACHE.get((packed, scales, zeros), ("int4_linear", group_size),
                   lambda: _dequantize_int4_checked(packed, scales, zeros, group_size))
    return _linear_fp32(x, w, bias)


def _check_int4_values(scales: Tensor, zeros: Optional[Tensor]) -> None:
    """The value checks of an int4 weight a shape check cannot make (both devices, once per weight)."""
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        bad = (~(torch.isfinite(scales) & (scales > 0))).nonzero()[0].tolist()
        raise ValueError(f"scales must be finite and > 0, got {float(scales[tuple(bad)])} at {bad}")
    if zeros is not None and zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > 15):
        raise ValueError(f"zeros must lie in [0, 15] (4-bit zero points), got values in [{int(zeros.min())}, {int(zeros.max())}]")


def _dequantize_int4_checked(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int) -> Tensor:
    """:func:`dequantize_int4_weight` after :func:`_check_int4_values` (once per weight: the result
    is cached)."""
    _check_int4_values(scales, zeros)
    return dequantize_int4_weight(packed, scales, zeros, group_size)


@int4_linear.register_fake
def _(x, packed, scales, zeros, group_size, bias):
    _check_int4_linear(x, packed, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# -- hwaware::embedding_bag_rowwise ---------------------------------------------------------------

def _check_index_values(weight: Tensor, indices: Tensor, offsets: Tensor, include_last_offset: bool) -> None:
    # fbgemm reads out of bounds rather than raising, so check the values: one C pass, else numpy
    # (cheaper than torch's reductions on small CPU tensors); benchmarks/bench_ops_cpu.py times the C check
    from hwaware.quant import native  # hwaware.quant imports hwaware.ops.packing: import at call time

    n, rows = indices.numel(), weight.shape[0]
    checked = native.check_bags(indices, offsets, rows, include_last_offset)
    if checked is None:
        rule, a, b = 0, 0, 0
        if n:
            idx = indices.numpy()
            a, b = int(idx.min()), int(idx.max())
            rule = 1 if a < 0 or b >= rows else 0
        if not rule and offsets.numel():
            off = offsets.numpy()
            a, b = int(off[0]), int(off[-1])
            if a != 0 or b > n or (off.size > 1 and bool((off[1:] < off[:-1]).any())):
                rule = 2
            elif include_last_offset and b != n:
                rule = 3
        checked = rule, a, b
    rule, a, b = checked  # rules of hwaware/quant/_native/bags.c
    if rule == 1:  # (the error path: find the first offender for the message)
        flat = indices.reshape(-1)
        at = int(((flat < 0) | (flat >= rows)).nonzero()[0, 0])
        raise IndexError(f"indices must lie in [0, {rows}) (rows of the table), got {int(flat[at])} at position {at} "
                         f"(the batch's ids span [{a}, {b}])")
    if rule == 2:
        raise ValueError(f"offsets must start at 0, be non-decreasing and not exceed len(indices)={n}, "
                         f"got first={a}, last={b}")
    if rule == 3:
        raise ValueError(f"with include_last_offset=True the last offset must equal len(indices)={n}, got {b}: ids after "
                         "it would be in no bag (torch's float embedding_bag is inconsistent there: sum drops them, mean "
                         "counts them, max reads them; its quantized row-wise ops refuse it, as this op does)")


@_define('embedding_bag_rowwise(Tensor weight, SymInt bits, SymInt dim, Tensor indices, Tensor offsets, SymInt mode, Tensor? per_sample_weights, bool include_last_offset) -> Tensor')
def embedding_bag_rowwise(weight: Tensor, bits: int, dim: int, indices: Tensor, offsets: Tensor, mode: int,
                          per_sample_weights: Optional[Tensor], include_last_offset: bool) -> Tensor:
    """Row-wise quantized embedding bag, CPU: fbgemm ``quantized::embedding_bag_{byte,4bit}_rowwise_offsets``.

    Those kernels ignore their ``mode`` argument and always sum (measured, torch 2.13), so mean is
    their sum divided by the bag sizes, and max dequantizes only the gathered rows (fbgemm
    ``embedding_bag_{byte,4bit}_unpack``) and reduces them with ``F.embedding_bag``. (A C bag kernel
    of our own, bounds check included, measured no faster than this fbgemm call plus the C check
    at 2048 single-row bags of dim 16, so fbgemm stays. What the C pass does win is doing many tables
    in one call: ``embedding_bags_rowwise``.)
    """
    _check_embedding_bag(weight, bits, dim, indices, offsets, mode, per_sample_weights, include_last_offset)
    indices, offsets = _index_dtypes(indices, offsets)
    weight, indices, offsets = weight.contiguous(), indices.contiguous(), offsets.contiguous()
    if per_sample_weights is not None:  # fbgemm reads it as a dense [L] buffer: a strided or expanded view is not one
        per_sample_weights = per_sample_weights.contiguous()
    _check_index_values(weight, indices, offsets, include_last_offset)
    if offsets.shape[0] == (1 if include_last_offset else 0):  # no bags: [0, dim], as the fake says (torch's
        return torch.zeros((0, dim), dtype=torch.float32)  # max embedding_bag crashes on empty offsets with ids)
    if mode == 2:
        unpack = (torch.ops.quantized.embedding_bag_byte_unpack if bits == 8
                  else torch.ops.quantized.embedding_bag_4bit_unpack)
        rows = unpack(weight.index_select(0, indices))[:, :dim]  # float32 [L, dim]
        positions = torch.arange(indices.numel(), dtype=indices.dtype)
        return F.embedding_bag(positions, rows, offsets, mode="max", include_last_offset=include_last_offset)
    fn = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if bits == 8
          else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
    out = fn(weight, indices, offsets, False, 0, False, per_sample_weights, None, include_last_offset)
    if out.shape[1] != dim:  # 4-bit odd dim: fbgemm sees the padding nibble as one more column
        out = out[:, :dim].contiguous()
    if mode == 1:
        b = out.shape[0]
        ends = offsets[1:b + 1] if include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([indices.numel()])])
        counts = (ends - offsets[:b]).clamp_min(1).to(out.dtype)  # empty bags stay 0, as F.embedding_bag
        out.div_(counts[:, None])
    return out


@embedding_bag_rowwise.register_fake
def _(weight, bits, dim, indices, offsets, mode, per_sample_weights, include_last_offset):
    _check_embedding_bag(weight, bits, dim, indices, offsets, mode, per_sample_weights, include_last_offset)
    b = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    return weight.new_empty((b, dim), dtype=torch.float32)


# -- hwaware::embedding_bags_rowwise (table-batched) ------------------------------------------------

def _check_embedding_bags(weights: Sequence[Tensor], bits: Sequence[int], dim: int, indices: Tensor, offsets: Tensor,
                          mode: int) -> None:
    if mode not in (0, 1):
        raise ValueError(f"mode={mode} is not supported by the table-batched op; expected 0 (sum) or 1 (mean) "
                         "(max: embedding_bag_rowwise per table)")
    _check_tables(weights, bits, dim, indices)
    _dt("offsets", offsets, (torch.int64, torch.int32), "[B] int (bag starts, shared by every table)")
    if offsets.dim() != 1:
        raise ValueError(f"offsets must be 1-D [B], got shape {list(offsets.shape)}")
    if offsets.device != indices.device:
        raise ValueError(f"offsets are on {offsets.device} but indices are on {indices.device}")


def _check_tables(weights: Sequence[Tensor], bits: Sequence[int], dim: int, indices: Tensor) -> None:
    """T row-wise tables of width ``dim`` and their ``[T, N]`` ids (embedding_bags_rowwise's table arguments)."""
    if len(weights) == 0:
        raise ValueError("weights must hold at least one row-wise table, got an empty list")
    if len(bits) != len(weights):
        raise ValueError(f"bits must give one width per table: {len(weights)} weights, got {len(bits)} bits {list(bits)}")
    if dim < 1:
        raise ValueError(f"dim={dim} must be >= 1")
    _dt("indices", indices, (torch.int64, torch.int32), "[T, N] int64 or int32")
    if indices.dim() != 2 or indices.shape[0] != len(weights):
        raise ValueError(f"indices must be 2-D [T, N] with T = len(weights) = {len(weights)} (row t: table t's ids), "
                         f"got shape {list(indices.shape)}")
    cols = {8: rowwise_cols(dim, 8), 4: rowwise_cols(dim, 4)}
    device, uint8 = indices.device, torch.uint8
    for t, (w, b) in enumerate(zip(weights, bits)):  # one cheap test per table; the message only on failure
        if b in cols and w.dtype == uint8 and w.dim() == 2 and w.shape[1] == cols[b] and w.device == device:
            continue
        if b not in cols:
            raise ValueError(f"bits[{t}]={b} is not supported; expected 4 or 8")
        _dt(f"weights[{t}]", w, (uint8,), "[R, cols] uint8 (FBGEMM row-wise)")
        if w.dim() != 2 or w.shape[1] != cols[b]:
            raise ValueError(f"weights[{t}] must have shape [R, {cols[b]}] for a {b}-bit row-wise table of dim={dim}, "
                             f"got {list(w.shape)}")
        raise ValueError(f"weights[{t}] is on {w.device} but indices are on {device}")


def _embedding_bags_per_table(weights: List[Tensor], bits: List[int], dim: int, indices: Tensor, offsets: Tensor,
                              mode: int) -> Tensor:
    """The table-batched op as T calls of ``embedding_bag_rowwise`` (no native library; CUDA)."""
    outs = [torch.ops.hwaware.embedding_bag_rowwise.default(w, b, dim, indices[t].contiguous(), offsets, mode, None, False)
            for t, (w, b) in enumerate(zip(weights, bits))]
    return torch.stack(outs)


@_define("embedding_bags_rowwise(Tensor[] weights, int[] bits, SymInt dim, Tensor indices, Tensor offsets, SymInt mode) -> Tensor")
def embedding_bags_rowwise(weights: List[Tensor], bits: List[int], dim: int, indices: Tensor, offsets: Tensor,
                           mode: int) -> Tensor:
    """T row-wise tables looked up in one call: ``out[t] = embedding_bag_rowwise(weights[t], bits[t], dim,
    indices[t], offsets, mode)``, stacked ``[T, B, dim]`` float32, bit for bit (CPU: one C pass,
    ``hwaware/quant/_native/bags.c``, table-major, threads over (table, run of bags)).

    A CTR model looks up every table per batch; as T calls each one paid the dispatcher, the
    argument checks and a bounds pass (~30 us a call against ~15 us of lookup at 2048 single-id
    bags of dim 16; benchmarks/bench_ops_cpu.py, "embedding"). ``indices`` ``[T, N]`` may be a
    strided view (e.g. ``sparse.t()`` of a ``[B, T]`` batch); ``offsets`` ``[B]`` are shared by
    every table (bag b: ids ``offsets[b]`` up to the next offset, the last up to N).
    """
    from hwaware.quant import native  # hwaware.quant imports hwaware.ops.packing: import at call time

    _check_embedding_bags(weights, bits, dim, indices, offsets, mode)
    indices, offsets = _index_dtypes(indices, offsets)
    if not all(w.is_contiguous() for w in weights):
        weights = [w.contiguous() for w in weights]
    offsets = offsets.contiguous()
    done = native.rowwise_bags(weights, bits, dim, indices, offsets, mode == 1)
    if done is None:
        out, (rule, a, b) = None, _bags_values_rule(weights, indices, offsets)
    else:
        out, (rule, a, b) = done  # rules of hw_rowwise_bags
    if rule == 1:
        raise IndexError(f"indices[{a}] must lie in [0, {weights[a].shape[0]}) (rows of weights[{a}]), got {b}")
    if rule == 2:
        raise ValueError(f"offsets must start at 0, be non-decreasing and not exceed N={indices.shape[1]}, "
                         f"got first={a}, last={b}")
    return out if out is not None else _embedding_bags_per_table(weights, bits, dim, indices, offsets, mode)


def _bags_values_rule(weights: List[Tensor], indices: Tensor, offsets: Tensor) -> tuple:
    """``hw_rowwise_bags``' checks in torch (the no-native path): ``(rule, a, b)``, rule 0 when valid."""
    if offsets.numel():
        first, last = int(offsets[0]), int(offsets[-1])
        if first != 0 or last > indices.shape[1] or bool((offsets[1:] < offsets[:-1]).any()):
            return 2, first, last
    for t, w in enumerate(weights):
        bad = ((indices[t] < 0) | (indices[t] >= w.shape[0])).nonzero()
        if bad.numel():
            return 1, t, int(indices[t, bad[0, 0]])
    return 0, 0, 0


@embedding_bags_rowwise.register_fake
def _(weights, bits, dim, indices, offsets, mode):
    _check_embedding_bags(weights, bits, dim, indices, offsets, mode)
    return indices.new_empty((len(weights), offsets.shape[0], dim), dtype=torch.float32)


@embedding_bags_rowwise.register_kernel("cuda")
def _(weights, bits, dim, indices, offsets, mode):  # T launches of the row-wise Triton kernel
    _check_embedding_bags(weights, bits, dim, indices, offsets, mode)
    indices, offsets = _index_dtypes(indices, offsets)
    return _embedding_bags_per_table(weights, bits, dim, indices, offsets, mode)


# -- hwaware::sparse24_linear --------------------------------------------------------------------

# Implementations by device. CPU (measured by benchmarks/bench_sparsity_recsys.py; no 2:4 kernel here
# beats dense, so "dense" is what export picks on CPU, and the artifact says so):
#   "dense": decompress once (cached) to the dense weight, then F.linear (float values) or
#            int8_linear's exact "int_mm" path (int8 values) -- same math as the layer, at dense speed.
#   "fbgemm": int8 values only: int8_linear's "fbgemm" path on the decompressed codes (fast on AVX2).
#   "dequant": int8 values only: int8_linear's "dequant" path (codes x scales once, cached, then fp32
#            F.linear on unquantized activations) on the decompressed codes: for tiny layers.
#   "csr":   torch.sparse CSR matmul over the non-zeros (float values only): 2-12x slower than
#            dense at M=1..2048, K,N=256..4096 on this CPU, kept as a measured candidate.
# CUDA implementations: hwaware/ops/_cuda.py adds SPARSE24_KERNELS["cuda"] and says what each is.
SPARSE24_KERNELS = {"cpu": ("dense", "csr", "fbgemm", "dequant")}


def _check_sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, w_scale: Optional[Tensor], bias: Optional[Tensor],
                           kernel: str) -> None:
    _dt("x", x, _FLOAT_X, "[..., K] float")
    _dt("values", values, _FLOAT_X + (torch.int8,), "[N, K/2] float or int8")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [N, K/2], got shape {list(values.shape)}")
    n, k = values.shape[0], 2 * values.shape[1]
    _check_width("values", n, k)
    if k % 4:
        raise ValueError(f"values must have shape [N, K/2] with K a multiple of 4, got {list(values.shape)} (K={k})")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K] with K = 2 * values.shape[1] = {k}, got {list(x.shape)}")
    _dt("meta", meta, (torch.uint8,), "[N, ceil(K/8)] uint8 (2:4 metadata)")
    _shape("meta", meta, (n, (k // 4 + 1) // 2), "[N, ceil(K/8)]")
    if values.dtype == torch.int8:
        if w_scale is None:
            raise ValueError("int8 values need w_scale (float32 [N] per-channel scales); got None")
        _dt("w_scale", w_scale, (torch.float32,), "[N] float32")
        _shape("w_scale", w_scale, (n,), "[N]")
        if kernel in ("dense", "fbgemm", "triton"):  # the int8 products summed in int32 (CPU and CUDA)
            _check_int8_k("values", k, kernel, "kernel")
    elif w_scale is not None:
        raise ValueError(f"w_scale is only for int8 values; values are {values.dtype}")
    _check_bias(bias, n)
    if not isinstance(kernel, str) or not kernel:
        raise ValueError(f"kernel must be a non-empty implementation name, got {kernel!r}")


def _to_csr(w: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return w.to_sparse_csr()


def _check_sparse24_kernel(kernel: str, device: str) -> None:
    if device not in SPARSE24_KERNELS:  # a fake / meta call: any device's implementation passes
        known = sorted({k for kernels in SPARSE24_KERNELS.values() for k in kernels})
        if kernel not in known:
            raise ValueError(f"kernel={kernel!r} is not an implementation of hwaware::sparse24_linear on any device; "
                             f"expected one of {known}")
        return
    if kernel not in SPARSE24_KERNELS[device]:
        raise ValueError(f"kernel={kernel!r} is not a {device.upper()} implementation of hwaware::sparse24_linear; "
                         f"expected one of {SPARSE24_KERNELS[device]}")


@_define('sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? w_scale, Tensor? bias, str kernel) -> Tensor')
def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, w_scale: Optional[Tensor], bias: Optional[Tensor],
                    kernel: str) -> Tensor:
    """2:4 compressed linear, CPU; ``kernel`` in ``SPARSE24_KERNELS["cpu"]`` (see there)."""
    _check_sparse24_linear(x, values, meta, w_scale, bias, kernel)
    _check_sparse24_kernel(kernel, "cpu")
    n, k = values.shape[0], 2 * values.shape[1]
    if values.dtype == torch.int8:
        def dense() -> Tensor:  # the int8 codes dequantized once: "dequant", and fbgemm's non-finite rows
            return _CACHE.get((values, meta, w_scale), ("sparse24_int8_dequant",),
                              lambda: decompress_24(values, meta, k).float() * w_scale[:, None])

        if kernel == "dense":  # int8_linear's exact "int_mm" math on the decompressed codes
            w = _CACHE.get((values, meta), ("sparse24_int8_codes",), lambda: decompress_24(values, meta, k))
            return _int_mm_layers(x, [w], [w_scale], [bias], [False])
        if kernel == "fbgemm":  # int8_linear's "fbgemm" implementation on the decompressed codes
            packed = _CACHE.get((values, meta, w_scale), ("sparse24_int8",),
                                lambda: _prepack_int8(decompress_24(values, meta, k), w_scale))
            return _int8_linear_prepacked(x, packed, n, bias, dense)
        if kernel == "dequant":  # int8_linear's "dequant" implementation on the decompressed codes
            return _linear_fp32(x, dense(), bias)
        raise ValueError(f"kernel={kernel!r} has no int8 form on CPU; int8 2:4 layers run kernel='dense', 'fbgemm' "
                         "or 'dequant'")
    if kernel in ("fbgemm", "dequant"):
        raise ValueError(f"kernel={kernel!r} is for int8 values; float 2:4 layers run kernel='dense' or 'csr'")
    if kernel == "csr":
        w = _CACHE.get((values, meta), ("sparse24_csr",), lambda: _to_csr(decompress_24(values, meta, k).float()))
        x2d = x.reshape(-1, k).float()
        out = torch.sparse.mm(w, x2d.t()).t()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype).contiguous().reshape(*x.shape[:-1], n)
    w = _CACHE.get((values, meta), ("sparse24_dense",), lambda: decompress_24(values, meta, k).float())
    return _linear_fp32(x, w, bias)


@sparse24_linear.register_fake
def _(x, values, meta, w_scale, bias, kernel):
    _check_sparse24_linear(x, values, meta, w_scale, bias, kernel)
    _check_sparse24_kernel(kernel, x.device.type)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


# -- hwaware::dot_interaction ----------------------------------------------------------------------
# Not a deploy op: DLRM's feature interaction, used in training (it has a backward) and inference
# alike, so the FP32 model and the exported one run the same code. CPU, float32: one C pass per
# sample (hwaware/quant/_native/interact.c); other dtypes and devices, or without the native
# library: the torch ops of dot_interaction_ref (stack, bmm, index_select, cat). At batch 2048,
# 27 vectors of 16 (the recipe's DLRM) that chain took about a third of a whole FP32 forward
# (benchmarks/bench_ops_cpu.py "interaction" against bench_export_recsys.py's FP32 latency).

_INTERACTION_DTYPES = _FLOAT_X + (torch.float64,)


def _check_dot_interaction(vectors: Sequence[Tensor], pad: int) -> None:
    if len(vectors) == 0:
        raise ValueError("vectors must hold at least one [B, D] tensor (x first), got an empty list")
    x = vectors[0]
    if x.dim() != 2:
        raise ValueError(f"vectors[0] must be 2-D [B, D], got shape {list(x.shape)}")
    dtype, device, shape = x.dtype, x.device, x.shape
    if (dtype in _INTERACTION_DTYPES and pad >= 0 and shape[1] >= 1
            and all(v.dtype == dtype and v.device == device and v.shape == shape for v in vectors)):
        return  # one cheap test per vector (a model passes ~27 per call); the messages below only on failure
    for i, v in enumerate(vectors):
        _dt(f"vectors[{i}]", v, _INTERACTION_DTYPES, "[B, D] float")
        if v.dtype != x.dtype or v.device != x.device:
            raise TypeError(f"vectors[{i}] is {v.dtype} on {v.device}; every vector must match vectors[0] "
                            f"({x.dtype} on {x.device})")
        if v.dim() != 2 or v.shape[0] != x.shape[0] or v.shape[1] != x.shape[1]:
            raise ValueError(f"vectors[{i}] must have vectors[0]'s shape [B, D] = {list(x.shape)}, got {list(v.shape)}")
    if x.shape[1] < 1:  # as _check_tables' dim: a zero-width vector is no embedding (and the C pass takes no empty rows)
        raise ValueError(f"vectors must be [B, D] with D >= 1, got D = {x.shape[1]} (shape {list(x.shape)})")
    if pad < 0:
        raise ValueError(f"pad={pad} must be >= 0 (zero columns appended to the output)")


def _dot_interaction_cpu(vectors: List[Tensor], pad: int) -> Tensor:
    from hwaware.quant import native  # hwaware.quant imports hwaware.ops.packing: import at call time

    _check_dot_interaction(vectors, pad)
    if not all(v.is_contiguous() for v in vectors):
        vectors = [v.contiguous() for v in vectors]
    out = native.dot_interaction(vectors, pad)
    return out if out is not None else dot_interaction_ref(vectors, pad)


def _dot_interaction_any(vectors: List[Tensor], pad: int) -> Tensor:
    _check_dot_interaction(vectors, pad)
    return dot_interaction_ref(vectors, pad)


def _dot_interaction_fake(vectors: List[Tensor], pad: int) -> Tensor:
    _check_dot_interaction(vectors, pad)
    nvec, (batch, dim) = len(vectors), vectors[0].shape
    return vectors[0].new_empty((batch, dim + nvec * (nvec - 1) // 2 + pad))


def _check_dot_interaction_backward(grad: Tensor, vectors: List[Tensor], pad: int) -> None:
    _check_dot_interaction(vectors, pad)
    nvec, (batch, dim) = len(vectors), vectors[0].shape
    width = dim + nvec * (nvec - 1) // 2 + pad
    if grad.dtype != vectors[0].dtype or grad.device != vectors[0].device or tuple(grad.shape) != (batch, width):
        raise ValueError(f"grad must be {vectors[0].dtype} [B, D + V(V-1)/2 + pad] = {[batch, width]} on "
                         f"{vectors[0].device}, got {grad.dtype} {list(grad.shape)} on {grad.device}")


def _dot_interaction_backward_cpu(grad: Tensor, vectors: List[Tensor], pad: int) -> List[Tensor]:
    from hwaware.quant import native

    _check_dot_interaction_backward(grad, vectors, pad)
    if not all(v.is_contiguous() for v in vectors):
        vectors = [v.contiguous() for v in vectors]
    grads = native.dot_interaction_backward(grad.contiguous(), vectors, pad)
    return grads if grads is not None else dot_interaction_backward_ref(grad, vectors, pad)


def _dot_interaction_backward_autograd(keyset, grad: Tensor, vectors: List[Tensor], pad: int) -> List[Tensor]:
    if torch.is_grad_enabled() and (grad.requires_grad or any(v.requires_grad for v in vectors)):
        raise RuntimeError("hwaware::dot_interaction has no double backward (backward with create_graph=True)")
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.hwaware.dot_interaction_backward.default.redispatch(keyset & _AFTER_AUTOGRAD, grad, vectors, pad)


# pad has no default: the dispatcher drops arguments equal to their default before the autograd
# kernel sees them, and the backward must return one gradient per argument it saw
_LIB.define("dot_interaction(Tensor[] vectors, SymInt pad) -> Tensor")
_LIB.impl("dot_interaction", _dot_interaction_cpu, "CPU")
_LIB.impl("dot_interaction", _dot_interaction_any, "CompositeExplicitAutograd")  # CUDA and the rest: torch ops
torch.library.register_fake("hwaware::dot_interaction", _dot_interaction_fake, lib=_LIB)
@_define("dot_interaction_int8(Tensor[] vectors, SymInt pad) -> (Tensor, Tensor)")
def dot_interaction_int8(vectors: List[Tensor], pad: int) -> Tuple[Tensor, Tensor]:
    """``quantize_per_token_ref(dot_interaction(vectors, pad))``: the interaction's rows as the int8
    codes and scales the top MLP's first int8 layer would quantize them to, without writing them as
    floats (a deploy op: no backward; feed it to :func:`int8_mlp_quantized`). Bit for bit those two
    ops in turn for rows without NaN or inf (such a row gets a NaN scale either way). CPU float32
    with AVX-512: one C pass (``native.dot_interaction_int8``); otherwise the float rows, then the
    quantize."""
    from hwaware.quant import native

    _check_dot_interaction(vectors, pad)
    if not all(v.is_contiguous() for v in vectors):
        vectors = [v.contiguous() for v in vectors]
    got = native.dot_interaction_int8(vectors, pad)
    if got is not None:
        return got
    z = _dot_interaction_cpu(vectors, pad).float()
    qs = native.quant_tokens_i8(z) if z.numel() else None
    return qs if qs is not None else quantize_per_token_ref(z)


def _dot_interaction_int8_any(vectors: List[Tensor], pad: int) -> Tuple[Tensor, Tensor]:
    _check_dot_interaction(vectors, pad)
    return quantize_per_token_ref(dot_interaction_ref(vectors, pad))


def _dot_interaction_int8_fake(vectors: List[Tensor], pad: int) -> Tuple[Tensor, Tensor]:
    _check_dot_interaction(vectors, pad)
    nvec, (batch, dim) = len(vectors), vectors[0].shape
    x = vectors[0]
    return (x.new_empty((batch, dim + nvec * (nvec - 1) // 2 + pad), dtype=torch.int8),
            x.new_empty((batch,), dtype=torch.float32))


dot_interaction_int8.register_fake(_dot_interaction_int8_fake)
_LIB.impl("dot_interaction_int8", _dot_interaction_int8_any, "CompositeExplicitAutograd")  # CUDA, the rest, no tensors

# -- hwaware::embedding_interaction_int8 (the deployed DLRM's lookups and interaction in one pass) ---

def _check_embedding_interaction(x: Tensor, weights: List[Tensor], bits: List[int], indices: Tensor, pad: int) -> None:
    _dt("x", x, (torch.float32,), "[B, D] float32 (the bottom MLP output)")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, D], got shape {list(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad={pad} must be >= 0")
    _check_tables(weights, bits, x.shape[1], indices)
    if indices.shape[1] != x.shape[0]:
        raise ValueError(f"indices must be [T, B] with B = x.shape[0] = {x.shape[0]} (one id per sample and table), "
                         f"got shape {list(indices.shape)}")
    if x.device != indices.device:
        raise ValueError(f"x is on {x.device} but indices are on {indices.device}")


def _embedding_interaction_cpu(x: Tensor, weights: List[Tensor], bits: List[int], indices: Tensor, pad: int,
                               quantized: bool) -> Tuple[Tensor, ...]:
    """Both ops' CPU kernel: the one native pass, or the two ops where it is not available."""
    from hwaware.quant import native

    _check_embedding_interaction(x, weights, bits, indices, pad)
    if not all(w.is_contiguous() for w in weights):
        weights = [w.contiguous() for w in weights]
    got = native.bags_interaction(x.contiguous(), weights, bits, indices, pad, quantized)
    if got is None:
        return _embedding_interaction_any(x, weights, bits, indices, pad, quantized)
    outs, (rule, t, bad) = got
    if rule == 1:
        raise IndexError(f"indices[{t}] must lie in [0, {weights[t].shape[0]}) (rows of weights[{t}]), got {bad}")
    return outs


def _embedding_interaction_any(x: Tensor, weights: List[Tensor], bits: List[int], indices: Tensor, pad: int,
                               quantized: bool) -> Tuple[Tensor, ...]:
    """The two ops in turn (CUDA and where the native pass is not available)."""
    _check_embedding_interaction(x, weights, bits, indices, pad)
    offsets = torch.arange(x.shape[0], dtype=indices.dtype, device=indices.device)
    bags = torch.ops.hwaware.embedding_bags_rowwise.default(weights, bits, x.shape[1], indices, offsets, 0)
    vectors = [x] + list(bags.unbind(0))
    if quantized:
        return torch.ops.hwaware.dot_interaction_int8.default(vectors, pad)
    return (torch.ops.hwaware.dot_interaction.default(vectors, pad),)  # below autograd here: no graph


def _embedding_interaction_width(x: Tensor, weights: List[Tensor], pad: int) -> int:
    nvec = len(weights) + 1
    return x.shape[1] + nvec * (nvec - 1) // 2 + pad


@_define("embedding_interaction(Tensor x, Tensor[] weights, int[] bits, Tensor indices, SymInt pad) -> Tensor")
def embedding_interaction(x: Tensor, weights: List[Tensor], bits: List[int], indices: Tensor, pad: int) -> Tensor:
    """``dot_interaction([x] + list(embedding_bags_rowwise(weights, bits, D, indices, arange(B), 0)), pad)``,
    bit for bit: a deployed DLRM's T one-id lookups and its interaction rows ``[B, D + T(T+1)/2 + pad]``
    float32 (a deploy op: no backward), for a top MLP that takes float input. ``x`` float32 ``[B, D]``;
    ``indices`` ``[T, B]``, one id per sample and table (a strided view such as ``sparse.t()`` is
    fine). CPU with AVX-512: one C pass whose blocks read the table rows straight into the
    interaction, so the ``[T, B, D]`` lookups (3.4 MB at the recipe's batch 2048) are never written
    and read back; otherwise the two ops."""
    return _embedding_interaction_cpu(x, weights, bits, indices, pad, quantized=False)[0]


@embedding_interaction.register_fake
def _(x, weights, bits, indices, pad):
    _check_embedding_interaction(x, weights, bits, indices, pad)
    return x.new_empty((x.shape[0], _embedding_interaction_width(x, weights, pad)))


_LIB.impl("embedding_interaction", lambda *a: _embedding_interaction_any(*a, quantized=False)[0],
          "CompositeExplicitAutograd")  # CUDA, the rest


@_define("embedding_interaction_int8(Tensor x, Tensor[] weights, int[] bits, Tensor indices, SymInt pad) -> (Tensor, Tensor)")
def embedding_interaction_int8(x: Tensor, weights: List[Tensor], bits: List[int], indices: Tensor,
                               pad: int) -> Tuple[Tensor, Tensor]:
    """``dot_interaction_int8([x] + list(embedding_bags_rowwise(weights, bits, D, indices, arange(B), 0)), pad)``,
    bit for bit: :func:`embedding_interaction`'s rows as the int8 codes and scales of the top MLP's
    first int8 layer (a deploy op: no backward; feed it to :func:`int8_mlp_quantized`), so neither
    the lookups nor the float rows are written."""
    return _embedding_interaction_cpu(x, weights, bits, indices, pad, quantized=True)


@embedding_interaction_int8.register_fake
def _(x, weights, bits, indices, pad):
    _check_embedding_interaction(x, weights, bits, indices, pad)
    return (x.new_empty((x.shape[0], _embedding_interaction_width(x, weights, pad)), dtype=torch.int8),
            x.new_empty((x.shape[0],), dtype=torch.float32))


_LIB.impl("embedding_interaction_int8", lambda *a: _embedding_interaction_any(*a, quantized=True),
          "CompositeExplicitAutograd")  # CUDA, the rest

_LIB.define("dot_interaction_backward(Tensor grad, Tensor[] vectors, SymInt pad) -> Tensor[]")
_LIB.impl("dot_interaction_backward", _dot_interaction_backward_cpu, "CPU")
_LIB.impl("dot_interaction_backward", dot_interaction_backward_ref, "CompositeExplicitAutograd")
_LIB.impl("dot_interaction_backward", _dot_interaction_backward_autograd, "Autograd", with_keyset=True)
torch.library.register_fake("hwaware::dot_interaction_backward",
                            lambda grad, vectors, pad: [v.new_empty(v.shape) for v in vectors], lib=_LIB)


def _dot_interaction_setup(ctx, inputs, output) -> None:
    vectors, pad = inputs
    ctx.save_for_backward(*vectors)
    ctx.pad = pad


def _dot_interaction_grad(ctx, grad: Tensor):
    return list(torch.ops.hwaware.dot_interaction_backward(grad, list(ctx.saved_tensors), ctx.pad)), None


torch.library.register_autograd("hwaware::dot_interaction", _dot_interaction_grad, setup_context=_dot_interaction_setup,
                                lib=_LIB)
dot_interaction = torch.ops.hwaware.dot_interaction.default
dot_interaction.__doc__ = """``hwaware::dot_interaction(vectors [V x [B, D]] float, pad) -> [B, D + V(V-1)/2 + pad]``:
``vectors[0]``, then ``dot(vectors[i], vectors[j])`` for ``i < j`` (row-major), then ``pad`` zeros:
DLRM's interaction of the bottom-MLP output with the embeddings (``D >= 1``). Differentiable."""


# -- CUDA ----------------------------------------------------------------------------------------
# hwaware/ops/_cuda.py registers the Triton launchers (kernels/, one op per file) as the CUDA kernel
# of each op above with <op>.register_kernel("cuda") and adds SPARSE24_KERNELS["cuda"]. It imports
# triton and hwaware.kernels lazily, on the first CUDA call: `import hwaware` works without triton
# (a CUDA tensor then raises a RuntimeError saying `pip install triton`, no silent CPU fallback) and
# decorates no kernel (Triton fixes interpreter vs compiled mode when it decorates; see _cuda.py).
# It must come last: it imports the ops and checks defined above.
from hwaware.ops import _cuda  # noqa: E402,F401
