"""Packed formats: exact round trips, FBGEMM layout equality, and QAT-equal numerics."""
import pytest
import torch

from hwaware.ops.packing import (
    dequantize_int4_weight,
    dequantize_int8_weight,
    dequantize_rowwise,
    int4_weight_spec,
    int8_weight_spec,
    pack_int4,
    pack_rowwise,
    quantize_int4_weight,
    quantize_int8_weight,
    quantize_rowwise,
    rowwise_cols,
    rowwise_spec,
    unpack_int4,
    unpack_rowwise,
)
from hwaware.quant.primitives import channel_minmax, compute_qparams, fake_quantize, fake_quantize_dynamic, quantize
from hwaware.quant.spec import QuantSpec


# -- int4 nibbles ----------------------------------------------------------------------------------

def test_pack_int4_byte_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, -1, 0, -8, 7, 3]], dtype=torch.int8)
    packed = pack_int4(codes)
    # (1 | 2<<4), (0xF | 0<<4), (0x8 | 7<<4), (3 | pad 0)
    assert packed.tolist() == [[0x21, 0x0F, 0x78, 0x03]]
    assert packed.dtype == torch.uint8


@pytest.mark.parametrize("k", [1, 7, 64, 131])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_round_trip_exact(k, signed):
    g = torch.Generator().manual_seed(k)
    lo, hi, dt = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    codes = torch.randint(lo, hi, (5, k), generator=g).to(dt)
    packed = pack_int4(codes)
    assert packed.shape == (5, (k + 1) // 2)
    out = unpack_int4(packed, k, signed=signed)
    assert out.dtype == torch.int8
    torch.testing.assert_close(out, codes.to(torch.int8), atol=0, rtol=0)


def test_pack_int4_rejects_bad_inputs():
    with pytest.raises(TypeError, match="codes must have dtype"):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"codes must be 2-D"):
        pack_int4(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 2), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((1, 2), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"ceil\(k/2\)"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8, signed=True)


# -- FBGEMM row-wise tables --------------------------------------------------------------------------

@pytest.mark.parametrize("bits,dim", [(8, 16), (8, 7), (4, 16), (4, 7), (4, 1)])
def test_rowwise_round_trip_exact(bits, dim):
    g = torch.Generator().manual_seed(dim)
    codes = torch.randint(0, 2**bits, (9, dim), generator=g).to(torch.uint8)
    scale, offset = torch.rand(9, generator=g) + 0.01, torch.randn(9, generator=g)
    if bits == 4:  # stored as fp16: use values fp16 holds exactly
        scale, offset = scale.half().float(), offset.half().float()
    fused = pack_rowwise(codes, scale, offset, bits)
    assert fused.shape == (9, rowwise_cols(dim, bits))
    c, s, o = unpack_rowwise(fused, bits, dim)
    torch.testing.assert_close(c, codes, atol=0, rtol=0)
    torch.testing.assert_close(s, scale, atol=0, rtol=0)
    torch.testing.assert_close(o, offset, atol=0, rtol=0)


@pytest.mark.parametrize("bits,dim", [(8, 3), (4, 1), (4, 3)])
def test_rowwise_qparams_read_from_rows_at_any_byte_offset(bits, dim):
    # a one-row table (or the last chunk of 2**20 + 1 rows) is a contiguous slice at an odd byte offset
    # and row stride: its float view failed, so export wrote artifacts that load could not read
    from hwaware.ops.packing import check_rowwise_qparams

    table = torch.randn(5, dim)
    fused = quantize_rowwise(table, bits)
    check_rowwise_qparams(fused[:1], bits)
    check_rowwise_qparams(fused, bits, rows_per_chunk=4)  # its last chunk: one row at byte 4 * cols
    for rows in (fused[:1], fused[4:]):
        c, s, o = unpack_rowwise(rows, bits, dim)
        c_all, s_all, o_all = unpack_rowwise(fused, bits, dim)
        i = 0 if rows.data_ptr() == fused.data_ptr() else 4
        assert torch.equal(c, c_all[i:i + 1]) and torch.equal(s, s_all[i:i + 1]) and torch.equal(o, o_all[i:i + 1])


def test_rowwise_8bit_dim_is_derived():
    fused = quantize_rowwise(torch.randn(3, 5), 8)
    assert unpack_rowwise(fused, 8)[0].shape == (3, 5)
    with pytest.raises(ValueError, match="needs dim"):
        unpack_rowwise(quantize_rowwise(torch.randn(3, 6), 4), 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_rowwise_matches_qat_fake_quant_exactly(bits):
    table = torch.randn(64, 12) * torch.logspace(-3, 1, 64)[:, None]
    spec = rowwise_spec(bits)
    deq = dequantize_rowwise(quantize_rowwise(table, bits), bits, 12)
    mn, mx = channel_minmax(table)
    scale, offset = compute_qparams(mn, mx, spec)
    torch.testing.assert_close(deq, fake_quantize(table, scale, offset, spec), atol=0, rtol=0)
    torch.testing.assert_close(deq, fake_quantize_dynamic(table, spec)[0], atol=0, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_rows_keep_qats_codes_in_the_row_layout(bits):
    # a symmetric table spec was re-quantized affine at export: 26% of a trial's codes changed
    from hwaware.quant.attach import table_spec

    table = torch.randn(64, 12) * torch.logspace(-3, 1, 64)[:, None]
    spec = table_spec(QuantSpec(bits=bits, granularity="per_row", symmetric=True, dynamic=True))
    mn, mx = channel_minmax(table)
    scale, zero = compute_qparams(mn, mx, spec)
    q = quantize(table, scale, zero, spec)
    fused = quantize_rowwise(table, bits, spec)
    codes, s, offset = unpack_rowwise(fused, bits, 12)
    assert torch.equal(codes.to(torch.int16) - 2 ** (bits - 1), q.to(torch.int16))  # the very codes QAT trained
    assert torch.equal(s, scale) and torch.equal(offset, -(2 ** (bits - 1)) * scale)
    # served: c * scale + offset, q * scale up to the rounding of one product
    want = fake_quantize(table, scale, zero, spec)
    ids = torch.arange(64)
    served = torch.ops.hwaware.embedding_bag_rowwise(fused, bits, 12, ids, ids, 0, None, False)
    torch.testing.assert_close(served, want, atol=0, rtol=2 ** -20)
    with pytest.raises(ValueError, match=r"stores float(16|32) scales per row"):
        quantize_rowwise(table, bits, spec.replace(scale_dtype="float32" if bits == 4 else "float16"))


@pytest.mark.parametrize("bits", [8, 4])
def test_rowwise_layout_equals_fbgemm_prepack(bits):
    """Decode torch's own prepacked bytes with our unpack: same qparams, codes within one level."""
    table = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    prepack = torch.ops.quantized.embedding_bag_byte_prepack if bits == 8 else torch.ops.quantized.embedding_bag_4bit_prepack
    theirs = prepack(table)
    ours = quantize_rowwise(table, bits)
    assert theirs.shape == ours.shape and theirs.dtype == ours.dtype
    tc, ts, to = unpack_rowwise(theirs, bits, 16)
    oc, os_, oo = unpack_rowwise(ours, bits, 16)
    torch.testing.assert_close(to, oo, atol=0, rtol=0)  # offset = row min (fp16 for 4-bit)
    # fbgemm computes the 4-bit scale from the fp16-rounded min; ours from the exact min (QAT's)
    torch.testing.assert_close(ts, os_, rtol=0 if bits == 8 else 2e-3, atol=0)
    assert int((tc.int() - oc.int()).abs().max()) <= 1
    assert float((tc != oc).float().mean()) < 0.01
    # their bytes, decoded by us, reconstruct the table to within half a level
    err = (dequantize_rowwise(theirs, bits, 16) - table).abs()
    assert bool((err <= ts[:, None] * 0.5 + 1e-6).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_fbgemm_unpack_reads_our_tables(bits):
    table = torch.randn(50, 10)
    fused = quantize_rowwise(table, bits)
    unpack = torch.ops.quantized.embedding_bag_byte_unpack if bits == 8 else torch.ops.quantized.embedding_bag_4bit_unpack
    torch.testing.assert_close(unpack(fused), dequantize_rowwise(fused, bits, 10), atol=1e-6, rtol=1e-6)


def test_rowwise_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"bits=3"):
        quantize_rowwise(torch.randn(2, 4), 3)
    with pytest.raises(TypeError, match="table must have dtype"):
        quantize_rowwise(torch.ones(2, 4, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match=r"table must be 2-D"):
        quantize_rowwise(torch.randn(4), 8)
    with pytest.raises(ValueError, match=r"scale must have shape \[R\] = \[2\]"):
        pack_rowwise(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(3), torch.ones(2), 8)
    with pytest.raises(ValueError, match=r"not a 4-bit row-wise table of dim=9"):
        unpack_rowwise(torch.zeros(2, 8, dtype=torch.uint8), 4, 9)


# -- weights ---------------------------------------------------------------------------------------

def test_int8_weight_matches_fake_quant():
    w = torch.randn(32, 48)
    q, s = quantize_int8_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (32,)
    assert int(q.min()) >= -127 and int(q.max()) == 127
    spec = int8_weight_spec()
    ref = fake_quantize(w, s, torch.zeros(32, dtype=torch.int32), spec)
    torch.testing.assert_close(dequantize_int8_weight(q, s), ref, atol=0, rtol=0)


def test_int8_weight_uses_given_scale():
    w = torch.randn(8, 16)
    s = torch.full((8,), 0.01)
    q, s2 = quantize_int8_weight(w, scale=s)
    assert torch.equal(s2, s)
    torch.testing.assert_close(q, torch.round(w / 0.01).clamp(-127, 127).to(torch.int8), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"scale must have shape \[N\] = \[8\]"):
        quantize_int8_weight(w, scale=torch.ones(4))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_weight_matches_fake_quant(symmetric, group_size):
    w = torch.randn(16, 128)
    packed, scales, zeros = quantize_int4_weight(w, group_size, symmetric)
    assert packed.shape == (16, 64) and scales.shape == (16, 128 // group_size)
    assert (zeros is None) == symmetric
    spec = int4_weight_spec(group_size, symmetric)
    zp = torch.zeros(scales.numel(), dtype=torch.int32) if symmetric else zeros.reshape(-1).int()
    ref = fake_quantize(w, scales.reshape(-1), zp, spec)
    torch.testing.assert_close(dequantize_int4_weight(packed, scales, zeros, group_size), ref, atol=0, rtol=0)


def test_int4_weight_uses_given_qparams():
    w = torch.randn(4, 64)
    mn, mx = channel_minmax(w.reshape(-1, 32))
    spec = int4_weight_spec(32, False)
    s, zp = compute_qparams(mn, mx, spec)
    s = s * 1.5  # a "trained" scale differs from the min/max one
    packed, scales, zeros = quantize_int4_weight(w, 32, False, scale=s.reshape(4, 2), zero_point=zp.reshape(4, 2))
    torch.testing.assert_close(scales.reshape(-1), s, atol=0, rtol=0)
    torch.testing.assert_close(zeros.reshape(-1).int(), zp, atol=0, rtol=0)
    torch.testing.assert_close(dequantize_int4_weight(packed, scales, zeros, 32), fake_quantize(w, s, zp, spec), atol=0, rtol=0)
    with pytest.raises(ValueError, match="asymmetric int4 needs zero_point"):
        quantize_int4_weight(w, 32, False, scale=s)


def test_int4_weight_rejects_bad_inputs():
    with pytest.raises(ValueError, match="K=48, which is not a multiple of group_size=32"):
        quantize_int4_weight(torch.randn(4, 48), 32, True)
    with pytest.raises(TypeError, match="w must have dtype"):
        quantize_int4_weight(torch.ones(4, 64, dtype=torch.int8), 32, True)
    packed, scales, _ = quantize_int4_weight(torch.randn(4, 64), 32, True)
    with pytest.raises(ValueError, match=r"scales must have shape \[N, K/g\] = \[4, 2\]"):
        dequantize_int4_weight(packed, scales[:, :1], None, 32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantizers_refuse_non_finite_weights(bad):
    """One NaN / inf sets its channel's, group's or row's scale: quantized, the whole channel was NaN."""
    w = torch.randn(6, 64)
    w[2, 5] = bad
    msg = rf"has 1 non-finite value\(s\) \(NaN/inf\), the first at index \[2, 5\] \({bad}\)"
    with pytest.raises(ValueError, match=r"w " + msg):
        quantize_int8_weight(w)
    with pytest.raises(ValueError, match=r"w " + msg):
        quantize_int4_weight(w, 32, symmetric=True)
    for bits in (8, 4):
        with pytest.raises(ValueError, match=r"table " + msg):
            quantize_rowwise(w, bits)
    with pytest.raises(ValueError, match=r"scale must be finite and > 0 everywhere, got nan at index 1"):
        quantize_int8_weight(torch.randn(3, 8), scale=torch.tensor([1.0, float("nan"), 1.0]))


def test_int4_rows_refuse_values_beyond_float16():
    """int4 rows store scale and offset as float16: a row reaching 1e5 packed an infinite offset."""
    table = torch.randn(5, 8)
    table[3] *= 1e5
    with pytest.raises(ValueError, match=r"row 3 spans \[.*\]: 4-bit rows store its scale \(range / 15\) and offset "
                                         r"\(minimum\) as float16, at most 65504 in magnitude; use 8-bit rows"):
        quantize_rowwise(table, 4)
    # a wide row of positive values: the scale, clamped to float16's max, used to clip it silently
    with pytest.raises(ValueError, match=r"row 0 spans \[0, 1e\+07\]"):
        quantize_rowwise(torch.tensor([[0.0, 1e7, 5e6, 1.0]]), 4)
    wide = torch.tensor([[0.0, 9e5, 4e5, 1.0]])  # range / 15 = 60000 fits: packs, and serves it
    torch.testing.assert_close(dequantize_rowwise(quantize_rowwise(wide, 4), 4, 4), wide, rtol=0, atol=9e5 / 15)
    torch.testing.assert_close(dequantize_rowwise(quantize_rowwise(table, 8), 8), table, rtol=0, atol=float(table.abs().max()) / 100)


# -- device: every packing function runs on the tensor's own device ----------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_packing_function_gives_the_cpu_result_on_cuda():
    # compress_24 and check_24_meta built helper tensors on the CPU and failed on CUDA weights
    # ("Expected all tensors to be on the same device"), as symmetric int4 (de)quantization did
    from hwaware.ops.packing import check_24_meta, compress_24, decompress_24

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    keep = torch.rand(16, 16, 4, generator=g).argsort(-1)[..., :2]
    w24 = (w.reshape(16, 16, 4) * torch.zeros(16, 16, 4).scatter_(-1, keep, 1.0)).reshape(16, 64)
    cases = {
        "int8": lambda t: quantize_int8_weight(t),
        "int8 deq": lambda t: dequantize_int8_weight(*quantize_int8_weight(t)),
        "int4 sym": lambda t: quantize_int4_weight(t, 32, True),
        "int4 asym": lambda t: quantize_int4_weight(t, 32, False),
        "int4 sym deq": lambda t: dequantize_int4_weight(*quantize_int4_weight(t, 32, True), 32),
        "int4 asym deq": lambda t: dequantize_int4_weight(*quantize_int4_weight(t, 32, False), 32),
        "int4 sym given scale": lambda t: quantize_int4_weight(t, 32, True, scale=quantize_int4_weight(t, 32, True)[1]),
        "rowwise 8": lambda t: quantize_rowwise(t, 8),
        "rowwise 4 deq": lambda t: dequantize_rowwise(quantize_rowwise(t, 4), 4, 64),
        "2:4": lambda t: compress_24(w24.to(t.device)),
        "2:4 int8": lambda t: compress_24(quantize_int8_weight(w24.to(t.device))[0]),
        "2:4 round trip": lambda t: decompress_24(*compress_24(w24.to(t.device)), 64),
    }
    for name, fn in cases.items():
        on_cpu, on_gpu = fn(w), fn(w.cuda())
        on_cpu = on_cpu if isinstance(on_cpu, tuple) else (on_cpu,)
        on_gpu = on_gpu if isinstance(on_gpu, tuple) else (on_gpu,)
        for a, b in zip(on_cpu, on_gpu):
            assert (a is None) == (b is None), name
            if a is not None:
                assert b.device.type == "cuda", name
                # integer codes, packed bytes and metadata exactly; float scales and dequantized
                # weights to 2 ulp: torch's CUDA division by a scalar multiplies by its reciprocal
                # (on an H100, 2 of 16 int8 scales came out 1 ulp from the CPU's amax / 127)
                tol = 0 if not a.is_floating_point() else 2.4e-7
                torch.testing.assert_close(b.cpu(), a, atol=0, rtol=tol, msg=lambda m: f"{name}: {m}")
    _, meta = compress_24(w24.cuda())
    check_24_meta(meta, 64)
    bad = meta.clone()
    bad[3, 2] = 0x00  # positions (0, 0) in both groups: a repeated position
    with pytest.raises(ValueError, match="row 3, columns 16..19"):
        check_24_meta(bad, 64)
