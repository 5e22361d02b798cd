"""Deploy layers' packed weights: a new state_dict reaches the output, and values no format can hold
are refused by name rather than packed into garbage."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hwaware
from hwaware.export.deploy import Int4Linear, Int8Linear, Sparse24Linear
from hwaware.ops import packing


def _int8(seed, impl):
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(seed))
    q, s = packing.quantize_int8_weight(w)
    return Int8Linear(q, s, torch.randn(12, generator=torch.Generator().manual_seed(seed + 50)), kernels={"cpu": impl})


def _int4(seed, _impl):
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(seed))
    packed, scales, zeros = packing.quantize_int4_weight(w, 32, symmetric=False)
    return Int4Linear(packed, scales, zeros, None, 64, 32)


def _sparse24(seed, impl):
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(seed))
    w = w.masked_fill(torch.arange(32) % 4 >= 2, 0.0)
    q, s = packing.quantize_int8_weight(w)
    values, meta = packing.compress_24(q)
    return Sparse24Linear(values, meta, s, None, kernels={"cpu": impl})


LAYERS = [(_int8, "int_mm"), (_int8, "fbgemm"), (_int8, "dequant"), (_int4, None),
          (_sparse24, "dense"), (_sparse24, "fbgemm"), (_sparse24, "dequant")]


@pytest.mark.parametrize("inference", [True, False], ids=["inference_mode", "no_grad"])
@pytest.mark.parametrize("make,impl", LAYERS, ids=[f"{m.__name__[1:]}-{i}" for m, i in LAYERS])
def test_load_state_dict_reaches_the_output(make, impl, inference):
    """Tensors made under inference_mode have no version counter, so the ops' cache of derived weights
    (prepacked, dequantized) did not see load_state_dict write into them: the layer kept serving the
    old weights (int_mm: old codes with the new scales)."""
    x = torch.randn(5, 64 if make is _int4 else 32)
    ctx = torch.inference_mode if inference else torch.no_grad
    with ctx():
        layer, other = make(0, impl), make(1, impl)
        want = other(x)
        assert not torch.equal(layer(x), want)  # the first call fills the cache
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), want)


def test_export_names_the_layer_whose_weight_is_not_finite(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].weight[1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"layer '2' cannot be packed: w has 1 non-finite value\(s\) \(NaN/inf\), "
                                         r"the first at index \[1, 4\] \(inf\)"):
        hwaware.export(model, tmp_path / "art")
    assert not (tmp_path / "art").exists()


class Tables(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.EmbeddingBag(20, 8, mode="sum")
        self.large = nn.EmbeddingBag(20, 8, mode="sum")
        with torch.no_grad():
            self.large.weight[3] *= 1e5

    def forward(self, ids, offsets):
        return self.small(ids, offsets) + self.large(ids, offsets)


def test_an_int4_table_beyond_float16_stays_dense_with_the_reason(tmp_path):
    """int4 rows store scale and offset as float16: a row reaching 1e5 had an infinite offset and
    every lookup of it returned inf."""
    torch.manual_seed(0)
    ids, offsets = torch.tensor([1, 3, 5, 7]), torch.tensor([0, 2])
    model = Tables()
    art = hwaware.export(model, tmp_path / "art", embedding_bits=4, example_inputs=(ids, offsets))
    layers = art.manifest["layers"]
    assert layers["small"]["scheme"] == "rowwise_int4"
    assert "large" not in layers or layers["large"]["scheme"] == "dense"
    reason = art.manifest["dense_layers"]["large"]
    assert reason.startswith("row 3 spans [") and "use 8-bit rows for this table" in reason
    served = hwaware.load(tmp_path / "art", model=Tables)(ids, offsets)
    assert torch.isfinite(served).all() and torch.isfinite(model(ids, offsets)).all()
