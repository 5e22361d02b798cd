"""Primitives: quantize/dequantize vs fused fake quantization, code ranges, SQNR, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from hwaware.quant.primitives import (
    as_channels,
    channel_minmax,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_learnable,
    quantize,
    round_scale,
    sqnr_db,
)
from hwaware.quant.spec import QuantSpec

# SQNR of min-max fake quantization of torch.randn(256, 512) (seed 0) weights.
# Measured: int8 per-channel 42.5 dB, int4 g32 20.8 dB (sym) / 21.8 dB (asym).
INT8_PER_CHANNEL_SQNR_DB = 40.0
INT4_G32_SQNR_DB = 18.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(seed: int = 0) -> torch.Tensor:
    return torch.randn(256, 512, generator=_gen(seed))  # [N, K] like a Linear weight


def _qparams(x: torch.Tensor, spec: QuantSpec):
    mn, mx = channel_minmax(as_channels(x, spec))
    return compute_qparams(mn, mx, spec)


SPECS = [
    QuantSpec(granularity="per_tensor"),
    QuantSpec(granularity="per_tensor", symmetric=False),
    QuantSpec(granularity="per_channel"),
    QuantSpec(granularity="per_channel", symmetric=False),
    QuantSpec(bits=4, granularity="per_channel"),
    QuantSpec(bits=4, granularity="per_group", group_size=32),
    QuantSpec(bits=4, granularity="per_group", group_size=32, symmetric=False),
    QuantSpec(bits=4, granularity="per_group", group_size=64),
    QuantSpec(bits=4, granularity="per_group", group_size=64, symmetric=False),
    QuantSpec(bits=4, granularity="per_group", group_size=128),
    QuantSpec(bits=4, granularity="per_group", group_size=128, symmetric=False),
    QuantSpec(granularity="per_row"),
    QuantSpec(granularity="per_row", symmetric=False),  # FBGEMM row-wise: float offset
    QuantSpec(granularity="per_channel", scale_dtype="float16"),
    QuantSpec(granularity="per_row", symmetric=False, scale_dtype="float16"),
]


def _id(spec: QuantSpec) -> str:
    return f"{spec.short()}/{spec.scale_dtype}"


# ------------------------------------------------------------------------------------------------
# two paths agree
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_quantize_dequantize_equals_fake_quantize(spec):
    w = _weights()
    scale, zp = _qparams(w, spec)
    codes = quantize(w, scale, zp, spec)
    assert codes.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    assert codes.shape == w.shape
    torch.testing.assert_close(dequantize(codes, scale, zp, spec), fake_quantize(w, scale, zp, spec), atol=0, rtol=0)


def test_quantize_matches_fused_fake_quantize_next_to_rounding_ties():
    # Values one ulp either side of the half-levels (k + 0.5) * scale: the fused op rounds
    # x * (1 / scale), so quantize() (the codes export packs) must round the same product.
    spec = QuantSpec(granularity="per_tensor")
    scale, zp = torch.tensor([0.0371]), torch.zeros(1, dtype=torch.int32)
    half = (torch.arange(-127, 127, dtype=torch.float32) + 0.5) * scale
    x = torch.cat([half, torch.nextafter(half, half + 1), torch.nextafter(half, half - 1)])
    torch.testing.assert_close(
        dequantize(quantize(x, scale, zp, spec), scale, zp, spec), fake_quantize(x, scale, zp, spec), atol=0, rtol=0
    )


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_codes_within_range(spec):
    w = _weights(1) * 3.0
    scale, zp = _qparams(w, spec)
    codes = quantize(w, scale, zp, spec).int()
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    # a min-max range reaches at least one end of the code range
    assert int(codes.max()) == spec.qmax or int(codes.min()) == spec.qmin


def test_int8_symmetric_never_emits_minus_128():
    spec = QuantSpec(bits=8, granularity="per_tensor")
    x = torch.linspace(-5.0, 1.0, 1001)
    scale, zp = _qparams(x, spec)
    codes = quantize(x * 1.5, scale, zp, spec)  # also past the range: clipped to -127, not -128
    assert int(codes.min()) == -127
    assert not bool((codes == -128).any())


def test_per_row_asymmetric_uses_float_row_minimum_as_offset():
    spec = QuantSpec(granularity="per_row", symmetric=False)
    x = torch.randn(6, 40, generator=_gen(2)) + 3.0  # rows far from zero: offset != 0
    scale, offset = _qparams(x, spec)
    assert offset.dtype == torch.float32
    torch.testing.assert_close(offset, x.amin(1), atol=0, rtol=0)
    torch.testing.assert_close(scale, (x.amax(1) - x.amin(1)) / 255, atol=0, rtol=0)
    # code 0 dequantizes to the offset: each row's minimum is reproduced exactly
    fq = fake_quantize(x, scale, offset, spec)
    torch.testing.assert_close(fq.amin(1), x.amin(1), atol=0, rtol=0)


def test_float16_scale_dtype_rounds_scales_and_offsets_to_half():
    w = _weights(3)
    for spec in (QuantSpec(scale_dtype="float16"), QuantSpec(granularity="per_row", symmetric=False, scale_dtype="float16")):
        scale, zp = _qparams(w, spec)
        assert scale.dtype == torch.float32
        torch.testing.assert_close(scale, scale.half().float(), atol=0, rtol=0)
        if spec.float_offset:
            torch.testing.assert_close(zp, zp.half().float(), atol=0, rtol=0)
    # a tiny scale is clamped to the smallest normal half instead of flushing to 0
    tiny = round_scale(torch.tensor([1e-12]), QuantSpec(scale_dtype="float16"))
    assert float(tiny) == torch.finfo(torch.float16).tiny


def test_compute_qparams_symmetric_reference():
    spec = QuantSpec(bits=8, granularity="per_channel")
    mn, mx = torch.tensor([-2.0, -1.0, 0.5]), torch.tensor([1.0, 3.0, 4.0])
    scale, zp = compute_qparams(mn, mx, spec)
    torch.testing.assert_close(scale, torch.tensor([2.0, 3.0, 4.0]) / 127, atol=0, rtol=0)
    assert zp.dtype == torch.int32 and not bool(zp.any())


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_is_exactly_representable_affine(bits):
    spec = QuantSpec(bits=bits, granularity="per_channel", symmetric=False)
    g = _gen(4)
    # channels all-positive, all-negative, straddling zero with awkward ranges
    w = torch.stack([torch.rand(64, generator=g) + 0.3, -torch.rand(64, generator=g) - 0.7, torch.randn(64, generator=g) * 1.7 + 0.4])
    w[:, 5] = 0.0
    scale, zp = _qparams(w, spec)
    assert zp.dtype == torch.int32
    assert bool((zp >= spec.qmin).all()) and bool((zp <= spec.qmax).all())
    fq = fake_quantize(w, scale, zp, spec)
    assert bool((fq[:, 5] == 0.0).all())
    torch.testing.assert_close(dequantize(quantize(torch.zeros(3, 1), scale, zp, spec), scale, zp, spec), torch.zeros(3, 1), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# quality
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, threshold",
    [
        (QuantSpec(bits=8, granularity="per_channel"), INT8_PER_CHANNEL_SQNR_DB),
        (QuantSpec(bits=4, granularity="per_group", group_size=32), INT4_G32_SQNR_DB),
        (QuantSpec(bits=4, granularity="per_group", group_size=32, symmetric=False), INT4_G32_SQNR_DB),
    ],
    ids=lambda v: _id(v) if isinstance(v, QuantSpec) else f"{v}dB",
)
def test_sqnr_of_weight_fake_quant(spec, threshold):
    w = _weights()
    scale, zp = _qparams(w, spec)
    assert sqnr_db(w, fake_quantize(w, scale, zp, spec)) >= threshold


def test_sqnr_db_reference_and_identity():
    x = torch.randn(1000, generator=_gen(5))
    assert sqnr_db(x, x) == math.inf
    noise = torch.randn(1000, generator=_gen(6)) * 0.01
    expected = 20 * math.log10(float(x.double().norm()) / float(noise.double().norm()))
    assert sqnr_db(x, x + noise) == pytest.approx(expected, rel=1e-5)
    # smaller groups -> more scales -> better SQNR
    w = _weights()
    specs = [QuantSpec(bits=4, granularity="per_group", group_size=g) for g in (32, 64, 128)]
    sqnrs = [sqnr_db(w, fake_quantize(w, *_qparams(w, s), s)) for s in specs]
    assert sqnrs[0] > sqnrs[1] > sqnrs[2]


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_straight_through_gradient_is_in_range_mask(symmetric):
    spec = QuantSpec(bits=8, granularity="per_tensor", symmetric=symmetric)
    x = (torch.randn(4096, generator=_gen(7)) * 2.0).requires_grad_()
    # a static range covering [-1, 1.5] only: a good fraction of x is clipped
    scale, zp = compute_qparams(torch.tensor([-1.0]), torch.tensor([1.5]), spec)
    y = fake_quantize(x, scale, zp, spec)
    upstream = torch.randn(4096, generator=_gen(8))
    (y * upstream).sum().backward()
    code = torch.round(x.detach() / scale) + zp.float()
    mask = (code >= spec.qmin) & (code <= spec.qmax)
    assert 0.1 < float((~mask).float().mean()) < 0.9  # the test exercises clipping
    torch.testing.assert_close(x.grad, upstream * mask.float(), atol=0, rtol=0)


def test_straight_through_gradient_float_offset_is_identity():
    spec = QuantSpec(granularity="per_row", symmetric=False)
    x = torch.randn(8, 32, generator=_gen(9)).requires_grad_()
    scale, off = _qparams(x, spec)
    upstream = torch.randn(8, 32, generator=_gen(10))
    (fake_quantize(x, scale, off, spec) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream, atol=0, rtol=0)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(granularity="per_tensor", learnable=True), QuantSpec(granularity="per_channel", learnable=True),
     QuantSpec(bits=4, granularity="per_group", group_size=32, learnable=True, scale_dtype="float16")],
    ids=_id,
)
def test_learnable_fake_quant_forward_and_scale_gradient(spec):
    w = torch.randn(16, 64, generator=_gen(11))
    s0, zp = _qparams(w, spec)
    scale = torch.nn.Parameter(s0.clone())
    x = w.clone().requires_grad_()
    y = fake_quantize_learnable(x, scale, zp, spec)
    # forward equals the fused fixed-scale op at the same scale
    torch.testing.assert_close(y, fake_quantize(w, s0, zp, spec), atol=0, rtol=0)
    (y * torch.randn(16, 64, generator=_gen(12))).sum().backward()
    assert scale.grad is not None and scale.grad.shape == scale.shape
    assert float(scale.grad.abs().sum()) > 0
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_per_group_needs_k_multiple_of_group_size(group_size):
    spec = QuantSpec(bits=4, granularity="per_group", group_size=group_size)
    w = torch.randn(4, group_size + 8)
    with pytest.raises(ValueError, match=rf"multiple of group_size={group_size}, got shape \(4, {group_size + 8}\)"):
        as_channels(w, spec)
    with pytest.raises(ValueError, match=rf"group_size={group_size}"):
        quantize(w, torch.ones(1), torch.zeros(1, dtype=torch.int32), spec)


def test_zero_dim_tensor_rejected():
    with pytest.raises(ValueError, match=r"0-d tensor with granularity 'per_tensor'"):
        as_channels(torch.tensor(1.0), QuantSpec(granularity="per_tensor"))


@pytest.mark.parametrize(
    "spec, shape, channels",
    [
        (QuantSpec(granularity="per_tensor"), (3, 4, 5), 1),
        (QuantSpec(granularity="per_channel"), (6, 3, 2, 2), 6),  # Conv [O, I, kh, kw]
        (QuantSpec(granularity="per_row"), (2, 7, 16), 14),  # tokens [B, T, K]
        (QuantSpec(bits=4, granularity="per_group", group_size=32), (3, 96), 9),
    ],
)
def test_as_channels_shapes(spec, shape, channels):
    x2d = as_channels(torch.zeros(shape), spec)
    assert x2d.shape[0] == channels and x2d.numel() == math.prod(shape)


def test_dynamic_affine_rounds_before_adding_the_zero_point_as_the_fused_kernels_do():
    # round(x / s + zp) and round(x / s) + zp differ at a half with an odd zero point (half to even)
    from hwaware.quant.primitives import fake_quantize_dynamic

    spec = QuantSpec(bits=8, granularity="per_tensor", symmetric=False, dynamic=True)
    x = torch.tensor([[-1.0, 2.5, 254.0]])  # scale 1, zero point 1: 2.5 is a half
    y, scale, zp, _ = fake_quantize_dynamic(x, spec)
    assert float(scale) == 1.0 and int(zp) == 1
    torch.testing.assert_close(y, fake_quantize(x, scale, zp, spec), atol=0, rtol=0)
    assert float(y[0, 1]) == 2.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [QuantSpec(bits=8, granularity="per_channel"),
                                  QuantSpec(bits=8, granularity="per_row", dynamic=True),
                                  QuantSpec(bits=8, granularity="per_row", symmetric=False, dynamic=True)],
                         ids=lambda s: s.short())
def test_half_precision_tensors_quantize_in_float32_as_export_does(dtype, spec):
    # a bf16-rounded scale let |x / s| reach 127.5: code 128, which export (on w.float()) clamps to 127
    from hwaware.quant.primitives import fake_quantize_dynamic

    x = (torch.randn(64, 96, generator=_gen(3)) * 3).to(dtype)
    y, scale, zp, _ = fake_quantize_dynamic(x, spec)
    y32, scale32, zp32, _ = fake_quantize_dynamic(x.float(), spec)
    assert y.dtype == dtype
    torch.testing.assert_close(scale.reshape(-1), scale32.reshape(-1), atol=0, rtol=0)
    torch.testing.assert_close(y, y32.to(dtype), atol=0, rtol=0)
    if spec.symmetric:
        assert int((y.float() / scale.reshape(-1, 1)).round().abs().max()) <= 127
