"""2:4 sparse linear on the compressed layout of ``hwaware.ops.packing.compress_24``.

Layout: ``values [N, K/2]`` (each group of 4 along K keeps two entries, in order) and
``meta uint8 [N, ceil(K/8)]``, one nibble per group ``i0 | i1 << 2`` (kept positions,
``i0 < i1``), two groups per byte, low nibble first.

``_sparse24_gemm_kernel`` decompresses a ``[BLOCK_N, BLOCK_K]`` weight tile in registers: for each
dense column it reads its group's nibble, and loads the kept value only where the column is one of
the group's two positions (masked gather, zeros elsewhere), then runs a dense ``tl.dot``. Global
memory traffic is the compressed bytes (values + 1/8 byte per weight of metadata), which is what
matters at small M, where the GEMM streams the weight. Float values: ``x @ W^T + bias``
(``sparse24_linear_ref``); int8 values with ``w_scale``: per-token int8 activations from
``int8_linear.quantize_per_token`` and the W8A8 epilogue of ``int8_linear``.

Also here: ``decompress_24`` (Triton, dense weight for the "dense" implementation) and the
``torch.sparse.to_sparse_semi_structured`` path (CUTLASS/cuSPARSELt, CUDA only), which export may
measure and pick.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_devices, check_tensor, dot_dtype, gemm_config, grouped_tile, is_interpreted, m_bucket, pick_config, reduce_splits, store_dtype
from .int8_linear import quantize_per_token

__all__ = ["sparse24_linear", "decompress_24", "to_semi_structured", "sparse24_linear_semi_structured"]

_FLOAT_X = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_24_tile(v_ptr, meta_ptr, rn64, n_ok, k0, K, stride_vn, stride_vk, stride_mn, stride_mk,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Dense [BLOCK_N, BLOCK_K] tile of W, columns k0 .. k0 + BLOCK_K (k0 a multiple of 8), from the
    # compressed layout: the tile's kept values [BLOCK_N, BLOCK_K/2] and nibbles are read contiguously
    # once, and each group of 4 is built in registers by placing its two values at their positions.
    rv = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # kept-value columns
    v = tl.load(v_ptr + rn64[:, None] * stride_vn + rv[None, :] * stride_vk,
                mask=n_ok[:, None] & (rv < K // 2)[None, :], other=0)
    rg = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # groups; two nibbles per meta byte, low first
    mbyte = tl.load(meta_ptr + rn64[:, None] * stride_mn + (rg // 2)[None, :] * stride_mk,
                    mask=n_ok[:, None] & (rg < K // 4)[None, :], other=0)
    nib = (mbyte.to(tl.int32) >> ((rg % 2) * 4)[None, :]) & 0xF  # [BLOCK_N, BLOCK_K/4]
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))  # first and second kept value per group
    pos = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros((BLOCK_N, BLOCK_K // 4, 4), dtype=v.dtype)
    w = tl.where(pos == (nib & 3)[:, :, None], v0[:, :, None],
                 tl.where(pos == (nib >> 2)[:, :, None], v1[:, :, None], zero))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _sparse24_gemm_kernel(
    a_ptr,  # [M, K] activations: float x (INT8 False), or int8 per-token codes (INT8 True); strides below
    v_ptr,  # [N, K/2] kept values: float, or int8 codes (INT8); strides (stride_vn, stride_vk)
    meta_ptr,  # *uint8 [N, ceil(K/8)] positions, strides (stride_mn, stride_mk)
    xs_ptr,  # *fp32 [M] per-token activation scales (INT8), else any pointer
    ws_ptr,  # *fp32 [N] per-channel weight scales (INT8), else any pointer
    bias_ptr,  # *float [N] bias (HAS_BIAS), else any pointer
    out_ptr,  # *[M, N] output (its dtype), row-major contiguous
    M, N, K,  # problem size (K = 2 * values.shape[1], a multiple of 4)
    stride_am, stride_ak,  # activation strides (elements)
    stride_vn, stride_vk,  # values strides (elements)
    stride_mn, stride_mk,  # meta strides (bytes)
    INT8: tl.constexpr,  # int8 x int8 -> int32 dot and the W8A8 dequant epilogue
    HAS_BIAS: tl.constexpr,  # add bias in the fp32 epilogue
    DOT_DTYPE: tl.constexpr,  # float path: tl.dot operand dtype (see the launcher); ignored for INT8
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands, else ignored
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile; BLOCK_K multiple of 8
    GROUP_M: tl.constexpr,  # row-tile grouping for L2 reuse of weight tiles
    SPLIT_K: tl.constexpr,  # programs along K (grid axis 1); > 1 stores raw partial sums (see below)
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    if INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(num_tiles, SPLIT_K)
    t_end = tl.minimum((pid_k + 1) * tiles_per_split, num_tiles)
    for t in range(pid_k * tiles_per_split, t_end):
        k0 = t * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=m_ok[:, None] & (rk < K)[None, :], other=0)
        w = _load_24_tile(v_ptr, meta_ptr, rn64, n_ok, k0, K, stride_vn, stride_vk, stride_mn, stride_mk,
                          BLOCK_N, BLOCK_K)
        if INT8:
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=INPUT_PRECISION)

    if SPLIT_K > 1:  # int32 (INT8: summed exactly) or fp32 partials [SPLIT_K, M, N]; the reduce adds the epilogue
        p_ptrs = out_ptr + (pid_k * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(p_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])
        return
    if INT8:
        xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    else:
        out = acc
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _cfg(bm, bn, bk, warps, stages, group_m=8, split_k=1):
    return dict(gemm_config(bm, bn, bk, warps, stages, group_m), SPLIT_K=split_k)


# Small M streams the compressed weight: narrow M tiles, and K split across programs so that the
# (N / BLOCK_N) * SPLIT_K programs keep every SM streaming (N = 4096 / BLOCK_N 64 alone is 64).
_CONFIGS_SMALL_M = [_cfg(16, 64, 128, 4, 4), _cfg(16, 64, 128, 4, 4, split_k=4), _cfg(16, 32, 128, 2, 4, split_k=4),
                    _cfg(16, 64, 256, 4, 3, split_k=4), _cfg(16, 64, 128, 4, 4, split_k=8),
                    _cfg(16, 128, 128, 4, 3, split_k=8), _cfg(32, 64, 128, 4, 4, split_k=2),
                    _cfg(16, 32, 128, 2, 4), _cfg(16, 16, 128, 1, 4), _cfg(16, 32, 256, 2, 3, split_k=2)]
_CONFIGS_LARGE_M = [_cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(128, 128, 128, 8, 3)]
# Interpreter: small tiles; small M splits K in two so CPU tests cover the split-K + reduce path.
_CONFIG_INTERPRET_SMALL_M = [_cfg(16, 16, 32, 1, 1, group_m=2, split_k=2)]
_CONFIG_INTERPRET = [_cfg(16, 16, 32, 1, 1, group_m=2)]


def _check_compressed(values: Tensor, meta: Tensor, int8_ok: bool = True) -> int:
    dtypes = _FLOAT_X + ((torch.int8,) if int8_ok else ())
    check_tensor("values", values, dtypes, (None, None), "[N, K/2] float or int8 (2:4 kept values)")
    n, k = values.shape[0], 2 * values.shape[1]
    if k % 4:
        raise ValueError(f"values must have shape [N, K/2] with K a multiple of 4, got {list(values.shape)} (K={k})")
    check_tensor("meta", meta, (torch.uint8,), (n, (k // 4 + 1) // 2), f"[N, ceil(K/8)] uint8 for K={k}")
    return k


def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, w_scale: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None) -> Tensor:
    """2:4 sparse linear on the GPU, the math of ``sparse24_linear_ref``: ``x [..., K]`` float,
    ``values [N, K/2]`` float (``x @ W^T + bias``) or int8 with ``w_scale float32 [N]`` (W8A8),
    ``meta uint8 [N, ceil(K/8)]`` -> ``[..., N]`` in ``x.dtype``. The metadata is trusted (an
    invalid nibble gives a wrong weight); ``hwaware.ops`` checks it once per weight."""
    check_tensor("x", x, _FLOAT_X, None, "[..., K] float (fp32/fp16/bf16)")
    k = _check_compressed(values, meta)
    n = values.shape[0]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K] with K = 2 * values.shape[1] = {k}, got {list(x.shape)}")
    is_int8 = values.dtype == torch.int8
    if is_int8:
        if w_scale is None:
            raise ValueError("int8 values need w_scale (float32 [N] per-channel scales); got None")
        check_tensor("w_scale", w_scale, (torch.float32,), (n,), "[N] float32")
    elif w_scale is not None:
        raise ValueError(f"w_scale is only for int8 values; values are {values.dtype}")
    if bias is not None:
        check_tensor("bias", bias, _FLOAT_X, (n,), "[N] float")
    check_devices(_sparse24_gemm_kernel, x=x, values=values, meta=meta, w_scale=w_scale, bias=bias)

    x2d = x.reshape(-1, k)
    if x2d.stride(1) != 1:  # int32 k offsets (rk * stride_ak) would overflow for big column-major views
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    interpreted = is_interpreted(_sparse24_gemm_kernel)
    # the kernel indexes bias[n] and w_scale[n] unstrided
    bias = bias.contiguous() if bias is not None else None
    w_scale = w_scale.contiguous() if w_scale is not None else None
    out = torch.empty((m, n), dtype=store_dtype(x.dtype, interpreted), device=x.device)
    if m == 0 or n == 0:
        return out.to(x.dtype).reshape(*x.shape[:-1], n)
    if is_int8:
        a, x_scale = quantize_per_token(x2d)
        dot_dt, precision = dot_dtype(torch.float32, interpreted)  # unused by the int8 path
    else:
        a, x_scale = x2d, None
        # 16-bit tensor-core dot when activations and values share the dtype; otherwise both go to
        # fp32 (exact products), since rounding one operand to the other's 16-bit type would change
        # the reference's fp32 math
        dot_dt, precision = dot_dtype(x.dtype if values.dtype == x.dtype else torch.float32, interpreted)

    xs_arg, ws_arg = (x_scale, w_scale) if is_int8 else (values, values)
    bias_arg = bias if bias is not None else values

    def launch(cfg):
        cfg = dict(cfg)
        split_k = cfg["SPLIT_K"] = min(cfg["SPLIT_K"], triton.cdiv(k, cfg["BLOCK_K"]))
        target = out if split_k == 1 else torch.empty((split_k, m, n), device=x.device,
                                                       dtype=torch.int32 if is_int8 else torch.float32)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split_k)
        _sparse24_gemm_kernel[grid](
            a, values, meta, xs_arg, ws_arg, bias_arg, target, m, n, k,
            a.stride(0), a.stride(1), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
            INT8=is_int8, HAS_BIAS=bias is not None, DOT_DTYPE=dot_dt, INPUT_PRECISION=precision, **cfg)
        if split_k > 1:
            reduce_splits(target, out, bias, x_scale, w_scale)

    if interpreted:
        configs = _CONFIG_INTERPRET_SMALL_M if m <= 16 else _CONFIG_INTERPRET
    else:
        configs = _CONFIGS_SMALL_M if m <= 64 else _CONFIGS_LARGE_M
    key = ("sparse24_linear", m_bucket(m), n, k, x.dtype, values.dtype, bias is not None and bias.dtype)
    launch(pick_config(key, configs, launch))
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


@triton.jit
def _decompress24_kernel(
    v_ptr,  # [N, K/2] kept values (any dtype), strides (stride_vn, stride_vk)
    meta_ptr,  # *uint8 [N, ceil(K/8)] positions, strides (stride_mn, stride_mk)
    out_ptr,  # [N, K] dense weight (values' dtype), row-major contiguous
    N, K,  # dense shape
    stride_vn, stride_vk, stride_mn, stride_mk,  # input strides
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    w = _load_24_tile(v_ptr, meta_ptr, rn64, n_ok, k0, K, stride_vn, stride_vk, stride_mn, stride_mk,
                      BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rn64[:, None] * K + rk[None, :], w, mask=n_ok[:, None] & (rk < K)[None, :])


def decompress_24(values: Tensor, meta: Tensor) -> Tensor:
    """Dense ``[N, K]`` weight (values' dtype) from the compressed layout; equals
    ``hwaware.ops.packing.decompress_24`` exactly (the metadata is trusted, not checked)."""
    k = _check_compressed(values, meta)
    check_devices(_decompress24_kernel, values=values, meta=meta)
    n = values.shape[0]
    out = torch.empty((n, k), dtype=values.dtype, device=values.device)
    if n == 0 or k == 0:
        return out
    bn, bk = (16, 32) if is_interpreted(_decompress24_kernel) else (32, 128)
    _decompress24_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        values, meta, out, n, k, values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
        BLOCK_N=bn, BLOCK_K=bk)
    return out


def to_semi_structured(values: Tensor, meta: Tensor):
    """``torch.sparse.to_sparse_semi_structured`` of the decompressed weight (CUDA only: CUTLASS or
    cuSPARSELt re-encode the positions in their own metadata format). Convert once per weight and
    cache it; ``hwaware.ops`` does. Float values only (torch's int8 path returns int32 without our
    per-token epilogue)."""
    _check_compressed(values, meta, int8_ok=False)
    if values.device.type != "cuda":
        raise ValueError(f"torch.sparse.to_sparse_semi_structured is CUDA-only; values are on {values.device}")
    # The backend torch picks (cuSPARSELt by default, CUTLASS when forced) has its own dtypes and
    # shape multiples: cuSPARSELt takes no fp32 at all, CUTLASS fp32 runs in TF32 (not the
    # reference's fp32 math). Refuse up front with the constraint rather than torch's RuntimeError.
    sst = torch.sparse.SparseSemiStructuredTensor
    cls = torch.sparse.SparseSemiStructuredTensorCUTLASS if sst._FORCE_CUTLASS else torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    n, k = values.shape[0], 2 * values.shape[1]
    if values.dtype == torch.float32 or values.dtype not in cls._DTYPE_SHAPE_CONSTRAINTS:
        raise ValueError(f"torch's semi-structured 2:4 path ({cls.__name__}) takes fp16/bf16 values here, got "
                         f"{values.dtype}; run kernel='triton' or 'dense' for fp32 values")
    c = cls._DTYPE_SHAPE_CONSTRAINTS[values.dtype]
    if n < c.sparse_min_rows or n % c.sparse_min_rows or k < c.sparse_min_cols or k % c.sparse_min_cols:
        raise ValueError(f"torch's semi-structured 2:4 path ({cls.__name__}) needs the [N, K] = [{n}, {k}] weight's N a "
                         f"multiple of {c.sparse_min_rows} and K a multiple of {c.sparse_min_cols} ({values.dtype}); "
                         "run kernel='triton' or 'dense' for this layer")
    return torch.sparse.to_sparse_semi_structured(decompress_24(values, meta))


def sparse24_linear_semi_structured(x: Tensor, weight, bias: Optional[Tensor] = None) -> Tensor:
    """``x [..., K] @ weight^T + bias`` with ``weight`` from :func:`to_semi_structured` (torch's
    sparse semi-structured matmul). ``x`` must have the weight's dtype (torch's kernels take one
    dtype); the output is in ``x.dtype``."""
    check_tensor("x", x, _FLOAT_X, None, "[..., K] float (fp16/bf16/fp32)")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K] with K = weight.shape[1] = {k}, got {list(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the semi-structured weight is {weight.dtype}; torch's 2:4 "
                        "kernels take one dtype, so export picks 'triton' or 'dense' for mixed dtypes")
    if bias is not None:
        check_tensor("bias", bias, _FLOAT_X, (n,), "[N] float")
        bias = bias.to(x.dtype)
    out = F.linear(x.reshape(-1, k).contiguous(), weight, bias)  # torch's 2:4 mm pads/transposes a dense x
    return out.reshape(*x.shape[:-1], n)
