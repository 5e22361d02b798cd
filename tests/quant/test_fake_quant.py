"""FakeQuantizer: weight tracking and freezing, static/dynamic activations, LSQ, checkpoints, errors."""
from __future__ import annotations

import math

import re

import pytest
import torch
from torch import nn

from hwaware.quant.fake_quant import FakeQuantizer
from hwaware.quant.primitives import as_channels, channel_minmax, compute_qparams, fake_quantize
from hwaware.quant.spec import QuantSpec

WEIGHT_SPEC = QuantSpec(bits=8, granularity="per_channel")
STATIC_ACT_SPEC = QuantSpec(bits=8, granularity="per_tensor", symmetric=False, observer="minmax")
DYNAMIC_ROW_SPEC = QuantSpec(bits=8, granularity="per_row", dynamic=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_qparams(t: torch.Tensor, spec: QuantSpec):
    mn, mx = channel_minmax(as_channels(t, spec))
    return compute_qparams(mn, mx, spec)


def test_role_must_be_weight_or_activation():
    with pytest.raises(ValueError, match=r"role='bias'; expected 'weight' or 'activation'"):
        FakeQuantizer(WEIGHT_SPEC, "fc.bias", "bias")


def test_starts_in_calibrate_mode_and_passes_through():
    fq = FakeQuantizer(WEIGHT_SPEC, "fc.weight", "weight")
    assert fq.observe and not fq.quantize and not fq.has_qparams
    w = torch.randn(4, 8, generator=_gen(0))
    assert fq(w) is w


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [WEIGHT_SPEC, QuantSpec(bits=4, granularity="per_group", group_size=32, symmetric=False), QuantSpec(granularity="per_tensor")],
    ids=lambda s: s.short(),
)
def test_weight_scale_tracks_current_weight_until_frozen(spec):
    fq = FakeQuantizer(spec, "fc.weight", "weight")
    assert fq.observer is None  # a min-max weight reads the live weight, no running range
    fq.quantize = True
    w1 = torch.randn(8, 64, generator=_gen(1))
    out1 = fq(w1)
    s1, z1 = _reference_qparams(w1, spec)
    torch.testing.assert_close(fq.scale, s1, atol=0, rtol=0)
    torch.testing.assert_close(fq.zero_point, z1, atol=0, rtol=0)
    torch.testing.assert_close(out1, fake_quantize(w1, s1, z1, spec), atol=0, rtol=0)

    # a smaller weight: the scale follows it down (a running range would keep w1's)
    w2 = w1 * 0.25
    out2 = fq(w2)
    s2, z2 = _reference_qparams(w2, spec)
    torch.testing.assert_close(fq.scale, s2, atol=0, rtol=0)
    torch.testing.assert_close(out2, fake_quantize(w2, s2, z2, spec), atol=0, rtol=0)

    fq.freeze()
    assert bool(fq.frozen) and not fq.observe
    w3 = w1 * 4.0
    out3 = fq(w3)
    torch.testing.assert_close(fq.scale, s2, atol=0, rtol=0)  # frozen at w2's scale
    torch.testing.assert_close(out3, fake_quantize(w3, s2, z2, spec), atol=0, rtol=0)
    assert not torch.equal(out3, fake_quantize(w3, *_reference_qparams(w3, spec), spec))


def test_weight_nan_raises_with_layer_name():
    # the forward does not sync to look (hot path); check_finite() names the layer afterwards
    fq = FakeQuantizer(WEIGHT_SPEC, "top_mlp.0.weight", "weight")
    fq.quantize = True
    w = torch.randn(4, 8, generator=_gen(2))
    fq(w)
    fq.check_finite()  # finite: no error
    w[2, 3] = float("nan")
    assert torch.isnan(fq(w)).any()
    with pytest.raises(ValueError, match=re.escape("'top_mlp.0.weight' (weight) saw NaN/inf")):
        fq.check_finite()
    w[2, 3] = float("inf")
    fq(w)
    with pytest.raises(ValueError, match=re.escape("'top_mlp.0.weight'")):
        fq.check_finite()


def test_dynamic_activation_nan_is_reported_by_check_finite():
    fq = FakeQuantizer(QuantSpec(granularity="per_row", dynamic=True), "mlp.0.input", "activation")
    fq.quantize = True
    x = torch.randn(3, 8, generator=_gen(3))
    x[1, 1] = float("inf")
    fq(x)
    with pytest.raises(ValueError, match=re.escape("'mlp.0.input' (activation) saw NaN/inf")):
        fq.check_finite()


def test_update_qparams_of_weight_needs_the_weight():
    fq = FakeQuantizer(WEIGHT_SPEC, "fc.weight", "weight")
    with pytest.raises(ValueError, match=re.escape("'fc.weight': a weight quantizer needs the weight")):
        fq.update_qparams()


# ------------------------------------------------------------------------------------------------
# activations
# ------------------------------------------------------------------------------------------------
def test_static_activation_observes_while_calibrating_then_quantizes():
    fq = FakeQuantizer(STATIC_ACT_SPEC, "fc.input", "activation")
    assert fq.observer is not None
    g = _gen(3)
    batches = [torch.randn(16, 32, generator=g) * (i + 1) + 0.5 * i for i in range(3)]  # [B, K]
    for b in batches:
        out = fq(b)
        torch.testing.assert_close(out, b, atol=0, rtol=0)
    assert not fq.has_qparams  # calibration only collects statistics

    fq.freeze()
    fq.quantize = True
    x = torch.randn(16, 32, generator=g) * 2.0
    allb = torch.cat(batches)
    scale, zp = compute_qparams(allb.min().reshape(1), allb.max().reshape(1), STATIC_ACT_SPEC)
    out = fq(x)
    torch.testing.assert_close(fq.scale, scale, atol=0, rtol=0)
    torch.testing.assert_close(fq.zero_point, zp, atol=0, rtol=0)
    torch.testing.assert_close(out, fake_quantize(x, scale, zp, STATIC_ACT_SPEC), atol=0, rtol=0)
    assert not torch.equal(out, x)
    # frozen: a wider batch does not move the range
    fq(x * 10.0)
    torch.testing.assert_close(fq.scale, scale, atol=0, rtol=0)


def test_static_activation_not_frozen_keeps_observing_while_quantizing():
    fq = FakeQuantizer(STATIC_ACT_SPEC, "fc.input", "activation")
    fq.quantize = True
    a = torch.randn(8, 16, generator=_gen(4))
    fq(a)
    b = a * 3.0
    out = fq(b)
    both = torch.cat([a, b])
    scale, zp = compute_qparams(both.min().reshape(1), both.max().reshape(1), STATIC_ACT_SPEC)
    torch.testing.assert_close(fq.scale, scale, atol=0, rtol=0)
    torch.testing.assert_close(out, fake_quantize(b, scale, zp, STATIC_ACT_SPEC), atol=0, rtol=0)


def test_dynamic_per_row_quantizes_each_row_with_its_own_absmax():
    fq = FakeQuantizer(DYNAMIC_ROW_SPEC, "fc.input", "activation")
    assert fq.observer is None
    x = torch.randn(2, 5, 48, generator=_gen(5)) * torch.logspace(-2, 2, 5).reshape(1, 5, 1)  # [B, T, K]
    assert fq(x) is x  # quantize off: untouched
    fq.quantize = True
    out = fq(x)
    # manual: per token, scale = absmax / 127, codes in [-127, 127]; the fused op rounds x * (1 / s)
    s = x.abs().amax(-1, keepdim=True) / 127
    ref = torch.clamp(torch.round(x * (1.0 / s)), -127, 127) * s
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert not fq.has_qparams  # nothing stored: the next tensor gets its own scales
    out2 = fq(x[:, :2] * 7.0)
    s2 = (x[:, :2] * 7.0).abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(out2, torch.clamp(torch.round((x[:, :2] * 7.0) * (1.0 / s2)), -127, 127) * s2, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role, spec", [("weight", WEIGHT_SPEC), ("activation", STATIC_ACT_SPEC)])
def test_state_dict_round_trip_into_fresh_quantizer(role, spec):
    fq = FakeQuantizer(spec, "fc.x", role)
    fq.quantize = True
    t = torch.randn(8, 32, generator=_gen(7))
    fq(t)
    fq.freeze()
    sd = fq.state_dict()
    assert sd["scale"].numel() > 0 and bool(sd["frozen"])

    fresh = FakeQuantizer(spec, "fc.x", role)
    fresh.load_state_dict(sd)  # strict: shapes of the empty buffers are taken from the checkpoint
    fresh.quantize = True
    x = t * 1.7  # a different tensor: the loaded, frozen scale must be the one used
    torch.testing.assert_close(fresh(x), fq(x), atol=0, rtol=0)
    torch.testing.assert_close(fresh.scale, fq.scale, atol=0, rtol=0)
    assert fresh.zero_point.dtype == fq.zero_point.dtype


def test_learnable_scale_state_dict_round_trip():
    fq = FakeQuantizer(WEIGHT_SPEC, "fc.weight", "weight")
    fq.quantize = True
    w = torch.randn(8, 32, generator=_gen(8))
    fq(w)
    p = fq.make_learnable()
    with torch.no_grad():
        p.add_(0.26)
    fresh = FakeQuantizer(WEIGHT_SPEC, "fc.weight", "weight")
    fresh.load_state_dict(fq.state_dict())
    fresh.quantize = True
    assert isinstance(fresh.learned_log_scale, nn.Parameter)
    torch.testing.assert_close(fresh.current_scale(), fq.current_scale(), atol=0, rtol=0)
    torch.testing.assert_close(fresh(w), fq(w), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# LSQ
# ------------------------------------------------------------------------------------------------
def test_make_learnable_before_calibration_raises():
    fq = FakeQuantizer(WEIGHT_SPEC, "fc.weight", "weight")
    with pytest.raises(ValueError, match=re.escape("'fc.weight': cannot make the scale learnable before it is calibrated")):
        fq.make_learnable()


def test_make_learnable_returns_parameter_that_drives_the_output():
    fq = FakeQuantizer(WEIGHT_SPEC, "fc.weight", "weight")
    fq.quantize = True
    w = torch.randn(8, 32, generator=_gen(9))
    before = fq(w)
    p = fq.make_learnable()
    assert isinstance(p, nn.Parameter) and p.requires_grad
    assert any(q is p for q in fq.parameters())
    assert fq.make_learnable() is p  # idempotent
    torch.testing.assert_close(fq(w), before, atol=0, rtol=0)  # same scale, same output

    base = fq.current_scale().clone()
    with torch.no_grad():
        p.add_(math.log(2.0))  # the parameter is the log of scale / calibrated scale
    out = fq(w)
    assert not torch.equal(out, before)
    torch.testing.assert_close(fq.current_scale(), base * torch.exp(p.detach()), atol=0, rtol=0)
    torch.testing.assert_close(fq.current_scale(), base * 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(out, fake_quantize(w, fq.current_scale(), fq.zero_point, WEIGHT_SPEC), atol=0, rtol=0)

    out.sum().backward()
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_a_learned_scale_stays_positive_however_far_a_step_pushes_it():
    # learned directly, a step larger than the scale (Adam: about lr) made it negative; fake quant of
    # a symmetric range did not notice, and export refused the layer at the end of the run
    fq = FakeQuantizer(WEIGHT_SPEC, "fc.weight", "weight")
    fq.quantize = True
    w = torch.randn(8, 32, generator=_gen(10)) * 0.01
    fq(w)
    p = fq.make_learnable()
    opt = torch.optim.AdamW([p], lr=3e-2)
    for _ in range(50):
        opt.zero_grad()
        ((fq(w) - 0.5 * w) ** 2).sum().backward()  # wants half the range: every scale goes down
        opt.step()  # a step of about lr = 3e-2, where the scales are about 2e-4
    assert bool((fq.current_scale() > 0).all())
    assert bool((fq.current_scale() < 0.5 * fq.lsq_base).any())  # and they did go down


def test_a_checkpoint_holding_a_directly_learned_scale_is_refused_by_name():
    fq = FakeQuantizer(WEIGHT_SPEC, "fc.weight", "weight")
    fq.quantize = True
    fq(torch.randn(8, 32, generator=_gen(11)))
    state = dict(fq.state_dict(), learned_scale=fq.scale.clone())
    fresh = FakeQuantizer(WEIGHT_SPEC, "fc.weight", "weight")
    with pytest.raises(ValueError, match=re.escape("'fc.weight': this quantizer state holds a learned scale as hwaware 0.1.0")):
        fresh.load_state_dict(state)


def test_a_learned_fp16_scale_is_the_one_export_packs():
    # the forward rounds a learned scale to float16; current_scale() (what export packs) did not
    from hwaware.ops.packing import dequantize_int4_weight, quantize_int4_weight

    spec = QuantSpec(bits=4, granularity="per_group", group_size=32, scale_dtype="float16")
    fq = FakeQuantizer(spec, "l.0", "weight")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    fq.quantize = True
    fq(w)
    fq.freeze()
    log_scale = fq.make_learnable()
    with torch.no_grad():
        log_scale.add_(torch.linspace(-0.05, 0.05, log_scale.numel()).reshape(log_scale.shape))
    y = fq(w)
    scale = fq.current_scale()
    assert torch.equal(scale, scale.half().float())
    packed, scales, zeros = quantize_int4_weight(w, 32, True, scale=scale)
    assert torch.equal(dequantize_int4_weight(packed, scales, zeros, 32), y.detach())
