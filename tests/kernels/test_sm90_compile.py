"""Every kernel compiles for an H100 (sm90) on this GPU-less machine, tensor-core kernels lower to
MMA instructions, and each fits in sm90 shared memory. Runs tests/kernels/sm90_compile.py in a fresh
process: this session has Triton in interpreter mode, and compiling needs it off."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "sm90_compile.py")
SHARED_LIMIT = 232448
TENSOR_CORE = {"int8_gemm", "int4_gemm"}  # fp16/bf16/int8 operands; 2:4 with fp32 values runs on FMA


def _has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return bool(get_ptxas(90))
    except Exception:
        return False


@pytest.mark.skipif(not _has_ptxas(), reason="triton without its NVIDIA backend / bundled ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in results} == {"quantize_per_token", "int8_gemm", "int4_gemm", "splitk_reduce",
                                              "sparse24_gemm", "decompress24", "embedding_bag_rowwise"}
    failed = [r for r in results if "error" in r]
    assert not failed, failed
    too_big = [r for r in results if r["shared"] > SHARED_LIMIT]
    assert not too_big, too_big
    for r in results:
        if r["kernel"] in TENSOR_CORE or (r["kernel"] == "sparse24_gemm" and not r["variant"].startswith("fp32")):
            assert r["mma"] in ("mma", "wgmma"), r  # a tl.dot that fell back to FMA would be 10x slower
