"""Triton GPU kernels, installed as ``hwaware.kernels`` (never as a top-level ``kernels`` module).

Kernels are pure: pointers, block sizes and launchers; they know nothing of modules or Lightning.
One op per file, each ``@triton.jit`` kernel directly above its launcher:

- ``int8_linear``: per-token int8 activation quantization + int8 tensor-core GEMM (W8A8);
- ``int4_linear``: W4A16 group-wise int4 GEMM (split-K for small M);
- ``sparse24_linear``: 2:4 compressed GEMM (float or int8 values), Triton decompression, and
  torch's semi-structured sparse path;
- ``embedding_bag_rowwise``: FBGEMM row-wise int8 / int4 embedding bags;
- ``_launch``: what the launchers share (argument checks, per-shape config choice).

``hwaware.ops`` registers the launchers as the CUDA kernels of the ``hwaware::*`` ops and imports
them on the first CUDA call. This package imports nothing itself, so it needs no triton; its
modules do. In Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before triton is first
imported) the launchers accept CPU tensors; that is how tests/kernels runs without a GPU.
"""
__all__: list = []
