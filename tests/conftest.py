"""Session-wide test setup that must run before anything imports triton.

Without a CUDA device the Triton kernels (tests/kernels) run in Triton's CPU interpreter. Triton
reads ``TRITON_INTERPRET`` when it decorates each ``@triton.jit`` function, including its own
standard library (``tl.zeros``, ``tl.max``, ``tl.sum``) at ``import triton``, and other test
modules import triton early (``pytorch_lightning`` does), so the variable is set here, in the
root conftest, which pytest loads before it collects any test module. Nothing else in the suite
uses triton on CPU (torch.compile on CPU generates C++), so the setting affects only the kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
