"""What every Triton launcher here shares: argument checks and the choice of a launch config.

Config choice. Each launcher lists configs per shape class (e.g. small M, where the GEMM is a
weight-streaming GEMV and split-K keeps the SMs busy, vs large M, where big tiles reuse operands).
On a GPU the first call for a shape key times every config of its class with
``triton.testing.do_bench`` and caches the fastest for that key (process-wide). Under
``TRITON_INTERPRET=1`` (CPU tests) nothing is timed: the launcher's single small interpreter config
runs, so tests stay fast. ``HWAWARE_TRITON_AUTOTUNE=0`` skips timing on the GPU too (first config
of the class), and nothing is timed while a CUDA graph is being captured (timing would launch
outside the capture's rules), so the first config of the class is used there.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Hashable, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["is_interpreted", "pick_config", "check_tensor", "check_devices", "m_bucket", "dot_dtype", "store_dtype",
           "reduce_splits"]

_BEST: Dict[Hashable, dict] = {}


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (Triton reads the variable at
    decoration time, so the kernel object, not today's environment, says how it runs)."""
    return not isinstance(kernel, triton.runtime.jit.JITFunction)


def m_bucket(m: int) -> int:
    """Rows rounded up to a power of two: the M part of a tuning key (one timing per bucket)."""
    return 1 << max(0, (m - 1).bit_length())


def pick_config(key: Hashable, configs: Sequence[dict], launch: Callable[[dict], None]) -> dict:
    """The fastest of ``configs`` for ``key`` (timed once, then cached); ``configs[0]`` when there is
    one config, when autotuning is off, or during CUDA graph capture. ``launch(cfg)`` runs the whole
    op (kernel + any reduction pass) with ``cfg`` so split-K configs are timed with their reduction."""
    if len(configs) == 1 or os.environ.get("HWAWARE_TRITON_AUTOTUNE", "1") == "0":
        return configs[0]
    if torch.cuda.is_available():  # picks are per GPU (a process may drive different kinds)
        key = (key, torch.cuda.current_device())
    best = _BEST.get(key)
    if best is not None:
        return best
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return configs[0]
    from triton.testing import do_bench

    times = []
    for cfg in configs:
        try:
            times.append(do_bench(lambda: launch(cfg), warmup=5, rep=20))
        # shared memory for the stages (OutOfResources), or a config ptxas refuses (e.g. registers)
        except (triton.runtime.errors.OutOfResources, triton.runtime.errors.PTXASError, triton.CompilationError):
            times.append(math.inf)
    if all(t == math.inf for t in times):
        raise RuntimeError(f"no launch config of {key!r} compiled on this device; tried {list(configs)}")
    best = configs[min(range(len(configs)), key=times.__getitem__)]
    _BEST[key] = best
    return best


def check_tensor(name: str, t, dtypes: Sequence[torch.dtype], shape: Optional[tuple], expected: str) -> None:
    """TypeError / ValueError naming ``t``, its dtype or shape, and what was expected.
    ``shape`` entries of ``None`` match any size; ``shape=None`` skips the shape check."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {expected}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {expected} (dtype in {[str(d) for d in dtypes]}), got dtype {t.dtype}")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and a != s for a, s in zip(t.shape, shape))):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {expected} = {want}, got {list(t.shape)}")


def check_devices(kernel, **tensors: Optional[Tensor]) -> torch.device:
    """All given tensors on one device; CUDA unless the kernel runs in the interpreter (where Triton
    reads CPU memory). A compiled kernel handed CPU tensors would otherwise fail deep in the launch."""
    live = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in live.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k}: {t.device}" for k, t in live.items())
        raise ValueError(f"all tensors must be on one device, got {{{where}}}")
    device = devices.pop()
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
                         "hwaware.kernels to run them on CPU tensors in Triton's interpreter")
    return device


def dot_dtype(dtype: torch.dtype, interpreted: bool):
    """Operand dtype for ``tl.dot`` on ``dtype`` inputs, and its ``input_precision``.

    fp32 runs with ``input_precision="ieee"`` (not TF32) because the references compute in fp32.
    bf16 operands are upcast to fp32 in the interpreter only: Triton 3.9's interpreter multiplies
    bf16 as their raw uint16 bit patterns (numpy has no bf16), and on a GPU a bf16 ``tl.dot`` gives
    exact products with fp32 accumulation, the same numbers the upcast gives.
    """

    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16 and not interpreted:
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"


def store_dtype(dtype: torch.dtype, interpreted: bool) -> torch.dtype:
    """Dtype of the buffer a kernel stores an output of ``dtype`` into.

    Triton 3.9's interpreter converts fp32 to bf16 by truncation (the GPU rounds to nearest even),
    so under the interpreter bf16 outputs are stored as fp32 and rounded by torch afterwards; the
    numbers then match what the GPU stores.
    """
    return torch.float32 if (interpreted and dtype == torch.bfloat16) else dtype


def gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> dict:
    """A GEMM launch config: tile (BLOCK_M/N/K), GROUP_M (programs along M sharing a column of N
    tiles, for L2 reuse), warps and pipeline stages."""
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program on a 1-D grid, in groups of GROUP_M row tiles: consecutive
    programs walk down a column of N tiles, so they reuse the same weight tile from L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    return pid_m, pid_n


@triton.jit
def _splitk_reduce_kernel(
    part_ptr,  # [SPLIT_K, M*N] partial sums: int32 (SCALED) or fp32
    xs_ptr,  # *fp32 [M] per-token activation scales (SCALED), else any pointer
    ws_ptr,  # *fp32 [N] per-channel weight scales (SCALED), else any pointer
    bias_ptr,  # *float [N] bias (HAS_BIAS), else any pointer
    out_ptr,  # *[M*N] output (its dtype), row-major contiguous
    MN, N,  # M*N elements; N to find each element's row and column
    SPLIT_K: tl.constexpr,  # number of partials to sum (fixed order: deterministic)
    SCALED: tl.constexpr,  # int32 partials of an int8 x int8 product: summed exactly, then * xs[m] * ws[n]
    HAS_BIAS: tl.constexpr,  # add bias after the sum
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    if SCALED:
        acc = tl.zeros((BLOCK,), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
    MN64 = MN.to(tl.int64)  # s * MN passes 2^31 for SPLIT_K * M * N elements above it
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN64 + offs, mask=ok, other=0)
    if SCALED:
        out = acc.to(tl.float32) * tl.load(xs_ptr + offs // N, mask=ok, other=0.0) * tl.load(ws_ptr + offs % N, mask=ok, other=0.0)
    else:
        out = acc
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def reduce_splits(partials: Tensor, out: Tensor, bias: Optional[Tensor] = None, x_scale: Optional[Tensor] = None,
                  w_scale: Optional[Tensor] = None) -> None:
    """``out [M, N] = sum(partials [SPLIT_K, M, N])`` (+ bias[n]) in a fixed order, the second pass of a
    split-K GEMM; int32 partials (an int8 product) are summed exactly and scaled by
    ``x_scale[m] * w_scale[n]`` (contiguous fp32), as the one-pass W8A8 epilogue. Every tensor is on
    ``out``'s device; bias and scales are indexed unstrided."""
    split_k, m, n = partials.shape
    scaled = partials.dtype == torch.int32
    any_ptr = out
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        partials, x_scale if scaled else any_ptr, w_scale if scaled else any_ptr,
        bias if bias is not None else any_ptr, out, m * n, n,
        SPLIT_K=split_k, SCALED=scaled, HAS_BIAS=bias is not None, BLOCK=block)
