"""CUDA implementations of the ``hwaware::*`` ops: the Triton launchers of ``hwaware.kernels``.

Imported at the bottom of :mod:`hwaware.ops`. Triton and the kernel modules are imported lazily,
inside the first CUDA call, because
- ``import hwaware`` must work where triton is not installed (CPU-only deployments); a CUDA tensor
  there raises a RuntimeError that says to ``pip install triton``, never a silent CPU fallback;
- Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function (its own library at
  ``import triton``, each kernel module at its import), so nothing here decorates kernels as a
  side effect of ``import hwaware``. To run the kernels in the interpreter, set the variable
  before triton is first imported (pytorch_lightning imports it: before ``import hwaware``).

Each CUDA function validates its inputs with the same checks as the CPU kernel (so both devices
refuse the same inputs with the same messages), then calls the launcher.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hwaware.ops import (
    INT8_KERNELS,
    SPARSE24_KERNELS,
    _CACHE,
    _check_embedding_bag,
    _check_int4_linear,
    _check_int4_values,
    _check_int8_kernel,
    _check_int8_linear,
    _check_sparse24_kernel,
    _check_sparse24_linear,
    _index_dtypes,
    _int8_dequantized,
    _linear_fp32,
    embedding_bag_rowwise,
    int4_linear,
    int8_linear,
    sparse24_linear,
)
from hwaware.ops.packing import check_24_meta

# "triton": kernels/sparse24_linear.py decompresses the 2:4 tile in registers (float or int8 values);
# "torch_semi_structured": torch.sparse.to_sparse_semi_structured (CUTLASS / cuSPARSELt; float values
#   whose dtype matches x), converted once per weight and cached;
# "dense": decompressed once (cached) to the dense weight, then cuBLAS F.linear (float values) or the
#   Triton W8A8 int8_linear kernel (int8 values).
# Export measures these on the deployment GPU and records the pick in the artifact.
# "dequant": int8 values dequantized once, fp32 F.linear on the float input (a layer QAT trained weight-only)
SPARSE24_KERNELS["cuda"] = ("triton", "torch_semi_structured", "dense", "dequant")
# "triton": kernels/int8_linear.py, per-token quantization kernel + int8 tl.dot GEMM (the exact math);
# "dequant": the int8 weight dequantized once, fp32 F.linear on the float input (weight-only layers)
INT8_KERNELS["cuda"] = ("triton", "dequant")


def _kernels(name: str):
    """``hwaware.kernels.<name>``, importing triton first so a missing install fails with advice."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"hwaware::{name} on CUDA tensors runs a Triton kernel, but triton is not importable ({e}); "
            "install it with `pip install triton` (or `pip install hwaware[dev]`), or run on CPU tensors") from e
    return importlib.import_module(f"hwaware.kernels.{name}")


def _on(t: Tensor):
    """Make ``t``'s GPU the current device for the launch. A Triton launch goes to the *current*
    device and its stream (torch's custom-op dispatcher sets no device guard for Python kernels), so
    tensors on ``cuda:1`` while ``cuda:0`` is current would be read through the wrong context."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _capturing() -> bool:
    # host syncs (a .cpu() / .tolist()) are illegal while a CUDA graph is being captured
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@int8_linear.register_kernel("cuda")
def _int8_linear_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor], impl: str = "auto",
                      relu: bool = False) -> Tensor:
    _check_int8_linear(x, qweight, w_scale, bias)
    _check_int8_kernel(impl, "cuda", qweight.shape[1])
    if impl == "dequant":  # a layer QAT trained weight-only: its input stays float, as on CPU
        return _linear_fp32(x, _int8_dequantized(qweight, w_scale), bias, relu)
    with _on(x):
        out = _kernels("int8_linear").int8_linear(x, qweight, w_scale, bias)
    return out.relu_() if relu else out  # not fused into the Triton epilogue yet: one more pass on GPU


@int4_linear.register_kernel("cuda")
def _int4_linear_cuda(x: Tensor, packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                      bias: Optional[Tensor]) -> Tensor:
    _check_int4_linear(x, packed, scales, zeros, group_size, bias)
    if not _capturing():  # the CPU op's value checks, once per weight (a host sync: not inside a graph capture)
        _CACHE.get((scales,) if zeros is None else (scales, zeros), ("int4_values_ok",),
                   lambda: _check_int4_values(scales, zeros) or True)
    with _on(x):
        return _kernels("int4_linear").int4_linear(x, packed, scales, zeros, group_size, bias)


@embedding_bag_rowwise.register_kernel("cuda")
def _embedding_bag_rowwise_cuda(weight: Tensor, bits: int, dim: int, indices: Tensor, offsets: Tensor, mode: int,
                                per_sample_weights: Optional[Tensor], include_last_offset: bool) -> Tensor:
    _check_embedding_bag(weight, bits, dim, indices, offsets, mode, per_sample_weights, include_last_offset)
    indices, offsets = _index_dtypes(indices, offsets)
    # check_indices: IndexError / ValueError on bad index or offset values, as the CPU op (one sync).
    # Not while a CUDA graph is captured, where a sync is illegal: the kernel then skips
    # out-of-range indices (never reads out of bounds), as with check_indices=False.
    with _on(weight):
        return _kernels("embedding_bag_rowwise").embedding_bag_rowwise(
            weight, bits, dim, indices, offsets, mode, per_sample_weights, include_last_offset,
            check_indices=not _capturing())


@sparse24_linear.register_kernel("cuda")
def _sparse24_linear_cuda(x: Tensor, values: Tensor, meta: Tensor, w_scale: Optional[Tensor], bias: Optional[Tensor],
                          kernel: str) -> Tensor:
    _check_sparse24_linear(x, values, meta, w_scale, bias, kernel)
    _check_sparse24_kernel(kernel, "cuda")
    with _on(x):
        return _sparse24_linear_cuda_impl(x, values, meta, w_scale, bias, kernel)


def _sparse24_linear_cuda_impl(x: Tensor, values: Tensor, meta: Tensor, w_scale: Optional[Tensor],
                               bias: Optional[Tensor], kernel: str) -> Tensor:
    mod = _kernels("sparse24_linear")
    k = 2 * values.shape[1]
    # The kernels trust the metadata; check it once per weight (a host copy of N*K/8 bytes), cached.
    # Skipped while a CUDA graph is captured (no host copy allowed there; run the layer once before
    # capture to check it): a bad nibble only selects a wrong position inside its own group, never
    # an out-of-bounds read.
    if not _capturing():
        _CACHE.get((meta,), ("sparse24_meta_ok", k), lambda: check_24_meta(meta.cpu(), k) or True)
    is_int8 = values.dtype == torch.int8
    if kernel == "dequant":  # int8 values of a layer QAT trained weight-only: float input, as on CPU
        w = _CACHE.get((values, meta, w_scale) if is_int8 else (values, meta), ("sparse24_dequant_cuda",),
                       lambda: mod.decompress_24(values, meta).float() * (w_scale[:, None] if is_int8 else 1))
        return _linear_fp32(x, w, bias)
    if kernel == "triton":
        return mod.sparse24_linear(x, values, meta, w_scale, bias)
    if kernel == "torch_semi_structured":
        if is_int8:
            raise ValueError("kernel='torch_semi_structured' takes float values; int8 2:4 layers run "
                             "kernel='triton' or 'dense'")
        w = _CACHE.get((values, meta), ("sparse24_semi_structured",), lambda: mod.to_semi_structured(values, meta))
        return mod.sparse24_linear_semi_structured(x, w, bias)
    # "dense"
    if is_int8:
        w = _CACHE.get((values, meta), ("sparse24_dense_cuda",), lambda: mod.decompress_24(values, meta))
        return _kernels("int8_linear").int8_linear(x, w, w_scale, bias)
    if values.dtype == x.dtype:
        w = _CACHE.get((values, meta), ("sparse24_dense_cuda",), lambda: mod.decompress_24(values, meta))
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    # mixed dtypes: the reference's fp32 math (rounding either operand to the other's 16-bit type would not be)
    w = _CACHE.get((values, meta), ("sparse24_dense_cuda_fp32",), lambda: mod.decompress_24(values, meta).float())
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
