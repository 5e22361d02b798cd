"""W4A16 linear: group-wise int4 weights, unpacked and dequantized inside the K loop.

Weight layout (``hwaware.ops.packing``): ``packed uint8 [N, K/2]`` with element ``2j`` in the low
nibble, ``scales float32 [N, K/g]``, ``zeros int8 [N, K/g]`` (asymmetric codes ``[0, 15]``,
``w = (q - zp) * s``) or None (symmetric codes ``[-8, 7]`` as 4-bit two's complement, ``w = q * s``).

Every K tile lies inside one group (``BLOCK_K`` divides ``group_size``; the spec allows 32/64/128),
so the tile's integer codes ``q - zp`` (exact in fp16/bf16: |q - zp| <= 15) go through ``tl.dot``
and the group scale multiplies the fp32 partial product, ``acc += (x @ (q - zp)^T) * s``: one
multiply per output element per tile instead of one per weight element, and ``(q - zp) * s`` is
never rounded to 16 bits.

Small M (<= 16 rows, GEMV-like) is bound by streaming the weight; with a few output tiles per SM
the GPU idles, so K is split across programs that write fp32 partials, and a second kernel sums
them, adds the bias and casts (deterministic, unlike atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_devices, check_tensor, dot_dtype, is_interpreted, m_bucket, pick_config, reduce_splits, store_dtype

__all__ = ["int4_linear"]

_FLOAT_X = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _int4_gemm_kernel(
    x_ptr,  # *fp16|bf16|fp32 [M, K] activations, strides (stride_xm, stride_xk)
    w_ptr,  # *uint8 [N, K/2] packed codes (low nibble = even k), strides (stride_wn, stride_wk)
    s_ptr,  # *fp32 [N, K/G] group scales, strides (stride_sn, stride_sg)
    z_ptr,  # *int8 [N, K/G] zero points (HAS_ZEROS), same strides as the scales; else any pointer
    bias_ptr,  # *float [N] bias (HAS_BIAS; only read when SPLIT_K == 1), else any pointer
    out_ptr,  # SPLIT_K == 1: [M, N] output (its dtype); else fp32 [SPLIT_K, M, N] partial sums
    M, N, K,  # problem size (K = 2 * packed.shape[1])
    stride_xm, stride_xk,  # x strides (elements)
    stride_wn, stride_wk,  # packed strides (bytes)
    stride_sn, stride_sg,  # scales / zeros strides (elements)
    GROUP_SIZE: tl.constexpr,  # g: contiguous K elements sharing one scale / zero point
    HAS_ZEROS: tl.constexpr,  # asymmetric codes [0, 15] minus zero point; else signed nibbles
    HAS_BIAS: tl.constexpr,  # add bias in the epilogue (SPLIT_K == 1 only; the reduce kernel adds it otherwise)
    SPLIT_K: tl.constexpr,  # programs along K (grid axis 1); each covers a contiguous run of K tiles
    DOT_DTYPE: tl.constexpr,  # tl.dot operand dtype (x.dtype, or fp32; see _launch.dot_dtype)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (exact products), else ignored
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile
):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)

    num_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(num_tiles, SPLIT_K)
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_begin, t_end):
        rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        # each byte once, contiguous along K (K is even); its low nibble is column 2j, its high nibble
        # 2j + 1, so joining (low, high) on a new last axis and flattening gives the tile in K order
        rb = t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_ptr + rn64[:, None] * stride_wn + rb[None, :] * stride_wk,
                       mask=n_ok[:, None] & (rb < K // 2)[None, :], other=0).to(tl.int32)
        q = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K))  # [BLOCK_N, BLOCK_K] in [0, 15]
        g = (t * BLOCK_K) // GROUP_SIZE  # the tile lies inside one group (the launcher picks BLOCK_K so)
        if HAS_ZEROS:
            q = q - tl.load(z_ptr + rn64 * stride_sn + g * stride_sg, mask=n_ok, other=0).to(tl.int32)[:, None]
        else:
            q = (q ^ 8) - 8  # sign-extend the 4-bit two's complement
        s = tl.load(s_ptr + rn64 * stride_sn + g * stride_sg, mask=n_ok, other=0.0)
        part = tl.dot(x.to(DOT_DTYPE), tl.trans(q.to(DOT_DTYPE)), input_precision=INPUT_PRECISION)
        acc += part * s[None, :]

    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        o_ptrs = out_ptr + (pid_k * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(o_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


def _cfg(bm, bn, bk, split_k, warps, stages):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, num_warps=warps, num_stages=stages)


# Small M: weight streaming; split-K so that (N / BLOCK_N) * SPLIT_K programs cover the SMs.
# Narrow N tiles without a split (no second launch for the reduction) are candidates too.
_CONFIGS_SMALL_M = [_cfg(16, 64, 128, 1, 4, 4), _cfg(16, 64, 128, 4, 4, 4), _cfg(16, 128, 128, 4, 4, 4),
                    _cfg(16, 64, 64, 8, 4, 4), _cfg(16, 32, 128, 8, 2, 4), _cfg(16, 64, 256, 8, 4, 3),
                    _cfg(16, 32, 128, 1, 2, 4), _cfg(16, 16, 128, 1, 1, 4), _cfg(16, 32, 128, 2, 2, 4)]
# Large M: compute bound on the fp16/bf16 MMA; dequantization hides under the big tiles.
_CONFIGS_LARGE_M = [_cfg(128, 128, 64, 1, 4, 3), _cfg(128, 256, 64, 1, 8, 3), _cfg(64, 128, 64, 1, 4, 4),
                    _cfg(128, 128, 128, 1, 8, 3), _cfg(64, 64, 128, 1, 4, 4)]
# Interpreter: small tiles; small M splits K in two so CPU tests cover the split-K + reduce path.
_CONFIG_INTERPRET_SMALL_M = [_cfg(16, 16, 32, 2, 1, 1)]
_CONFIG_INTERPRET_LARGE_M = [_cfg(16, 16, 32, 1, 1, 1)]


def int4_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                bias: Optional[Tensor] = None) -> Tensor:
    """W4A16 linear on the GPU: ``x [..., K]`` float, ``packed uint8 [N, K/2]``, ``scales float32 [N, K/g]``,
    ``zeros int8 [N, K/g]?`` -> ``[..., N]`` in ``x.dtype``; the math of ``int4_linear_ref``."""
    check_tensor("x", x, _FLOAT_X, None, "[..., K] float (fp32/fp16/bf16)")
    check_tensor("packed", packed, (torch.uint8,), (None, None), "[N, K/2] uint8 (two int4 per byte, low nibble first)")
    n, k = packed.shape[0], 2 * packed.shape[1]
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing K = 2 * packed.shape[1] = {k}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K] with K = 2 * packed.shape[1] = {k}, got {list(x.shape)}")
    ng = k // group_size
    pow2 = group_size & -group_size  # largest power of two dividing the group: the biggest BLOCK_K allowed
    if pow2 < 16:
        raise ValueError(f"group_size={group_size} must be a multiple of 16 for the Triton int4 kernel "
                         "(tl.dot needs K tiles >= 16 that lie inside one group); the spec uses 32, 64 or 128")
    check_tensor("scales", scales, (torch.float32,), (n, ng), f"[N, K/group_size] float32 (group_size={group_size})")
    if zeros is not None:
        check_tensor("zeros", zeros, (torch.int8,), (n, ng), f"[N, K/group_size] int8 (group_size={group_size})")
        if zeros.stride() != scales.stride():
            zeros, scales = zeros.contiguous(), scales.contiguous()  # the kernel indexes both with one stride pair
    if bias is not None:
        check_tensor("bias", bias, _FLOAT_X, (n,), "[N] float")
    check_devices(_int4_gemm_kernel, x=x, packed=packed, scales=scales, zeros=zeros, bias=bias)

    x2d = x.reshape(-1, k)
    if x2d.stride(1) != 1:  # int32 k offsets (rk * stride_xk) would overflow for big column-major views
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    interpreted = is_interpreted(_int4_gemm_kernel)
    out_dt = store_dtype(x.dtype, interpreted)
    out = torch.empty((m, n), dtype=out_dt, device=x.device)
    if m == 0 or n == 0:
        return out.to(x.dtype).reshape(*x.shape[:-1], n)
    dot_dt, precision = dot_dtype(x.dtype, interpreted)
    bias_arg = bias.contiguous() if bias is not None else scales  # the kernels index bias[n] unstrided

    def launch(cfg):
        cfg = dict(cfg)
        bk = cfg["BLOCK_K"] = min(cfg["BLOCK_K"], pow2)
        split_k = min(cfg["SPLIT_K"], triton.cdiv(k, bk))
        cfg["SPLIT_K"] = split_k
        target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split_k)
        _int4_gemm_kernel[grid](
            x2d, packed, scales, zeros if zeros is not None else scales, bias_arg, target, m, n, k,
            x2d.stride(0), x2d.stride(1), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
            GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
            DOT_DTYPE=dot_dt, INPUT_PRECISION=precision, **cfg)
        if split_k > 1:
            reduce_splits(target, out, bias_arg if bias is not None else None)

    if interpreted:
        configs = _CONFIG_INTERPRET_SMALL_M if m <= 16 else _CONFIG_INTERPRET_LARGE_M
    else:
        configs = _CONFIGS_SMALL_M if m <= 16 else _CONFIGS_LARGE_M
    key = ("int4_linear", m_bucket(m), n, k, group_size, zeros is not None, x.dtype, bias is not None and bias.dtype)
    launch(pick_config(key, configs, launch))
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
