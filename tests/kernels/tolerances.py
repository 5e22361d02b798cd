"""How close a Triton kernel must come to its pure-torch reference, and why.

Where the math is integer (int8 codes, the int32 accumulator, dequantized table rows for max), the
kernels are bit-exact and tests use ``atol=0, rtol=0``. Elsewhere the only differences are float
rounding: the fp32 accumulation order of a dot or bag sum, and the fp32 epilogue (``acc * s_x * s_w
+ bias``) against the reference's float64 one. Those are a few fp32 roundings of values no larger
than the largest output, then one rounding to the output dtype, so the bound is one unit in the
last place of the output dtype at the scale of the largest output (``eps * max|ref|``), with 8x
headroom for fp32 (several fp32 roundings add up; a real bug, e.g. a wrong nibble or group, misses
it by orders of magnitude). Measured in the interpreter: fp16/bf16 outputs match exactly, fp32
ones within ~2 fp32 ulp of max|ref|.
"""
import torch

# torch's own 16-bit GEMMs (cuBLAS, CUTLASS 2:4), compared where they are a contender: they add the
# bias in 16 bits and may reduce split-K partials in 16 bits, so no ulp bound holds; a 16-bit
# output of a correct GEMM is ~60-70 dB from the fp32 reference (bf16 ~50), a wrong one near 0 dB.
MIN_SQNR_16BIT_LIBRARY_DB = 40.0

ULP = {torch.float32: 8 * torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor) -> None:
    """``out`` within one output-dtype ulp of ``ref`` at the scale of ``max|ref|`` (see module doc)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    tol = ULP[out.dtype] * max(float(ref.abs().max()), 1e-30) if ref.numel() else 0.0
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=tol, rtol=0)
