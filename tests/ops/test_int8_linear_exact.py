"""``int8_linear``'s ``int_mm`` stays exact where ``torch._int_mm`` is not.

On CPUs without VNNI or AMX, oneDNN's s8s8s32 gemm (``torch._int_mm``) multiplies the codes + 128
by the weights in int16 pairs that saturate, so its int32 product is wrong for large codes. The op
then multiplies the codes as an fp32 GEMM in K-chunks whose sums fp32 holds exactly. These tests
run that path against the reference here, and run a process whose oneDNN is capped at AVX2 (the
kernels such a CPU runs), where the probe must see the saturation and the op must stay exact."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hwaware.ops as ops
from hwaware.ops.reference import int8_linear_ref
from hwaware.quant import native
from tests.helpers import int8_layers, use_int8_engine


@pytest.fixture
def fp32_product(monkeypatch):
    """The op with every native engine off and torch._int_mm treated as saturating."""
    use_int8_engine(monkeypatch, None)
    monkeypatch.setattr(ops, "_INT_MM_EXACT", False)


def _full_range(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    qw[0], qw[1] = 127, -127
    x = torch.randn(19, k, generator=g)
    x[0], x[1] = 1.0, -1.0  # codes of +-127 against rows of +-127: the sums saturating kernels get wrong
    return x, qw, torch.rand(n, generator=g) * 1e-3, torch.randn(n, generator=g)


@pytest.mark.parametrize("k", [1, 63, 1024, 1025, 3000])
def test_the_fp32_product_is_the_exact_product(fp32_product, k):
    x, qw, s, b = _full_range(24, k)
    got = ops.int8_linear(x, qw, s, b, "int_mm")
    assert torch.equal(got, int8_linear_ref(x, qw, s, b))
    assert got[0, 0].item() == pytest.approx(127 * k * (1 / 127) * 127 * s[0].item() + b[0].item(), rel=1e-5)


def test_a_chain_on_the_fp32_product_equals_the_layers_in_turn(fp32_product):
    qws, scales, biases = int8_layers((367, 256, 128))
    x = torch.randn(70, 367)
    got = ops.int8_mlp(x, qws, scales, biases, [True, False])
    want = int8_linear_ref(torch.relu(int8_linear_ref(x, qws[0], scales[0], biases[0])), qws[1], scales[1], biases[1])
    assert torch.equal(got, want)


def test_lowered_fp32_matmul_precision_takes_float64(fp32_product):
    x, qw, s, b = _full_range(24, 2000)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert not ops._fp32_matmul_is_ieee()
        got = ops.int8_linear(x, qw, s, b, "int_mm")
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(got, int8_linear_ref(x, qw, s, b))


_CAPPED = """
import json, torch
import hwaware.ops as ops
from hwaware.ops.reference import int8_linear_ref
from hwaware.quant import native
a = torch.full((4, 256), 127, dtype=torch.int8)
b = torch.full((256, 8), 127, dtype=torch.int8)
raw_exact = torch.equal(torch._int_mm(a, b), (a.double() @ b.double()).to(torch.int32))
g = torch.Generator().manual_seed(1)
qw = torch.randint(-127, 128, (48, 600), dtype=torch.int8, generator=g)
qw[0] = 127
x = torch.randn(33, 600, generator=g)
x[0] = 1.0
s, bias = torch.rand(48, generator=g) * 1e-3, torch.randn(48, generator=g)
op_exact = torch.equal(ops.int8_linear(x, qw, s, bias, "int_mm"), int8_linear_ref(x, qw, s, bias))
print(json.dumps({"engine": native.int8_engine(), "probe": ops._int_mm_exact_here(), "raw_exact": raw_exact,
                  "op_exact": op_exact}))
"""


def test_with_onednn_capped_at_avx2_the_op_stays_exact(tmp_path):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("oneDNN's ISA cap is an x86 switch")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "HWAWARE_NO_AMX": "1", "HWAWARE_NO_VNNI": "1",
           "HWAWARE_NO_VPMADDWD": "1"}
    out = subprocess.run([sys.executable, "-c", _CAPPED], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["engine"] is None  # the torch._int_mm passes, as on an AVX2 CPU
    assert r["probe"] == r["raw_exact"]  # the probe sees what a direct call shows
    assert r["op_exact"]
