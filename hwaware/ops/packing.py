"""Packed formats: the ONE place each is packed and unpacked.

Formats (DESIGN.md, "Numerics that everything agrees on"):

- int4 nibbles: ``[N, K]`` codes -> ``uint8 [N, ceil(K/2)]``, two values per byte, LOW nibble
  first (element ``2j`` in bits 0-3, ``2j+1`` in bits 4-7). Signed codes ``[-8, 7]`` are stored as
  4-bit two's complement, unsigned codes ``[0, 15]`` as is.
- FBGEMM row-wise embedding tables (what ``torch.ops.quantized.embedding_bag_byte_prepack`` /
  ``embedding_bag_4bit_prepack`` produce and ``embedding_bag_{byte,4bit}_rowwise_offsets`` consume):
  ``uint8 [R, cols]``, each row = codes, then scale, then offset; ``x = q * scale + offset``.

  - 8-bit: ``D`` code bytes, fp32 scale, fp32 offset (``cols = D + 8``).
  - 4-bit: ``ceil(D/2)`` nibble bytes (low nibble first), fp16 scale, fp16 offset
    (``cols = ceil(D/2) + 4``). FBGEMM's own prepack only accepts even ``D``; an odd ``D`` is
    padded with a zero nibble, which the op slices away.
- int8 weights: ``int8 [N, K]`` symmetric per output channel in ``[-127, 127]``, ``scale float32 [N]``.
- int4 weights: ``uint8 [N, K/2]`` nibbles, ``scales float32 [N, K/g]``, ``zeros int8 [N, K/g]``
  (asymmetric, codes ``[0, 15]``) or None (symmetric, codes ``[-8, 7]``); ``w = (q - zp) * s``.
- 2:4 compressed weights (``K % 4 == 0``; every group of 4 along K has at most 2 non-zeros):
  ``values [N, K/2]`` (the weight's dtype, or int8 codes) holding each group's two kept entries in
  order, and ``meta uint8 [N, ceil(K/8)]``: one nibble per group, ``i0 | i1 << 2`` with the kept
  positions ``0 <= i0 < i1 <= 3``, packed two per byte low nibble first (as :func:`pack_int4`; an
  odd group count pads a zero nibble). A group with fewer than two non-zeros keeps its non-zero
  (if any) and then the lowest free position, holding an explicit 0. Only the six nibbles with
  ``i0 < i1`` (4, 8, 9, 12, 13, 14) are valid.

All quantization arithmetic comes from :mod:`hwaware.quant.primitives`, so what is packed here is
exactly what QAT fake-quantized against.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hwaware.quant.primitives import channel_minmax, channel_range, compute_qparams, dequantize, quantize
from hwaware.quant.spec import QuantSpec

__all__ = [
    "pack_int4",
    "unpack_int4",
    "pack_rowwise",
    "unpack_rowwise",
    "rowwise_spec",
    "rowwise_cols",
    "quantize_rowwise",
    "dequantize_rowwise",
    "rowwise_from_int8",
    "int8_weight_spec",
    "INT8_MAX_K",
    "int4_weight_spec",
    "quantize_int8_weight",
    "dequantize_int8_weight",
    "quantize_int4_weight",
    "dequantize_int4_weight",
    "compress_24",
    "decompress_24",
    "check_24_meta",
    "is_24",
    "VALID_24_NIBBLES",
]

ROWWISE_BITS = (4, 8)


# -- validation helpers ------------------------------------------------------------------------

def _check_tensor(name: str, t, dtypes: Tuple[torch.dtype, ...], ndim: int, expected: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {expected}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]} ({expected}), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {expected}, got shape {tuple(t.shape)}")


def _check_positive_scale(scale: Tensor) -> None:
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"scale must be finite and > 0 everywhere, got {float(scale[i])} at index {i}")


def _check_bits(bits) -> None:
    if bits not in ROWWISE_BITS or isinstance(bits, bool):
        raise ValueError(f"bits={bits!r} is not supported; expected one of {ROWWISE_BITS}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FP16_MAX = float(torch.finfo(torch.float16).max)


def _check_finite(name: str, t: Tensor) -> None:
    """Refuse NaN / inf: one makes its whole channel, group or row non-finite once quantized (the
    scale is taken from the range), where in FP32 it poisoned one weight's products."""
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) (NaN/inf), the first at index {first} "
                         f"({float(t.detach()[tuple(first)])}); a quantized format cannot hold them")


# -- int4 nibbles -----------------------------------------------------------------------------

def pack_int4(codes: Tensor) -> Tensor:
    """Pack 4-bit codes two per byte, low nibble first.

    codes: ``int8 [N, K]`` in ``[-8, 7]`` (two's complement) or ``uint8 [N, K]`` in ``[0, 15]``.
    Returns ``uint8 [N, ceil(K/2)]``; an odd ``K`` is padded with a zero nibble.
    """
    _check_tensor("codes", codes, (torch.int8, torch.uint8), 2, "[N, K] int8 in [-8, 7] or uint8 in [0, 15]")
    if codes.numel():
        lo, hi = (-8, 7) if codes.dtype == torch.int8 else (0, 15)
        mn, mx = int(codes.min()), int(codes.max())
        if mn < lo or mx > hi:
            raise ValueError(f"codes ({codes.dtype}) must lie in [{lo}, {hi}], got values in [{mn}, {mx}]")
    n, k = codes.shape
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)  # 4-bit two's complement for int8
    if k % 2:
        nib = torch.cat([nib, nib.new_zeros(n, 1)], dim=1)
    nib = nib.reshape(n, -1, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)).contiguous()


def unpack_int4(packed: Tensor, k: int, signed: bool) -> Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [N, ceil(k/2)]`` -> ``int8 [N, k]`` (sign-extended
    to ``[-8, 7]`` when ``signed``, else ``[0, 15]``)."""
    _check_tensor("packed", packed, (torch.uint8,), 2, "[N, ceil(K/2)] uint8")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise TypeError(f"k must be a non-negative int, got {k!r}")
    if packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"packed must have shape [N, ceil(k/2)] = [N, {(k + 1) // 2}] for k={k}, got {tuple(packed.shape)}")
    lo = packed & 0xF
    hi = packed >> 4
    v = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k].to(torch.int8)
    if signed:
        v = (v ^ 8) - 8  # sign-extend 4-bit two's complement
    return v.contiguous()


# -- FBGEMM row-wise embedding tables ---------------------------------------------------------

def rowwise_spec(bits: int) -> QuantSpec:
    """The QAT spec whose numerics the row-wise layout stores (per-row affine, float offset)."""
    _check_bits(bits)
    return QuantSpec(bits=bits, granularity="per_row", symmetric=False,
                     scale_dtype="float32" if bits == 8 else "float16")


def rowwise_cols(dim: int, bits: int) -> int:
    """Bytes per packed row: ``D + 8`` (8-bit) or ``ceil(D/2) + 4`` (4-bit)."""
    _check_bits(bits)
    return dim + 8 if bits == 8 else (dim + 1) // 2 + 4


def _as_bytes(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``[R]`` float -> ``uint8 [R, itemsize]`` (native little-endian bytes, as FBGEMM stores them)."""
    return t.detach().to(dtype).contiguous().reshape(-1, 1).view(torch.uint8)


def pack_rowwise(codes: Tensor, scale: Tensor, offset: Tensor, bits: int) -> Tensor:
    """Fuse codes and per-row qparams into the FBGEMM row-wise layout.

    codes: ``uint8 [R, D]`` (``[0, 255]`` or ``[0, 15]``); scale, offset: ``[R]`` float.
    Returns ``uint8 [R, D + 8]`` (8-bit, fp32 qparams) or ``uint8 [R, ceil(D/2) + 4]`` (4-bit, fp16).
    """
    _check_bits(bits)
    _check_tensor("codes", codes, (torch.uint8,), 2, "[R, D] uint8")
    r = codes.shape[0]
    for name, t in (("scale", scale), ("offset", offset)):
        _check_tensor(name, t, _FLOATS, 1, f"[R] = [{r}] float")
        if t.shape[0] != r:
            raise ValueError(f"{name} must have shape [R] = [{r}] to match codes {tuple(codes.shape)}, got {tuple(t.shape)}")
    qdt = torch.float32 if bits == 8 else torch.float16
    for name, t in (("scale", scale), ("offset", offset)):
        stored = t.detach().to(qdt)
        if not bool(torch.isfinite(stored).all()):
            row = int((~torch.isfinite(stored)).nonzero()[0])
            raise ValueError(f"row {row}'s {name} is {float(t[row])} as {str(qdt)[6:]}, which {bits}-bit rows store it in"
                             + (f": it must be finite and at most {_FP16_MAX:g} in magnitude; use 8-bit rows for this "
                                "table" if bits == 4 else "; it must be finite"))
    if bits == 8:
        return torch.cat([codes, _as_bytes(scale, torch.float32), _as_bytes(offset, torch.float32)], dim=1)
    return torch.cat([pack_int4(codes), _as_bytes(scale, torch.float16), _as_bytes(offset, torch.float16)], dim=1)


def _bytes_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A copy of the uint8 columns ``t`` ``[R, c]`` read as ``dtype`` ``[R, c / itemsize]``. Not
    ``t.contiguous().view(dtype)``: a one-row slice counts as contiguous already, and keeps the byte
    offset and row stride of the table it came from, which a float view refuses (a 1-row table, or
    the last chunk of 2**20 + 1 rows, exported and then failed to load)."""
    out = torch.empty(t.shape, dtype=torch.uint8, device=t.device)
    out.copy_(t)
    return out.view(dtype)


def unpack_rowwise(fused: Tensor, bits: int, dim: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Split an FBGEMM row-wise table into ``(codes uint8 [R, D], scale float32 [R], offset float32 [R])``.

    ``dim`` (``D``) is derived for 8 bits (``cols - 8``) and required for 4 bits, where
    ``ceil(D/2)`` cannot tell an odd ``D`` from the next even one.
    """
    _check_bits(bits)
    _check_tensor("fused", fused, (torch.uint8,), 2, "[R, cols] uint8 (FBGEMM row-wise)")
    cols = fused.shape[1]
    if bits == 8:
        d = cols - 8 if dim is None else dim
    else:
        if dim is None:
            raise ValueError("unpack_rowwise(bits=4) needs dim: ceil(D/2) bytes cannot tell an odd D from D + 1")
        d = dim
    if not isinstance(d, int) or d < 1 or rowwise_cols(d, bits) != cols:
        raise ValueError(f"fused has {cols} columns, which is not a {bits}-bit row-wise table of dim={d!r} "
                         f"(expected {rowwise_cols(d, bits) if isinstance(d, int) and d >= 1 else 'D >= 1'} columns)")
    qdt = torch.float32 if bits == 8 else torch.float16
    nq = cols - 2 * qdt.itemsize
    scale = _bytes_as(fused[:, nq:nq + qdt.itemsize], qdt).reshape(-1).float()
    offset = _bytes_as(fused[:, nq + qdt.itemsize:], qdt).reshape(-1).float()
    if bits == 8:
        codes = fused[:, :d].contiguous()
    else:
        codes = unpack_int4(fused[:, :nq].contiguous(), d, signed=False).to(torch.uint8)
    return codes, scale, offset


def quantize_rowwise(table: Tensor, bits: int, spec: Optional[QuantSpec] = None) -> Tensor:
    """Quantize a float ``[R, D]`` table to the FBGEMM row-wise layout with the QAT numerics
    (:func:`rowwise_spec`): dequantizing the result equals ``fake_quantize`` of the table exactly.

    ``spec``: the table's QAT spec. A symmetric one (codes ``q`` in ``[qmin, qmax]``, offset 0) is
    stored in the same layout as ``c = q + 2^(bits-1)`` with offset ``-2^(bits-1) * scale`` (exact:
    a power of two times the scale), so the artifact holds the very codes QAT trained; dequantized,
    ``c * scale + offset`` is ``q * scale`` up to the rounding of one product (a trial saw 26% of a
    symmetric table's codes change when it was re-quantized affine). Its scale dtype must be the
    layout's (:func:`rowwise_spec`)."""
    layout = rowwise_spec(bits)
    if spec is not None and spec.symmetric and (spec.bits != bits or spec.granularity != "per_row"
                                                 or spec.scale_dtype != layout.scale_dtype):
        raise ValueError(f"a {bits}-bit row-wise table stores {layout.scale_dtype} scales per row; got spec {spec.short()} "
                         f"with scale_dtype={spec.scale_dtype!r}")
    _check_tensor("table", table, _FLOATS, 2, "[R, D] float")
    if table.shape[1] < 1:
        raise ValueError(f"table must have at least one column, got shape {tuple(table.shape)}")
    _check_finite("table", table)
    mn, mx = channel_minmax(table.detach().float())
    if spec is not None and spec.symmetric:
        return _pack_symmetric_rows(table, mn, mx, bits, spec)
    spec = layout
    if bits == 4:  # float16 scale (range / 15) and offset (min): a larger one would clip or be inf
        over = ((mx - mn) / 15 > _FP16_MAX) | (mn.abs() > _FP16_MAX)
        if bool(over.any()):
            r = int(over.nonzero()[0])
            raise ValueError(f"row {r} spans [{float(mn[r]):.6g}, {float(mx[r]):.6g}]: 4-bit rows store its scale "
                             f"(range / 15) and offset (minimum) as float16, at most {_FP16_MAX:g} in magnitude; "
                             "use 8-bit rows for this table")
    scale, offset = compute_qparams(mn, mx, spec)
    codes = quantize(table, scale, offset, spec)
    return pack_rowwise(codes, scale, offset, bits)


def _pack_symmetric_rows(table: Tensor, mn: Tensor, mx: Tensor, bits: int, spec: QuantSpec) -> Tensor:
    """:func:`quantize_rowwise` for a symmetric ``spec``, on the checked table's row ranges."""
    scale, zero = compute_qparams(mn, mx, spec)
    half = 2 ** (bits - 1)
    if bits == 4 and bool((scale * half > _FP16_MAX).any()):
        r = int((scale * half > _FP16_MAX).nonzero()[0])
        raise ValueError(f"row {r}'s scale {float(scale[r]):.6g}: 4-bit rows store the offset -8 * scale as float16, at most "
                         f"{_FP16_MAX:g} in magnitude; use 8-bit rows for this table")
    codes = (quantize(table, scale, zero, spec).to(torch.int16) + half).to(torch.uint8)  # [qmin, qmax] + half: in [0, 2^bits)
    return pack_rowwise(codes, scale, -half * scale, bits)


def rowwise_from_int8(qweight: Tensor, scale: Tensor) -> Tensor:
    """The 8-bit row-wise table (``uint8 [R, D + 8]``) of the symmetric per-row codes an int8
    linear holds (``qweight int8 [R, D]``, ``scale float32 [R]``): codes ``q + 128``, offset
    ``-128 * scale`` (exact), as :func:`quantize_rowwise` stores a symmetric table. One weight
    tied between a table and an int8 layer is stored once, as the layer's codes; load derives the
    table's rows from them (manifest ``derived_rows``)."""
    _check_tensor("qweight", qweight, (torch.int8,), 2, "[R, D] int8")
    _check_tensor("scale", scale, (torch.float32,), 1, f"[R] = [{qweight.shape[0]}] float32")
    if scale.shape[0] != qweight.shape[0]:
        raise ValueError(f"scale must have shape [R] = [{qweight.shape[0]}] for qweight {tuple(qweight.shape)}, got {tuple(scale.shape)}")
    codes = (qweight.to(torch.int16) + 128).to(torch.uint8)
    return pack_rowwise(codes, scale, -128 * scale, 8)


def check_rowwise_qparams(fused: Tensor, bits: int, rows_per_chunk: int = 1 << 20) -> None:
    """``ValueError`` naming the first row whose scale or offset is not finite, or whose scale is
    negative (every row hwaware writes has a finite scale > 0 and a finite offset: a NaN one
    serves NaN for every bag that reads the row). Reads ``rows_per_chunk`` rows' qparams at a
    time, so a large table costs a few MiB, not a copy."""
    _check_bits(bits)
    _check_tensor("fused", fused, (torch.uint8,), 2, "[R, cols] uint8 (FBGEMM row-wise)")
    qdt = torch.float32 if bits == 8 else torch.float16
    nq = fused.shape[1] - 2 * qdt.itemsize
    if nq < 1:
        raise ValueError(f"fused has {fused.shape[1]} columns, too few for a {bits}-bit row-wise table")
    for start in range(0, fused.shape[0], rows_per_chunk):
        q = _bytes_as(fused[start:start + rows_per_chunk, nq:], qdt)  # [rows, 2]: scale, offset
        bad = ~(torch.isfinite(q).all(1) & (q[:, 0] >= 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"row {start + i} has scale {float(q[i, 0])} and offset {float(q[i, 1])}; expected a "
                             "finite scale >= 0 and a finite offset")


def dequantize_rowwise(fused: Tensor, bits: int, dim: Optional[int] = None) -> Tensor:
    """Float32 ``[R, D]`` table from the row-wise layout: ``q * scale + offset``."""
    codes, scale, offset = unpack_rowwise(fused, bits, dim)
    return dequantize(codes, scale, offset, rowwise_spec(bits))


# -- int8 per-channel weights -----------------------------------------------------------------

# The W8A8 product of a layer (hwaware::int8_linear and the ops built on it) sums K products of int8
# codes in int32 (hwaware's C engines, torch._int_mm, the Triton kernel), exact only while the sum
# fits: for any int8 activation codes times any int8 weight codes (|q| <= 128 each, codes a caller
# hands int8_mlp_quantized included) that holds up to this K. The integer implementations refuse a
# larger K (ValueError); the float ones ("dequant") take any.
INT8_MAX_K = (2**31 - 1) // (128 * 128)  # 131071


def int8_weight_spec() -> QuantSpec:
    """Symmetric per-output-channel int8, narrow range ``[-127, 127]``."""
    return QuantSpec(bits=8, granularity="per_channel", symmetric=True)


def quantize_int8_weight(w: Tensor, scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``w [N, K]`` float -> ``(qweight int8 [N, K], scale float32 [N])``.

    ``scale`` (``[N]``), when given (e.g. from the QAT quantizer), is used as is, so the artifact
    packs exactly what training saw; otherwise it is ``max|w_n| / 127`` per row.
    """
    _check_tensor("w", w, _FLOATS, 2, "[N, K] float")
    _check_finite("w", w)
    spec = int8_weight_spec()
    n = w.shape[0]
    if scale is None:
        mn, mx = channel_range(w.detach().reshape(n, -1), spec)
        scale, _ = compute_qparams(mn, mx, spec)
    else:
        _check_tensor("scale", scale, _FLOATS, 1, f"[N] = [{n}] float")
        if scale.shape[0] != n:
            raise ValueError(f"scale must have shape [N] = [{n}] for w of shape {tuple(w.shape)}, got {tuple(scale.shape)}")
    scale = scale.detach().float().contiguous()
    _check_positive_scale(scale)
    q = quantize(w, scale, torch.zeros_like(scale, dtype=torch.int32), spec)
    return q.contiguous(), scale


def dequantize_int8_weight(qweight: Tensor, scale: Tensor) -> Tensor:
    """Float32 ``[N, K]`` from ``qweight int8 [N, K]`` and ``scale [N]``."""
    _check_tensor("qweight", qweight, (torch.int8,), 2, "[N, K] int8")
    return dequantize(qweight, scale, torch.zeros_like(scale, dtype=torch.int32), int8_weight_spec())


# -- int4 group-wise weights ------------------------------------------------------------------

def int4_weight_spec(group_size: int, symmetric: bool) -> QuantSpec:
    """4-bit groups of ``group_size`` along K: symmetric ``[-8, 7]`` or affine ``[0, 15]``."""
    return QuantSpec(bits=4, granularity="per_group", group_size=group_size, symmetric=symmetric)


def _check_group(name: str, k: int, group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{name} has K={k}, which is not a multiple of group_size={group_size}")


def quantize_int4_weight(w: Tensor, group_size: int, symmetric: bool, scale: Optional[Tensor] = None,
                         zero_point: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``w [N, K]`` float -> ``(packed uint8 [N, K/2], scales float32 [N, K/g], zeros int8 [N, K/g] | None)``.

    ``scale``/``zero_point`` (``[N, K/g]`` or flat ``[N*K/g]``), when given (e.g. from the QAT
    quantizer), are used as is; ``zero_point`` is required when asymmetric and forbidden otherwise.
    """
    _check_tensor("w", w, _FLOATS, 2, "[N, K] float")
    _check_finite("w", w)
    n, k = w.shape
    _check_group("w", k, group_size)
    spec = int4_weight_spec(group_size, symmetric)
    ng = k // group_size
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without scale; pass both (from the QAT quantizer) or neither")
        mn, mx = channel_minmax(w.detach().reshape(-1, group_size).float())
        scale, zp = compute_qparams(mn, mx, spec)
    else:
        _check_tensor("scale", scale, _FLOATS, scale.dim() if isinstance(scale, Tensor) else 2, f"[N, K/g] = [{n}, {ng}] float")
        if scale.numel() != n * ng:
            raise ValueError(f"scale must have shape [N, K/g] = [{n}, {ng}], got {tuple(scale.shape)}")
        if symmetric:
            if zero_point is not None and bool((zero_point != 0).any()):
                raise ValueError("zero_point must be None (or all zeros) for symmetric int4")
            zp = torch.zeros(n * ng, dtype=torch.int32, device=w.device)
        else:
            if zero_point is None:
                raise ValueError(f"asymmetric int4 needs zero_point of shape [N, K/g] = [{n}, {ng}] with scale")
            if not isinstance(zero_point, Tensor) or zero_point.numel() != n * ng:
                raise ValueError(f"zero_point must have shape [N, K/g] = [{n}, {ng}], "
                                 f"got {tuple(zero_point.shape) if isinstance(zero_point, Tensor) else zero_point!r}")
            zp = zero_point.detach().reshape(-1).round().to(torch.int32)
            if int(zp.min()) < 0 or int(zp.max()) > 15:
                raise ValueError(f"zero_point must lie in [0, 15], got values in [{int(zp.min())}, {int(zp.max())}]")
    scale = scale.detach().float().reshape(-1).contiguous()
    _check_positive_scale(scale)
    codes = quantize(w, scale, zp, spec)  # int8 [-8, 7] or uint8 [0, 15], shape [N, K]
    packed = pack_int4(codes)
    zeros = None if symmetric else zp.to(torch.int8).reshape(n, ng).contiguous()
    return packed, scale.reshape(n, ng), zeros


def dequantize_int4_weight(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int) -> Tensor:
    """Float32 ``[N, K]`` from packed int4: ``(q - zp) * s`` per group (``K = 2 * packed.shape[1]``)."""
    _check_tensor("packed", packed, (torch.uint8,), 2, "[N, K/2] uint8")
    n, k = packed.shape[0], packed.shape[1] * 2
    _check_group("packed (K = 2 * packed.shape[1])", k, group_size)
    ng = k // group_size
    _check_tensor("scales", scales, _FLOATS, 2, f"[N, K/g] = [{n}, {ng}] float")
    if tuple(scales.shape) != (n, ng):
        raise ValueError(f"scales must have shape [N, K/g] = [{n}, {ng}], got {tuple(scales.shape)}")
    symmetric = zeros is None
    if not symmetric:
        _check_tensor("zeros", zeros, (torch.int8, torch.uint8, torch.int32), 2, f"[N, K/g] = [{n}, {ng}] int8")
        if tuple(zeros.shape) != (n, ng):
            raise ValueError(f"zeros must have shape [N, K/g] = [{n}, {ng}], got {tuple(zeros.shape)}")
    q = unpack_int4(packed, k, signed=symmetric)
    zp = torch.zeros(n * ng, dtype=torch.int32, device=packed.device) if symmetric else zeros.reshape(-1).to(torch.int32)
    return dequantize(q, scales.reshape(-1), zp, int4_weight_spec(group_size, symmetric))


# -- 2:4 semi-structured weights --------------------------------------------------------------

VALID_24_NIBBLES = (4, 8, 9, 12, 13, 14)  # i0 | i1 << 2 for i0 < i1 in [0, 3]


def _check_k24(k: int, what: str) -> None:
    if k % 4:
        raise ValueError(f"{what}: K={k} must be a multiple of 4 for 2:4 sparsity (groups of 4 along the input dimension)")


def is_24(w: Tensor) -> bool:
    """True when ``w [N, K]`` (``K % 4 == 0``) has at most 2 non-zeros in every group of 4 along K."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def compress_24(w: Tensor) -> Tuple[Tensor, Tensor]:
    """``w [N, K]`` satisfying 2:4 -> ``(values [N, K/2] w.dtype, meta uint8 [N, ceil(K/8)])``.

    Lossless: :func:`decompress_24` returns ``w`` exactly. Works for float and int8 (quantized
    codes) weights. Raises ``ValueError`` naming the first group with more than two non-zeros.
    """
    _check_tensor("w", w, _FLOATS + (torch.int8,), 2, "[N, K] float or int8")
    n, k = w.shape
    _check_k24(k, f"w of shape {tuple(w.shape)}")
    groups = w.reshape(n, k // 4, 4)
    nz = groups != 0
    count = nz.sum(-1)
    if bool((count > 2).any()):
        row, grp = (count > 2).nonzero()[0].tolist()
        raise ValueError(f"w is not 2:4 sparse: row {row}, columns {4 * grp}..{4 * grp + 3} hold {int(count[row, grp])} "
                         f"non-zeros {groups[row, grp].tolist()} (at most 2 per group of 4)")
    # non-zeros first, then the lowest free positions; kept positions in increasing order
    pos = torch.arange(4, dtype=torch.int16, device=w.device)
    key = nz.to(torch.int16) * 4 + (3 - pos)
    idx = key.topk(2, dim=-1).indices.sort(dim=-1).values  # [N, K/4, 2] int64
    values = groups.gather(-1, idx).reshape(n, k // 2)
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [N, K/4]
    return values.contiguous(), pack_int4(nib)


def check_24_meta(meta: Tensor, k: int, name: str = "meta") -> None:
    """Refuse metadata that breaks the 2:4 rule (a nibble other than :data:`VALID_24_NIBBLES`,
    i.e. a repeated or out-of-order position), naming the row and columns."""
    _check_tensor(name, meta, (torch.uint8,), 2, "[N, ceil(K/8)] uint8 (2:4 metadata)")
    _check_k24(k, name)
    groups = k // 4
    if meta.shape[1] != (groups + 1) // 2:
        raise ValueError(f"{name} must have shape [N, ceil(K/8)] = [N, {(groups + 1) // 2}] for K={k}, got {tuple(meta.shape)}")
    nib = unpack_int4(meta, groups, signed=False).to(torch.int64)
    valid = torch.zeros(16, dtype=torch.bool, device=meta.device)
    valid[list(VALID_24_NIBBLES)] = True
    bad = ~valid[nib]
    if bool(bad.any()):
        row, grp = bad.nonzero()[0].tolist()
        v = int(nib[row, grp])
        raise ValueError(f"{name} breaks the 2:4 rule: row {row}, columns {4 * grp}..{4 * grp + 3} have positions "
                         f"({v & 3}, {v >> 2}); expected two distinct increasing positions in 0..3")


def decompress_24(values: Tensor, meta: Tensor, k: Optional[int] = None) -> Tensor:
    """Inverse of :func:`compress_24`: ``values [N, K/2]``, ``meta`` -> dense ``[N, K]`` (values' dtype)."""
    _check_tensor("values", values, _FLOATS + (torch.int8,), 2, "[N, K/2] float or int8")
    n = values.shape[0]
    k = 2 * values.shape[1] if k is None else k
    if values.shape[1] * 2 != k:
        raise ValueError(f"values must have shape [N, K/2] = [N, {k // 2}] for K={k}, got {tuple(values.shape)}")
    check_24_meta(meta, k)
    if meta.shape[0] != n:
        raise ValueError(f"meta has {meta.shape[0]} rows, values has {n}; expected the same N")
    nib = unpack_int4(meta, k // 4, signed=False).to(torch.int64)  # [N, K/4]
    idx = torch.stack([nib & 3, nib >> 2], dim=-1)  # [N, K/4, 2]
    out = values.new_zeros(n, k // 4, 4)
    out.scatter_(-1, idx, values.reshape(n, k // 4, 2))
    return out.reshape(n, k)
