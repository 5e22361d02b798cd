"""W8A8 linear: dynamic per-token int8 activations x per-channel int8 weights, int32 accumulate.

Two kernels: ``_quantize_per_token_kernel`` (one program per row) writes int8 codes and a scale per
row, exactly as ``hwaware.ops.reference.quantize_per_token_ref``; ``_int8_gemm_kernel`` multiplies
them with the int8 weight on tensor cores (``tl.dot`` int8 -> int32) and dequantizes in the
epilogue: ``acc * s_x[m] * s_w[n] + bias``, optional ReLU, stored in ``x.dtype``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_devices, check_tensor, gemm_config, grouped_tile, is_interpreted, m_bucket, pick_config, store_dtype

__all__ = ["quantize_per_token", "int8_linear", "int8_matmul_dequant"]

_FLOAT_X = (torch.float32, torch.float16, torch.bfloat16)
_FP32_EPS = torch.finfo(torch.float32).eps


@triton.jit
def _round_half_even(y):
    # torch.round semantics (ties to even) with plain ops: libdevice.rint does not run in Triton's
    # interpreter. Work on |y| (rounding is odd-symmetric): y - floor(y) is exact for |y| >= 0
    # (Sterbenz for |y| >= 1, trivially below), so the tie test below is exact.
    a = tl.abs(y)
    f = tl.floor(a)
    d = a - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
    return tl.where(y < 0, -r, r)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr,  # *fp16|bf16|fp32 [M, K] activations, strides (stride_xm, stride_xk)
    q_ptr,  # *int8 [M, K] out: codes in [-127, 127], row-major contiguous
    scale_ptr,  # *fp32 [M] out: max|x_m| / 127, clamped to fp32 eps (all-zero rows give codes 0)
    K,  # columns
    stride_xm,  # elements between rows of x
    stride_xk,  # elements between columns of x
    BLOCK_K: tl.constexpr,  # columns per step; the row is read twice (max pass, quantize pass)
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_K,), dtype=tl.float32)  # 1 where an entry is NaN or infinite
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols * stride_xk, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))  # (maxnum: a NaN does not reach amax; `bad` notes it)
        bad = tl.maximum(bad, tl.where(tl.abs(x) <= 3.4028234663852886e+38, 0.0, 1.0))
    # div_rn: IEEE-rounded division as torch's (Triton's `/` on fp32 is an approximate div.full on
    # NVIDIA); with fp fusion off at launch, scale, 1/scale and x * (1/scale) round exactly as the
    # reference, so the codes are bit-identical to quantize_per_token_ref.
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), 1.1920928955078125e-07)
    # a row holding NaN or inf: a NaN scale, so its outputs are NaN, as the CPU op's (not finite
    # numbers from the rest of the row)
    scale = tl.where(tl.max(bad, axis=0) > 0.0, float("nan"), scale)
    inv = tl.math.div_rn(1.0, scale)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols * stride_xk, mask=cols < K, other=0.0).to(tl.float32)
        q = _round_half_even(x * inv)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + cols, q.to(tl.int8), mask=cols < K)


def quantize_per_token(x2d: Tensor):
    """``x2d [M, K]`` float -> ``(q int8 [M, K], scale float32 [M])``, bit-identical to
    ``quantize_per_token_ref`` (symmetric, round half to even, clamp to [-127, 127]) on finite rows;
    a row holding NaN or inf gets a NaN scale, as the CPU op's per-token pass gives it."""
    check_tensor("x2d", x2d, _FLOAT_X, (None, None), "[M, K] float")
    check_devices(_quantize_per_token_kernel, x2d=x2d)
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        # a column-major view: the kernel's int32 column offsets (cols * stride_xk) would overflow
        # once K * stride_xk >= 2^31 (M * K elements), and strided rows read uncoalesced anyway
        x2d = x2d.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x2d.device)
    if m == 0:
        return q, scale
    if k == 0:
        return q, scale.fill_(_FP32_EPS)
    block_k = min(4096 if not is_interpreted(_quantize_per_token_kernel) else 128, triton.next_power_of_2(k))
    _quantize_per_token_kernel[(m,)](
        x2d, q, scale, k, x2d.stride(0), x2d.stride(1), BLOCK_K=block_k,
        num_warps=4 if block_k <= 1024 else 8, enable_fp_fusion=False)
    return q, scale


@triton.jit
def _int8_gemm_kernel(
    q_ptr,  # *int8 [M, K] per-token activation codes, row-major contiguous
    w_ptr,  # *int8 [N, K] weight codes, strides (stride_wn, stride_wk)
    xs_ptr,  # *fp32 [M] per-token activation scales
    ws_ptr,  # *fp32 [N] per-channel weight scales
    bias_ptr,  # *float [N] bias (any float dtype), or any pointer when HAS_BIAS is False
    out_ptr,  # *fp16|bf16|fp32 [M, N] output, row-major contiguous; its dtype is the output dtype
    M, N, K,  # problem size
    stride_wn,  # elements between weight rows
    stride_wk,  # elements between weight columns
    HAS_BIAS: tl.constexpr,  # add bias in the fp32 epilogue
    APPLY_RELU: tl.constexpr,  # max(0, .) after the bias
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the K loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile; BLOCK_K >= 32 for int8 MMA
    GROUP_M: tl.constexpr,  # row-tile grouping so consecutive programs share weight tiles in L2
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = q_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    b_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0)
        else:
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # exact: |acc| <= K * 127^2 < 2^31 for K < 133k
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk

    xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if APPLY_RELU:
        out = tl.maximum(out, 0.0)
    o_ptrs = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_cfg = gemm_config


# Small M (decode-like, <= 64 rows): weight streaming dominates, so narrow M tiles and narrow N
# tiles too (N = 4096 / BLOCK_N 32 = 128 programs, about one per SM on an H100's 132).
_CONFIGS_SMALL_M = [_cfg(16, 64, 128, 4, 4), _cfg(16, 32, 128, 2, 4), _cfg(16, 32, 256, 4, 3),
                    _cfg(16, 128, 128, 4, 4), _cfg(32, 64, 256, 4, 3), _cfg(64, 64, 128, 4, 4)]
# Large M: tensor-core bound; big tiles (the usual int8 MMA shapes on sm80/sm90). Smaller tiles too:
# at M = 256, N = 4096 a 128 x 128 tile makes 64 programs for an H100's 132 SMs (measured there at
# 1.03x fp16 cuBLAS with the big tiles alone), so half the GPU idled.
_CONFIGS_LARGE_M = [_cfg(128, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3),
                    _cfg(64, 128, 128, 4, 4), _cfg(128, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3),
                    _cfg(64, 64, 128, 4, 4), _cfg(128, 64, 128, 4, 4), _cfg(64, 128, 256, 4, 3)]
_CONFIG_INTERPRET = [_cfg(16, 16, 32, 1, 1, group_m=2)]  # small, so the CPU interpreter stays fast


def int8_matmul_dequant(q: Tensor, x_scale: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                        out_dtype: torch.dtype, relu: bool = False) -> Tensor:
    """``(q [M, K] int8 @ qweight[N, K]^T) * x_scale[:, None] * w_scale[None, :] + bias`` -> ``out_dtype [M, N]``."""
    m, k = q.shape
    n = qweight.shape[0]
    q, x_scale = q.contiguous(), x_scale.contiguous()  # the kernel indexes q rows by K and x_scale by m
    interpreted = is_interpreted(_int8_gemm_kernel)
    out = torch.empty((m, n), dtype=store_dtype(out_dtype, interpreted), device=q.device)
    if m == 0 or n == 0:
        return out.to(out_dtype)

    def launch(cfg):
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _int8_gemm_kernel[grid](
            q, qweight, x_scale, w_scale, bias if bias is not None else w_scale, out, m, n, k,
            qweight.stride(0), qweight.stride(1),
            HAS_BIAS=bias is not None, APPLY_RELU=relu, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg)

    configs = _CONFIG_INTERPRET if interpreted else (_CONFIGS_SMALL_M if m <= 64 else _CONFIGS_LARGE_M)
    key = ("int8_linear", m_bucket(m), n, k, out_dtype, bias is not None and bias.dtype, relu)
    launch(pick_config(key, configs, launch))
    return out.to(out_dtype)


def int8_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                relu: bool = False) -> Tensor:
    """W8A8 linear on the GPU: ``x [..., K]`` float, ``qweight int8 [N, K]``, ``w_scale float32 [N]``,
    ``bias [N]?`` -> ``[..., N]`` in ``x.dtype``; the math of ``int8_linear_ref`` (+ ReLU if asked)."""
    check_tensor("x", x, _FLOAT_X, None, "[..., K] float (fp32/fp16/bf16)")
    check_tensor("qweight", qweight, (torch.int8,), (None, None), "[N, K] int8 (symmetric, [-127, 127])")
    n, k = qweight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K] with K = qweight.shape[1] = {k}, got {list(x.shape)}")
    check_tensor("w_scale", w_scale, (torch.float32,), (n,), "[N] float32")
    if bias is not None:
        check_tensor("bias", bias, _FLOAT_X, (n,), "[N] float")
    check_devices(_int8_gemm_kernel, x=x, qweight=qweight, w_scale=w_scale, bias=bias)
    x2d = x.reshape(-1, k)  # a view when possible; the quantize kernel takes strides
    q, x_scale = quantize_per_token(x2d)
    out = int8_matmul_dequant(q, x_scale, qweight, w_scale.contiguous(),
                              None if bias is None else bias.contiguous(), x.dtype, relu)
    return out.reshape(*x.shape[:-1], n)
