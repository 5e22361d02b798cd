"""Row-wise int8 / int4 embedding bag on the FBGEMM table layout.

Row layout (``hwaware.ops.packing``), ``x = q * scale + offset``:
- 8-bit: ``D`` code bytes, fp32 scale, fp32 offset (``cols = D + 8``);
- 4-bit: ``ceil(D/2)`` bytes of nibbles (low nibble = even column), fp16 scale, fp16 offset
  (``cols = ceil(D/2) + 4``).
The qparams sit at byte offset ``D`` (or ``ceil(D/2)``) of a row, which need not be 4- (or 2-)
aligned, so they are assembled from bytes and bitcast rather than loaded through a float pointer.

One program per (bag, block of columns) walks its bag ``BLOCK_L`` lookups at a time: it gathers a
``[BLOCK_L, BLOCK_D]`` block of codes plus each row's qparams, dequantizes in fp32 and reduces
(sum / mean / max; optional per-sample weights with sum). Empty bags give 0, as F.embedding_bag.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_devices, check_tensor, is_interpreted

__all__ = ["embedding_bag_rowwise"]

_INDEX = (torch.int64, torch.int32)


@triton.jit
def _load_f32(ptr, mask):
    # 4 little-endian bytes -> fp32 (unaligned-safe)
    b0 = tl.load(ptr, mask=mask, other=0).to(tl.uint32)
    b1 = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint32)
    b2 = tl.load(ptr + 2, mask=mask, other=0).to(tl.uint32)
    b3 = tl.load(ptr + 3, mask=mask, other=0).to(tl.uint32)
    return (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _load_f16_as_f32(ptr, mask):
    # 2 little-endian bytes -> fp16 -> fp32 (unaligned-safe)
    b0 = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    b1 = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (b0 | (b1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _embedding_bag_rowwise_kernel(
    w_ptr,  # *uint8 [R, cols] FBGEMM row-wise table; rows stride_w bytes apart, columns contiguous
    idx_ptr,  # *int32|int64 [L] row indices
    off_ptr,  # *int32|int64 [NUM_OFFSETS] bag starts (plus the end of the last bag with include_last_offset)
    psw_ptr,  # *fp32 [L] per-sample weights (HAS_PSW), else any pointer
    out_ptr,  # *fp32 [B, D] output, row-major contiguous
    R,  # table rows: indices outside [0, R) are never read (the launcher checks them when asked)
    L,  # number of indices: the end of the last bag when there is no final offset
    NUM_OFFSETS,  # offsets.numel(); bag b ends at offsets[b + 1] if that exists, else at L
    D,  # embedding dim
    stride_w,  # bytes between table rows
    QPARAM_BYTE,  # byte offset of the scale in a row: D (8-bit) or ceil(D/2) (4-bit); offset follows
    BITS: tl.constexpr,  # 8 or 4
    MODE: tl.constexpr,  # 0 sum, 1 mean, 2 max
    HAS_PSW: tl.constexpr,  # multiply each looked-up row by its per-sample weight (sum only)
    BLOCK_L: tl.constexpr,  # lookups gathered per step
    BLOCK_D: tl.constexpr,  # columns per program
):
    bag = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols < D
    start = tl.load(off_ptr + bag).to(tl.int64)
    end = tl.load(off_ptr + bag + 1, mask=bag + 1 < NUM_OFFSETS, other=L).to(tl.int64)
    # unchecked offsets (check_indices=False, a CUDA graph capture): clipped to [0, L], so indices and
    # per_sample_weights are never read out of bounds; a bad bag comes out empty or clipped
    start = tl.minimum(tl.maximum(start, 0), L)
    end = tl.minimum(tl.maximum(end, start), L)
    if MODE == 2:
        acc = tl.full((BLOCK_D,), float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    seen = 0  # rows read: a max bag of only skipped (out-of-range) ids is 0, as an empty one
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        l_ok = ls < end
        rows = tl.load(idx_ptr + ls, mask=l_ok, other=0).to(tl.int64)
        l_ok = l_ok & (rows >= 0) & (rows < R)
        seen += tl.sum(l_ok.to(tl.int32), axis=0)
        row_ptr = w_ptr + rows * stride_w
        ok = l_ok[:, None] & c_ok[None, :]
        if BITS == 8:
            q = tl.load(row_ptr[:, None] + cols[None, :], mask=ok, other=0).to(tl.float32)
            scale = _load_f32(row_ptr + QPARAM_BYTE, l_ok)
            offset = _load_f32(row_ptr + QPARAM_BYTE + 4, l_ok)
        else:
            byte = tl.load(row_ptr[:, None] + (cols // 2)[None, :], mask=ok, other=0).to(tl.int32)
            q = ((byte >> ((cols % 2) * 4)[None, :]) & 0xF).to(tl.float32)
            scale = _load_f16_as_f32(row_ptr + QPARAM_BYTE, l_ok)
            offset = _load_f16_as_f32(row_ptr + QPARAM_BYTE + 2, l_ok)
        # fp fusion is off at launch: q * scale + offset rounds twice, as the reference's dequantize
        v = q * scale[:, None] + offset[:, None]
        if MODE == 2:
            acc = tl.maximum(acc, tl.max(tl.where(ok, v, float("-inf")), axis=0))
        else:
            if HAS_PSW:
                v = v * tl.load(psw_ptr + ls, mask=l_ok, other=0.0)[:, None]
            acc += tl.sum(tl.where(ok, v, 0.0), axis=0)
    if MODE == 1:
        # div_rn: IEEE division as F.embedding_bag's mean (Triton's `/` on fp32 lowers to the
        # approximate div.full.f32 on NVIDIA GPUs; the interpreter's numpy division hides that)
        acc = tl.math.div_rn(acc, tl.maximum(end - start, 1).to(tl.float32))
    if MODE == 2:
        acc = tl.where(seen > 0, acc, 0.0)  # empty bag (or one of only skipped ids): 0, not -inf
    tl.store(out_ptr + bag.to(tl.int64) * D + cols, acc, mask=c_ok)


def embedding_bag_rowwise(weight: Tensor, bits: int, dim: int, indices: Tensor, offsets: Tensor, mode: int,
                          per_sample_weights: Optional[Tensor] = None, include_last_offset: bool = False,
                          check_indices: bool = True) -> Tensor:
    """Row-wise quantized embedding bag on the GPU -> ``float32 [B, dim]``; the math of
    ``embedding_bag_rowwise_ref`` (mode 0 sum, 1 mean, 2 max).

    ``check_indices`` (default) validates index and offset values first, raising ``IndexError`` /
    ``ValueError`` like the CPU op; it costs one device-to-host sync. Without it, out-of-range
    indices are skipped (never read out of bounds) and bad offsets give empty or clipped bags.
    """
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits={bits!r} is not supported; expected 4 or 8")
    if mode not in (0, 1, 2) or isinstance(mode, bool):
        raise ValueError(f"mode={mode!r} is not supported; expected 0 (sum), 1 (mean) or 2 (max)")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim={dim!r} must be an int >= 1")
    qbyte = dim if bits == 8 else (dim + 1) // 2
    cols = qbyte + (8 if bits == 8 else 4)
    check_tensor("weight", weight, (torch.uint8,), (None, cols),
                 f"[R, cols] uint8, a {bits}-bit row-wise table of dim={dim} (cols={cols})")
    check_tensor("indices", indices, _INDEX, (None,), "[L] int64 or int32")
    check_tensor("offsets", offsets, _INDEX, (None,), "[B] (or [B + 1] with include_last_offset) int64 or int32")
    if indices.dtype != offsets.dtype:
        raise TypeError(f"indices ({indices.dtype}) and offsets ({offsets.dtype}) must have the same dtype")
    if include_last_offset and offsets.numel() < 1:
        raise ValueError("offsets must hold at least one entry (the end of the last bag) with include_last_offset=True")
    if per_sample_weights is not None:
        if mode != 0:
            raise ValueError(f"per_sample_weights is only supported with mode=0 (sum), got mode={mode}")
        check_tensor("per_sample_weights", per_sample_weights, (torch.float32,), (indices.shape[0],),
                     "[L] float32 (same length as indices)")
    check_devices(_embedding_bag_rowwise_kernel, weight=weight, indices=indices, offsets=offsets,
                  per_sample_weights=per_sample_weights)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    indices, offsets = indices.contiguous(), offsets.contiguous()
    psw = per_sample_weights.contiguous() if per_sample_weights is not None else None
    n_idx, n_off = indices.numel(), offsets.numel()
    if check_indices:
        _check_index_values(weight.shape[0], indices, offsets, include_last_offset)

    b = n_off - 1 if include_last_offset else n_off
    out = torch.empty((b, dim), dtype=torch.float32, device=weight.device)
    if b == 0:
        return out
    if is_interpreted(_embedding_bag_rowwise_kernel):
        block_l, block_d, warps = 8, min(32, triton.next_power_of_2(dim)), 1
    else:
        # one program covers the whole row for recsys dims (<= 256): each gathered row is read once
        block_d = min(256, triton.next_power_of_2(dim))
        block_l = max(4, min(32, 2048 // block_d))
        warps = 4 if block_d * block_l >= 2048 else 2
    grid = (b, triton.cdiv(dim, block_d))
    _embedding_bag_rowwise_kernel[grid](
        weight, indices, offsets, psw if psw is not None else out, out,
        weight.shape[0], n_idx, n_off, dim, weight.stride(0), qbyte,
        BITS=bits, MODE=mode, HAS_PSW=psw is not None, BLOCK_L=block_l, BLOCK_D=block_d,
        num_warps=warps, enable_fp_fusion=False)
    return out


def _check_index_values(rows: int, indices: Tensor, offsets: Tensor, include_last_offset: bool) -> None:
    # the CPU op's checks, with one device-to-host copy of five scalars
    n = indices.numel()
    zero = torch.zeros((), dtype=torch.int64, device=indices.device)
    lo, hi = (indices.aminmax() if n else (zero, zero))
    if offsets.numel():
        first, last = offsets[0].long(), offsets[-1].long()
        decreasing = (offsets[1:] < offsets[:-1]).any() if offsets.numel() > 1 else zero.bool()
    else:
        first = last = zero
        decreasing = zero.bool()
    lo, hi, first, last, decreasing = torch.stack(
        [lo.long(), hi.long(), first, last, decreasing.long()]).tolist()
    if n and (lo < 0 or hi >= rows):  # (the error path: find the first offender for the message)
        flat = indices.reshape(-1)
        at = int(((flat < 0) | (flat >= rows)).nonzero()[0, 0])
        raise IndexError(f"indices must lie in [0, {rows}) (rows of the table), got {int(flat[at])} at position {at} "
                         f"(the batch's ids span [{lo}, {hi}])")
    if offsets.numel():
        if first != 0 or last > n or decreasing:
            raise ValueError(f"offsets must start at 0, be non-decreasing and not exceed len(indices)={n}, "
                             f"got first={first}, last={last}")
        if include_last_offset and last != n:
            raise ValueError(f"with include_last_offset=True the last offset must equal len(indices)={n}, got {last}: "
                             "ids after it would be in no bag (refused, as by the CPU op)")
