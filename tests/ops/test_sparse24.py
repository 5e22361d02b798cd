"""2:4 compressed format and ``hwaware::sparse24_linear``: exact round trips, the op against its
reference and against the dense ops on the same weights, opcheck, compile and export."""
import pytest
import torch

import hwaware.ops  # noqa: F401
from hwaware.ops.packing import (
    VALID_24_NIBBLES, check_24_meta, compress_24, decompress_24, is_24, pack_int4, quantize_int8_weight,
)
from hwaware.ops.reference import int8_linear_ref, sparse24_linear_ref
from hwaware.quant.primitives import sqnr_db
from hwaware.sparsity import magnitude_mask_24

op = torch.ops.hwaware.sparse24_linear


def _sparse(n, k, seed=0, dtype=torch.float32):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return (w * magnitude_mask_24(w)).to(dtype)


def test_meta_byte_layout():
    w = torch.zeros(1, 12)
    w[0, [1, 3]] = torch.tensor([5.0, 6.0])  # group 0: positions (1, 3) -> nibble 1 | 3 << 2 = 13
    w[0, [4, 6]] = torch.tensor([7.0, 8.0])  # group 1: (0, 2) -> 8
    w[0, 11] = 9.0  # group 2: one non-zero at 3, padded with the lowest free position 0 -> (0, 3) = 12
    values, meta = compress_24(w)
    assert values.tolist() == [[5.0, 6.0, 7.0, 8.0, 0.0, 9.0]]
    assert meta.tolist() == [[13 | 8 << 4, 12]]  # low nibble first; odd group count pads a 0 nibble
    assert torch.equal(decompress_24(values, meta), w)


@pytest.mark.parametrize("shape", [(1, 4), (5, 12), (16, 64), (3, 36)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_round_trip_exact(shape, dtype):
    if dtype == torch.int8:
        w = (_sparse(*shape) * 40).round().clamp(-127, 127).to(torch.int8)
    else:
        w = _sparse(*shape, dtype=dtype)
    w[0, :4] = 0  # an all-zero group
    values, meta = compress_24(w)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert meta.shape == (shape[0], (shape[1] // 4 + 1) // 2) and meta.dtype == torch.uint8
    check_24_meta(meta, shape[1])
    assert torch.equal(decompress_24(values, meta), w) and is_24(w)


def test_compress_refuses_dense_groups_and_bad_k():
    w = _sparse(4, 8)
    w[2, 5] = 1.0  # third non-zero in a group... unless that position was kept
    w[2, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"row 2, columns 4\.\.7 hold 3 non-zeros"):
        compress_24(w)
    with pytest.raises(ValueError, match=r"K=6 must be a multiple of 4"):
        compress_24(torch.zeros(2, 6))
    assert not is_24(torch.ones(2, 8)) and not is_24(torch.zeros(2, 6))


@pytest.mark.parametrize("nibble", [n for n in range(16) if n not in VALID_24_NIBBLES])
def test_meta_breaking_the_rule_is_refused(nibble):
    values, meta = compress_24(_sparse(3, 16))
    codes = torch.tensor([[VALID_24_NIBBLES[0]] * 4] * 3, dtype=torch.uint8)
    codes[1, 2] = nibble
    with pytest.raises(ValueError, match=r"breaks the 2:4 rule: row 1, columns 8\.\.11"):
        decompress_24(values, pack_int4(codes))


@pytest.mark.parametrize("kernel", ["dense", "csr"])
@pytest.mark.parametrize("lead", [(7,), (2, 3), (1,), (0,)])
@pytest.mark.parametrize("bias", [True, False])
def test_float_op_vs_reference(kernel, lead, bias):
    w = _sparse(24, 40)
    values, meta = compress_24(w)
    x = torch.randn(*lead, 40, generator=torch.Generator().manual_seed(1))
    b = torch.randn(24) if bias else None
    out = op(x, values, meta, None, b, kernel)
    ref = sparse24_linear_ref(x, values, meta, None, b)
    assert out.shape == (*lead, 24)
    if kernel == "dense":  # the same F.linear on the same dense weight
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:  # a different summation order over the same products
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_int8_op_is_exactly_the_int8_linear_op_on_the_same_codes():
    w = _sparse(32, 64, seed=3)
    q, s = quantize_int8_weight(w)
    values, meta = compress_24(q)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(2))
    b = torch.randn(32)
    out = op(x, values, meta, s, b, "dense")
    torch.testing.assert_close(out, torch.ops.hwaware.int8_linear(x, q, s, b, "int_mm"), atol=0, rtol=0)
    fb = op(x, values, meta, s, b, "fbgemm")
    torch.testing.assert_close(fb, torch.ops.hwaware.int8_linear(x, q, s, b, "fbgemm"), atol=0, rtol=0)
    dq = op(x, values, meta, s, b, "dequant")
    torch.testing.assert_close(dq, torch.ops.hwaware.int8_linear(x, q, s, b, "dequant"), atol=0, rtol=0)
    # and the W8A8 math: per-token int8 x per-channel int8, the reference exactly ("dense" = int_mm)
    # or within fbgemm's per-tensor error (SQNR like tests/ops int8_linear)
    assert torch.equal(sparse24_linear_ref(x, values, meta, s, b), out)
    assert sqnr_db(sparse24_linear_ref(x, values, meta, s, b), fb) > 35
    assert torch.equal(sparse24_linear_ref(x, values, meta, s, b), int8_linear_ref(x, q, s, b))


def test_op_rejects_bad_inputs():
    values, meta = compress_24(_sparse(8, 16))
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., K\] with K = 2 \* values.shape\[1\] = 16"):
        op(torch.randn(4, 12), values, meta, None, None, "dense")
    with pytest.raises(ValueError, match=r"meta must have shape \[N, ceil\(K/8\)\] = \[8, 2\]"):
        op(x, values, meta[:, :1].contiguous(), None, None, "dense")
    with pytest.raises(TypeError, match=r"meta must be .*uint8"):
        op(x, values, meta.to(torch.int32), None, None, "dense")
    with pytest.raises(ValueError, match=r"w_scale is only for int8 values"):
        op(x, values, meta, torch.ones(8), None, "dense")
    q, s = quantize_int8_weight(decompress_24(values, meta))
    qv, qm = compress_24(q)
    with pytest.raises(ValueError, match=r"int8 values need w_scale"):
        op(x, qv, qm, None, None, "dense")
    with pytest.raises(ValueError, match=r"kernel='csr' has no int8 form on CPU"):
        op(x, qv, qm, s, None, "csr")
    with pytest.raises(ValueError, match=r"kernel='triton' is not a CPU implementation.*\('dense', 'csr', 'fbgemm', 'dequant'\)"):
        op(x, values, meta, None, None, "triton")
    for kernel in ("fbgemm", "dequant"):
        with pytest.raises(ValueError, match=rf"kernel='{kernel}' is for int8 values; float 2:4 layers run"):
            op(x, values, meta, None, None, kernel)
    with pytest.raises(ValueError, match=r"K a multiple of 4"):
        op(torch.randn(2, 6), torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.uint8), None, None, "dense")


@pytest.mark.parametrize("case", ["float", "int8", "float_csr", "bf16"])
def test_opcheck(case):
    w = _sparse(16, 32)
    x = torch.randn(2, 5, 32)
    if case == "int8":
        q, s = quantize_int8_weight(w)
        values, meta = compress_24(q)
        args = (x, values, meta, s, torch.randn(16), "dense")
    else:
        values, meta = compress_24(w)
        xx = x.to(torch.bfloat16) if case == "bf16" else x
        args = (xx, values, meta, None, None, "csr" if case == "float_csr" else "dense")
    torch.library.opcheck(op.default, args)


class _Sparse(torch.nn.Module):
    def __init__(self):
        super().__init__()
        values, meta = compress_24(_sparse(16, 32))
        q, s = quantize_int8_weight(_sparse(8, 16, seed=1))
        qv, qm = compress_24(q)
        for k, v in dict(values=values, metadata=meta, qv=qv, qm=qm, s=s).items():
            self.register_buffer(k, v)

    def forward(self, x):
        h = torch.relu(torch.ops.hwaware.sparse24_linear(x, self.values, self.metadata, None, None, "dense"))
        return torch.ops.hwaware.sparse24_linear(h, self.qv, self.qm, self.s, None, "dense")


def test_compile_and_export_round_trip(tmp_path):
    model, x = _Sparse(), torch.randn(6, 32)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=0, rtol=0)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=2, max=1024)},))
    assert "hwaware.sparse24_linear.default" in {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    torch.export.save(ep, tmp_path / "p.pt2")
    loaded = torch.export.load(tmp_path / "p.pt2")
    x2 = torch.randn(11, 32)
    torch.testing.assert_close(loaded.module()(x2), model(x2), atol=0, rtol=0)
