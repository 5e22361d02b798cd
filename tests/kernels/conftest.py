"""Kernel tests run in Triton's interpreter on CPU tensors unless a CUDA device is present.

``TRITON_INTERPRET=1`` is set by tests/conftest.py, before anything imports triton (see there).
The tests import the kernel modules inside their bodies, so collecting them decorates nothing.
"""
import torch

if not torch.cuda.is_available():
    import triton
    import triton.language as tl

    if isinstance(tl.zeros, triton.runtime.jit.JITFunction):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its own @triton.jit "
                           "library cannot run in the interpreter; run pytest from the repository root so "
                           "tests/conftest.py sets it first, or export TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
