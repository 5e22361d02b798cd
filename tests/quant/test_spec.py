"""QuantSpec: every misconfiguration is rejected with a message naming it; derived ranges; round trips."""
from __future__ import annotations

import dataclasses

import pytest

from hwaware.quant.spec import GRANULARITIES, OBSERVERS, SCALE_DTYPES, QuantSpec


# ------------------------------------------------------------------------------------------------
# misconfiguration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(bits=1), ValueError, r"bits=1 .*\[2, 8\]"),
        (dict(bits=9), ValueError, r"bits=9 .*\[2, 8\]"),
        (dict(bits=True), TypeError, r"bits must be an int, got bool True"),
        (dict(bits=8.0), TypeError, r"bits must be an int, got float 8.0"),
        (dict(granularity="per_block"), ValueError, r"granularity='per_block'.*per_tensor"),
        (dict(granularity="per_group"), ValueError, r"group_size=None with granularity='per_group'.*\(32, 64, 128\)"),
        (dict(granularity="per_group", group_size=16), ValueError, r"group_size=16 with granularity='per_group'"),
        (dict(granularity="per_channel", group_size=32), ValueError, r"group_size=32 is only meaningful.*granularity='per_channel'"),
        (dict(granularity="per_tensor", observer="percentile"), ValueError, r"observer='percentile'.*minmax"),
        (dict(granularity="per_channel", observer="histogram"), ValueError, r"observer='histogram' supports.*'per_channel'"),
        (dict(granularity="per_channel", dynamic=True), ValueError, r"dynamic=True needs granularity.*'per_channel'"),
        (dict(granularity="per_group", group_size=32, dynamic=True), ValueError, r"dynamic=True needs granularity.*'per_group'"),
        (dict(granularity="per_row", dynamic=True, learnable=True), ValueError, r"learnable=True cannot be combined with dynamic=True"),
        (dict(granularity="per_row", symmetric=False, learnable=True), ValueError, r"learnable=True is not supported for affine per_row"),
        (dict(scale_dtype="bfloat16"), ValueError, r"scale_dtype='bfloat16'.*float32"),
        (dict(symmetric=False, narrow_range=True), ValueError, r"narrow_range=True requires symmetric=True"),
        (dict(narrow_range="yes"), TypeError, r"narrow_range must be a bool or None, got 'yes'"),
        (dict(symmetric=1), TypeError, r"symmetric must be a bool, got 1"),
        (dict(dynamic="no"), TypeError, r"dynamic must be a bool, got 'no'"),
        (dict(averaging_constant=0), ValueError, r"averaging_constant=0; .*\(0, 1\]"),
        (dict(averaging_constant=1.5), ValueError, r"averaging_constant=1.5; .*\(0, 1\]"),
        (dict(averaging_constant="0.1"), ValueError, r"averaging_constant='0.1'"),
        (dict(averaging_constant=True), ValueError, r"averaging_constant=True; "),
    ],
    ids=lambda v: ",".join(f"{k}={val!r}" for k, val in v.items()) if isinstance(v, dict) else "",
)
def test_spec_misconfiguration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QuantSpec(**kwargs)


def test_spec_is_frozen():
    spec = QuantSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_spec_accepts_every_listed_granularity_and_scale_dtype(granularity, scale_dtype):
    group_size = 64 if granularity == "per_group" else None
    spec = QuantSpec(granularity=granularity, group_size=group_size, scale_dtype=scale_dtype)
    assert (spec.granularity, spec.group_size, spec.scale_dtype) == (granularity, group_size, scale_dtype)


@pytest.mark.parametrize("observer", OBSERVERS)
def test_spec_accepts_every_observer_per_tensor(observer):
    assert QuantSpec(granularity="per_tensor", observer=observer).observer == observer


# ------------------------------------------------------------------------------------------------
# derived ranges
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, narrow, qrange",
    [
        (dict(bits=8), True, (-127, 127)),  # narrow by default at 8 bits: negation is exact
        (dict(bits=8, narrow_range=False), False, (-128, 127)),
        (dict(bits=8, symmetric=False), False, (0, 255)),
        (dict(bits=4), False, (-8, 7)),  # int4 uses the full range (DESIGN.md)
        (dict(bits=4, narrow_range=True), True, (-7, 7)),
        (dict(bits=4, symmetric=False), False, (0, 15)),
        (dict(bits=2), False, (-2, 1)),
        (dict(bits=2, symmetric=False), False, (0, 3)),
    ],
)
def test_spec_qmin_qmax(kwargs, narrow, qrange):
    spec = QuantSpec(**kwargs)
    assert spec.narrow_range is narrow
    assert (spec.qmin, spec.qmax) == qrange


def test_float_offset_only_for_affine_per_row():
    assert QuantSpec(granularity="per_row", symmetric=False).float_offset
    assert not QuantSpec(granularity="per_row", symmetric=True).float_offset
    assert not QuantSpec(granularity="per_channel", symmetric=False).float_offset


def test_replace_bits_rederives_narrow_range():
    int8 = QuantSpec(bits=8)
    assert int8.narrow_range is True
    int4 = int8.replace(bits=4)
    assert int4.narrow_range is False
    assert (int4.qmin, int4.qmax) == (-8, 7)
    back = int4.replace(bits=8)
    assert back.narrow_range is True and back == int8


def test_replace_keeps_explicit_narrow_range_and_revalidates():
    assert QuantSpec(bits=8).replace(bits=4, narrow_range=True).qmin == -7
    with pytest.raises(ValueError, match=r"bits=9"):
        QuantSpec().replace(bits=9)
    with pytest.raises(ValueError, match=r"group_size=None with granularity='per_group'"):
        QuantSpec().replace(granularity="per_group")


def test_replace_symmetric_false_on_default_int8_spec():
    # narrow_range was *derived* (True because symmetric and 8 bits); switching to affine must
    # re-derive it, as replace(bits=...) does, instead of failing on a value the user never set.
    affine = QuantSpec(bits=8).replace(symmetric=False)
    assert affine.narrow_range is False
    assert (affine.qmin, affine.qmax) == (0, 255)


# ------------------------------------------------------------------------------------------------
# serialization
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(),
        QuantSpec(bits=4, granularity="per_group", group_size=128, symmetric=False, scale_dtype="float16"),
        QuantSpec(bits=8, granularity="per_row", dynamic=True),
        QuantSpec(bits=6, granularity="per_tensor", observer="moving_average", averaging_constant=0.25, learnable=True),
    ],
    ids=lambda s: s.short(),
)
def test_to_dict_from_dict_round_trip(spec):
    d = spec.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(QuantSpec)}
    assert d["narrow_range"] is spec.narrow_range  # stored resolved, not None
    assert QuantSpec.from_dict(d) == spec


def test_from_dict_errors():
    with pytest.raises(ValueError, match=r"unknown fields \['bitz'\]"):
        QuantSpec.from_dict({"bitz": 8})
    with pytest.raises(TypeError, match=r"expects a dict, got list"):
        QuantSpec.from_dict([("bits", 8)])
    with pytest.raises(ValueError, match=r"bits=12"):
        QuantSpec.from_dict({"bits": 12})


@pytest.mark.parametrize(
    "spec, label",
    [
        (QuantSpec(), "int8/per_channel/sym"),
        (QuantSpec(bits=4, granularity="per_group", group_size=128, symmetric=False), "int4/g128/asym"),
        (QuantSpec(granularity="per_row", dynamic=True), "int8/per_row/sym/dyn"),
    ],
)
def test_short_label(spec, label):
    assert spec.short() == label
