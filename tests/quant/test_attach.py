"""attach_quantization: quantized forwards vs manual references, invisibility, skips, pickling, grads."""
from __future__ import annotations

import copy
import importlib.util
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwaware.quant import attach as attach_mod
from hwaware.quant.attach import (
    QUANTIZABLE_TYPES,
    attach_quantization,
    detach_quantization,
    find_quantizable,
    normalize_layer_specs,
    quant_state,
    quant_states,
)
from hwaware.quant.fake_quant import FakeQuantizer
from hwaware.quant.primitives import as_channels, channel_minmax, compute_qparams, fake_quantize
from hwaware.quant.spec import QuantSpec

# the callback's defaults: int8 per-channel weights, int8 dynamic per-token activations, FBGEMM rows
WEIGHT_SPEC = QuantSpec(bits=8, granularity="per_channel")
ACT_SPEC = QuantSpec(bits=8, granularity="per_row", dynamic=True)
EMB_SPEC = QuantSpec(bits=8, granularity="per_row", symmetric=False, dynamic=True)
INT4_G32 = QuantSpec(bits=4, granularity="per_group", group_size=32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fq(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Pure-primitive reference: min-max qparams of ``t`` itself, then fake quantization."""
    mn, mx = channel_minmax(as_channels(t, spec))
    scale, zp = compute_qparams(mn, mx, spec)
    return fake_quantize(t, scale, zp, spec)


def _quantize(model: nn.Module, weight_spec=WEIGHT_SPEC, activation_spec=ACT_SPEC, embedding_spec=EMB_SPEC, skip=()):
    """find + attach + switch every quantizer to fake quantization (the QAT phase)."""
    plan, skipped = find_quantizable(
        model, weight_spec=weight_spec, activation_spec=activation_spec, embedding_spec=embedding_spec, skip=skip
    )
    states = attach_quantization(model, plan)
    for st in states.values():
        for q in st.quantizers():
            q.quantize = True
    return states, skipped


class TinyNet(nn.Module):
    """Linear + conv + embedding bag: one of each forward kind that a CTR/vision model uses."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.EmbeddingBag(40, 16, mode="sum")
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.fc = nn.Linear(32 + 16, 8)
        self.head = nn.Linear(8, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # dense: [B, 16], ids: [n], offsets: [B]
        c = self.conv(dense.unsqueeze(1)).flatten(1)  # [B, 32]
        h = torch.relu(self.fc(torch.cat([c, self.emb(ids, offsets)], dim=1)))
        return self.head(h).squeeze(-1)


def _tiny_batch(seed: int = 1):
    g = _gen(seed)
    return torch.randn(4, 16, generator=g), torch.randint(0, 40, (10,), generator=g), torch.tensor([0, 2, 5, 5])


# ------------------------------------------------------------------------------------------------
# quantized forward == manual reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)], ids=["2d", "3d-tokens"])
def test_linear_matches_manual_reference(shape):
    lin = nn.Linear(24, 12)
    states, _ = _quantize(lin)
    st = states[""]
    assert (st.kind, st.weight.spec, st.activation.spec) == ("linear", WEIGHT_SPEC, ACT_SPEC)
    x = torch.randn(shape, generator=_gen(0))
    ref = F.linear(_fq(x, ACT_SPEC), _fq(lin.weight, WEIGHT_SPEC), lin.bias)
    torch.testing.assert_close(lin(x), ref, atol=0, rtol=0)
    assert not torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_linear_per_group_int4_weight_only_matches_reference():
    lin = nn.Linear(64, 8)
    states, _ = _quantize(lin, weight_spec=INT4_G32, activation_spec=None)
    assert states[""].activation is None
    x = torch.randn(3, 64, generator=_gen(1))
    torch.testing.assert_close(lin(x), F.linear(x, _fq(lin.weight, INT4_G32), lin.bias), atol=0, rtol=0)


@pytest.mark.parametrize(
    "make, functional",
    [
        (lambda: nn.Conv1d(3, 6, 3, stride=2, padding=1), F.conv1d),
        (lambda: nn.Conv2d(3, 6, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1)), F.conv2d),
        (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), F.conv2d),
    ],
    ids=["conv1d", "conv2d-dilated", "conv2d-groups-nobias"],
)
def test_conv_matches_manual_reference(make, functional):
    conv = make()
    states, _ = _quantize(conv)
    st = states[""]
    # there is no token axis in NC(H)W: a per-row activation spec becomes one dynamic scale per tensor
    assert st.kind == "conv" and st.activation.spec == ACT_SPEC.replace(granularity="per_tensor")
    x = torch.randn((2, conv.in_channels, 9) + ((8,) if isinstance(conv, nn.Conv2d) else ()), generator=_gen(2))
    xq = _fq(x, ACT_SPEC.replace(granularity="per_tensor"))
    ref = functional(xq, _fq(conv.weight, WEIGHT_SPEC), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(conv(x), ref, atol=0, rtol=0)


def test_conv_padding_mode_circular_matches_stock_module_on_quantized_tensors():
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
    stock = copy.deepcopy(conv)
    _quantize(conv)
    x = torch.randn(1, 2, 6, 6, generator=_gen(3))
    with torch.no_grad():
        stock.weight.copy_(_fq(conv.weight, WEIGHT_SPEC))
    ref = stock(_fq(x, ACT_SPEC.replace(granularity="per_tensor")))
    torch.testing.assert_close(conv(x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("ids_shape", [(7,), (3, 5)])
def test_embedding_gathered_rows_equal_whole_table_quantization(ids_shape):
    emb = nn.Embedding(30, 16, padding_idx=0)
    states, _ = _quantize(emb)
    assert states[""].kind == "embedding" and states[""].activation is None
    ids = torch.randint(0, 30, ids_shape, generator=_gen(4))
    ids.view(-1)[0] = 0
    ref = F.embedding(ids, _fq(emb.weight, EMB_SPEC))
    out = emb(ids)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert out.shape == ids_shape + (16,)


# The key "two paths agree" test: FBGEMM row-wise scales depend on the row alone, so quantizing only
# the gathered rows (what attach does) must equal quantizing the whole table, bit for bit.
EMBEDDING_BAG_CASES = [
    dict(mode="sum"),
    dict(mode="mean"),
    dict(mode="max"),
    dict(mode="sum", per_sample_weights=True),
    dict(mode="sum", padding_idx=3),
    dict(mode="mean", padding_idx=3),
    dict(mode="sum", include_last_offset=True),
    dict(mode="mean", include_last_offset=True, padding_idx=0),
    dict(mode="sum", two_d=True),
    dict(mode="mean", two_d=True, padding_idx=3),
    dict(mode="sum", two_d=True, per_sample_weights=True),
]


def _bag_inputs(case, vocab: int, seed: int):
    g = _gen(seed)
    if case.get("two_d"):
        ids, offsets = torch.randint(0, vocab, (4, 5), generator=g), None  # [B, L] fixed-length bags
    else:
        ids = torch.randint(0, vocab, (13,), generator=g)
        offsets = torch.tensor([0, 4, 4, 9, 13] if case.get("include_last_offset") else [0, 4, 4, 9])  # one empty bag
    if case.get("padding_idx") is not None:
        ids.view(-1)[::3] = case["padding_idx"]
    psw = torch.rand(ids.shape, generator=g) if case.get("per_sample_weights") else None
    return ids, offsets, psw


@pytest.mark.parametrize("case", EMBEDDING_BAG_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_embedding_bag_gathered_rows_equal_whole_table_quantization(case):
    kwargs = {k: case[k] for k in ("mode", "padding_idx", "include_last_offset") if k in case}
    bag = nn.EmbeddingBag(50, 16, **kwargs)
    with torch.no_grad():
        bag.weight.add_(torch.linspace(-2, 2, 50).unsqueeze(1))  # rows with offsets far from zero
    stock = copy.deepcopy(bag)
    states, _ = _quantize(bag)
    assert states[""].kind == "embedding_bag"
    ids, offsets, psw = _bag_inputs(case, 50, seed=5)

    table_q = _fq(bag.weight, EMB_SPEC)  # [V, D] every row with its own scale and float offset
    ref = F.embedding_bag(ids, table_q, offsets, mode=bag.mode, per_sample_weights=psw,
                          include_last_offset=bag.include_last_offset, padding_idx=bag.padding_idx)
    out = bag(ids, offsets, per_sample_weights=psw)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert not torch.equal(out, stock(ids, offsets, per_sample_weights=psw))  # quantization is on


def test_embedding_bag_2d_input_with_offsets_raises_like_torch():
    bag = nn.EmbeddingBag(10, 4)
    _quantize(bag)
    with pytest.raises(ValueError, match=r"if input is 2D, then offsets has to be None"):
        bag(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 3]))


@pytest.mark.parametrize("mode, padding_idx", [("sum", None), ("mean", None), ("max", None), ("sum", 0), ("mean", 0)])
def test_embedding_bag_2d_input_ignores_include_last_offset_like_torch(mode, padding_idx):
    # torch gives B bags for [B, L] ids whatever include_last_offset says; fake quant gave B - 1
    # (and a fit crashed at calibration on the short batch)
    bag = nn.EmbeddingBag(10, 4, mode=mode, include_last_offset=True, padding_idx=padding_idx)
    ids = torch.randint(0, 10, (5, 3), generator=torch.Generator().manual_seed(0))
    table_q = _fq(bag.weight, EMB_SPEC)
    ref = F.embedding_bag(ids, table_q, mode=mode, padding_idx=padding_idx)  # [5, 4]
    _quantize(bag)
    torch.testing.assert_close(bag(ids), ref, atol=0, rtol=0)


def test_a_pattern_naming_a_modules_second_name_says_which_name_to_use():
    # "matches no layer of M" although M has that attribute: it is the same table under a second name
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.user_table = nn.EmbeddingBag(10, 4)
            self.author_table = self.user_table
            self.head = nn.Linear(4, 1)

    hint = r"\('author_table' is 'user_table' under a second name: patterns match a module by its first name, so use 'user_table'\)"
    with pytest.raises(ValueError, match=r"skip pattern 'author_table' matches no layer of M " + hint):
        find_quantizable(M(), weight_spec=WEIGHT_SPEC, embedding_spec=EMB_SPEC, skip=["author_table"])
    with pytest.raises(ValueError, match=r"layer_specs pattern 'author_table' matches no quantizable layer of M " + hint):
        find_quantizable(M(), weight_spec=WEIGHT_SPEC, embedding_spec=EMB_SPEC, layer_specs={"author_table": EMB_SPEC})


@pytest.mark.parametrize("make, why", [
    (lambda: nn.Embedding(10, 4, max_norm=1.0), r"max_norm=1.0 renormalizes the rows it looks up"),
    (lambda: nn.EmbeddingBag(10, 4, max_norm=2.0), r"max_norm=2.0 renormalizes the rows it looks up"),
    (lambda: nn.EmbeddingBag(10, 4, mode="max", padding_idx=0), r"mode='max' with padding_idx: no row-wise deploy op"),
])
def test_tables_no_deploy_op_serves_are_not_quantized(make, why):
    # QAT fake-quantized and KL-validated them, then export left them FP32 without a word (and packed
    # max_norm bags, never renormalized: bags 4x longer than FP32's)
    model = nn.Sequential(make())
    plan, skipped = find_quantizable(model, weight_spec=WEIGHT_SPEC, embedding_spec=EMB_SPEC)
    assert plan == {} and list(skipped) == ["0"]
    import re

    assert re.search(why, skipped["0"]), skipped["0"]


@pytest.mark.parametrize("bits, scale_dtype", [(4, "float16"), (8, "float32")])
@pytest.mark.parametrize("given", ["float16", "float32"])
def test_a_tables_scale_dtype_is_its_row_formats(bits, scale_dtype, given):
    # FBGEMM stores int4 rows' scale and offset as float16 and int8 rows' as float32: with another
    # dtype QAT rounded differently from the artifact (0.15% of int4 codes, 2.8% of int8 ones differed)
    spec = QuantSpec(bits=bits, granularity="per_row", symmetric=False, dynamic=True, scale_dtype=given)
    plan, _ = find_quantizable(nn.Sequential(nn.EmbeddingBag(10, 4)), weight_spec=WEIGHT_SPEC, embedding_spec=spec)
    assert plan["0"][1] == spec.replace(scale_dtype=scale_dtype)


# ------------------------------------------------------------------------------------------------
# invisible to research code
# ------------------------------------------------------------------------------------------------
def test_disabled_state_equals_original_module_exactly():
    net = TinyNet()
    stock = copy.deepcopy(net)
    states, _ = _quantize(net)
    assert set(states) == {"emb", "conv", "fc", "head"}
    batch = _tiny_batch()
    assert not torch.equal(net(*batch), stock(*batch))
    for st in states.values():
        st.enabled = False
    torch.testing.assert_close(net(*batch), stock(*batch), atol=0, rtol=0)


LAYERS = {
    "linear": (lambda: nn.Linear(6, 3), lambda g: (torch.randn(2, 4, 6, generator=g),)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), lambda g: (torch.randn(2, 2, 7, generator=g),)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), lambda g: (torch.randn(2, 2, 5, 5, generator=g),)),
    "embedding": (lambda: nn.Embedding(9, 4, padding_idx=1), lambda g: (torch.randint(0, 9, (3, 4), generator=g),)),
    "embedding_bag": (
        lambda: nn.EmbeddingBag(9, 4, mode="mean", padding_idx=1),
        lambda g: (torch.tensor([1, 2, 3, 1, 8, 5]), torch.tensor([0, 2, 2])),
    ),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_each_layer_type_disabled_equals_stock_and_stays_a_subclass(kind):
    make, inputs = LAYERS[kind]
    torch.manual_seed(0)
    layer = make()
    stock = copy.deepcopy(layer)
    keys = list(layer.state_dict())
    states, _ = _quantize(layer)
    st = states[""]
    assert isinstance(layer, type(stock)) and st.original_class is type(stock)
    assert list(layer.state_dict()) == keys
    args = inputs(_gen(10))
    assert not torch.equal(layer(*args), stock(*args))
    st.enabled = False
    torch.testing.assert_close(layer(*args), stock(*args), atol=0, rtol=0)


def test_isinstance_and_state_dict_keys_unchanged():
    net = TinyNet()
    keys = list(net.state_dict())
    _quantize(net)
    assert isinstance(net.fc, nn.Linear) and isinstance(net.conv, nn.Conv1d) and isinstance(net.emb, nn.EmbeddingBag)
    assert type(net.fc) is not nn.Linear  # the class was swapped for a subclass
    assert list(net.state_dict()) == keys
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in TinyNet().named_parameters()]
    assert not any(isinstance(m, FakeQuantizer) for m in net.modules())  # kept out of the tree

    fresh = TinyNet()
    for p in fresh.parameters():
        nn.init.zeros_(p)
    fresh.load_state_dict(net.state_dict(), strict=True)
    for st in quant_states(net).values():
        st.enabled = False
    torch.testing.assert_close(fresh(*_tiny_batch()), net(*_tiny_batch()), atol=0, rtol=0)


def test_quant_states_and_describe():
    net = TinyNet()
    states, _ = _quantize(net)
    assert quant_states(net) == states
    assert quant_state(net.fc) is states["fc"]
    assert states["fc"].describe() == {"kind": "linear", "weight": "int8/per_channel/sym",
                                       "activation": "int8/per_row/sym/dyn", "enabled": True}
    assert states["emb"].describe()["activation"] is None


# ------------------------------------------------------------------------------------------------
# planning: what is skipped and why
# ------------------------------------------------------------------------------------------------
class LoRALinear(nn.Linear):
    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.lora = nn.Parameter(torch.zeros(o, i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + self.lora, self.bias)


class PlainSubLinear(nn.Linear):
    """A subclass that keeps nn.Linear.forward: quantizable."""


def test_subclass_overriding_forward_is_skipped_with_reason():
    model = nn.Sequential(LoRALinear(8, 8), PlainSubLinear(8, 4))
    plan, skipped = find_quantizable(model, weight_spec=WEIGHT_SPEC)
    assert set(plan) == {"1"}
    assert skipped == {"0": "LoRALinear overrides forward(); hwaware leaves custom layers untouched"}
    attach_quantization(model, plan)
    assert type(model[0]) is LoRALinear and quant_state(model[0]) is None
    assert isinstance(model[1], PlainSubLinear) and quant_state(model[1]) is not None


def test_skip_patterns():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    model.add_module("head", nn.Linear(4, 1))
    model.add_module("emb", nn.Embedding(5, 4))
    plan, skipped = find_quantizable(model, weight_spec=WEIGHT_SPEC, embedding_spec=EMB_SPEC, skip=["head", "encoder.1"])
    assert set(plan) == {"encoder.0", "emb"}
    assert skipped == {"encoder.1": "matches skip pattern 'encoder.1'", "head": "matches skip pattern 'head'"}
    # a parent name skips everything under it; globs work
    plan, skipped = find_quantizable(model, weight_spec=WEIGHT_SPEC, embedding_spec=EMB_SPEC, skip=["encoder", "e*"])
    assert set(plan) == {"head"}
    assert skipped["encoder.0"] == skipped["encoder.1"] == "matches skip pattern 'encoder'"
    assert skipped["emb"] == "matches skip pattern 'e*'"
    # a typo would quantize the layer it meant to keep: refused, with the candidates
    with pytest.raises(ValueError, match=r"skip pattern 'haed' matches no layer of Sequential; the quantizable layers "
                                         r"are: encoder\.0, encoder\.1, head, emb"):
        find_quantizable(model, weight_spec=WEIGHT_SPEC, embedding_spec=EMB_SPEC, skip=["haed"])
    # a pattern naming a module that is no candidate (a container, a norm) is accepted
    model.add_module("norm", nn.LayerNorm(4))
    find_quantizable(model, weight_spec=WEIGHT_SPEC, embedding_spec=EMB_SPEC, skip=["norm"])


def test_per_group_skips_with_reason():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 40), nn.Conv1d(2, 2, 3), nn.Embedding(4, 4))
    # said as loudly as a layer_specs override the layer cannot take (that warned; this was silent)
    with pytest.warns(UserWarning, match=r"weight_spec int4/g32/sym: 2 layer\(s\) cannot take it and stay FP32: "
                                         r"1: in_features=8 is not a multiple of group_size=32; 2: per_group weights "
                                         r"are defined for Linear layers only\. Give them another spec through layer_specs"):
        plan, skipped = find_quantizable(model, weight_spec=INT4_G32)
    assert set(plan) == {"0"}
    assert skipped == {
        "1": "in_features=8 is not a multiple of group_size=32",
        "2": "per_group weights are defined for Linear layers only",
        "3": "embedding quantization disabled (embedding_spec=None)",
    }


def test_layer_specs_override_per_layer_and_keep_the_global_skip_reasons():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 40), nn.Conv1d(2, 2, 3), nn.Embedding(4, 4), nn.Linear(40, 2))
    rows4 = QuantSpec(bits=4, granularity="per_row", symmetric=False)
    with pytest.warns(UserWarning) as caught:
        plan, skipped = find_quantizable(
            model, weight_spec=WEIGHT_SPEC, activation_spec=ACT_SPEC, skip=["4"],
            layer_specs={"0": {"weight": INT4_G32, "activation": None}, "[12]": INT4_G32, "3": rows4, "4": INT4_G32})
    # layer 0: its own weight, weight-only; an embedding gets a table even with embedding_spec=None
    assert plan == {"0": ("linear", INT4_G32, None), "3": ("embedding", rows4.replace(dynamic=True, scale_dtype="float16"), None)}
    assert skipped == {
        "1": "in_features=8 is not a multiple of group_size=32 (layer_specs['[12]'])",
        "2": "per_group weights are defined for Linear layers only (layer_specs['[12]'])",
        "4": "matches skip pattern '4' (skip wins over layer_specs['4'])",  # matching only skipped layers: a warning
    }
    messages = [str(w.message) for w in caught]
    assert any("layer_specs pattern '4' applies to no layer: every layer it matches (4) is skipped by skip=" in m for m in messages)
    # an explicit override a layer cannot take leaves it FP32: said, not only listed in the report
    assert ("layer_specs: 2 layer(s) cannot take the spec asked for and stay FP32: 1: in_features=8 is not a multiple of "
            "group_size=32 (layer_specs['[12]']); 2: per_group weights are defined for Linear layers only") in " ".join(messages)
    # no layer_specs: the global specs everywhere, as before
    assert find_quantizable(model, weight_spec=WEIGHT_SPEC)[0]["0"] == ("linear", WEIGHT_SPEC, None)


def test_layer_specs_errors_name_the_pattern_and_the_layers():
    model = nn.Sequential(nn.Linear(64, 8), nn.Embedding(4, 4))
    with pytest.raises(ValueError, match=r"pattern 'head' matches no quantizable layer of Sequential; quantizable layers are: 0, 1"):
        find_quantizable(model, weight_spec=WEIGHT_SPEC, layer_specs={"head": INT4_G32})
    with pytest.raises(ValueError, match=r"pattern '0' never applies: every layer it matches \(0\) is matched by an earlier"):
        find_quantizable(model, weight_spec=WEIGHT_SPEC, layer_specs={"*": {"activation": None}, "0": INT4_G32})
    with pytest.raises(ValueError, match=r"layer_specs\['1'\] for embedding layer '1': granularity='per_group'"):
        find_quantizable(model, weight_spec=WEIGHT_SPEC, layer_specs={"1": INT4_G32})


def test_plan_is_side_effect_free_and_unknown_layer_errors():
    model = nn.Sequential(nn.Linear(4, 4))
    plan, _ = find_quantizable(model, weight_spec=WEIGHT_SPEC)
    assert type(model[0]) is nn.Linear and quant_state(model[0]) is None
    with pytest.raises(ValueError, match=r"layer 'decoder' is not in the model"):
        attach_quantization(model, {"decoder": plan["0"]})


def test_quantizable_types():
    assert set(QUANTIZABLE_TYPES) == {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.EmbeddingBag}


# ------------------------------------------------------------------------------------------------
# re-attach, detach
# ------------------------------------------------------------------------------------------------
def test_reattach_replaces_quantizers_and_keeps_original_class():
    lin = nn.Linear(64, 8)
    _quantize(lin, weight_spec=INT4_G32, activation_spec=None)
    plan, _ = find_quantizable(lin, weight_spec=WEIGHT_SPEC, activation_spec=ACT_SPEC)
    assert plan[""][1] == WEIGHT_SPEC  # an attached layer is still plannable
    st = attach_quantization(lin, plan)[""]
    assert st.original_class is nn.Linear and st.weight.spec == WEIGHT_SPEC
    detach_quantization(lin)
    assert type(lin) is nn.Linear


def test_detach_restores_original_classes_and_forward():
    net = TinyNet()
    stock = copy.deepcopy(net)
    classes = {n: type(m) for n, m in net.named_modules()}
    _quantize(net)
    detach_quantization(net)
    assert {n: type(m) for n, m in net.named_modules()} == classes
    assert quant_states(net) == {}
    torch.testing.assert_close(net(*_tiny_batch()), stock(*_tiny_batch()), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# pickling and copies
# ------------------------------------------------------------------------------------------------
def test_pickle_and_deepcopy_give_identical_outputs():
    net = TinyNet()
    _quantize(net)
    batch = _tiny_batch()
    out = net(*batch)
    for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert type(clone.fc) is type(net.fc)
        assert set(quant_states(clone)) == {"emb", "conv", "fc", "head"}
        assert quant_state(clone.fc) is not quant_state(net.fc)  # own quantizers, not shared
        torch.testing.assert_close(clone(*batch), out, atol=0, rtol=0)


def test_pickled_model_loads_in_a_fresh_interpreter(monkeypatch):
    # In a fresh interpreter hwaware.quant.attach is imported but no layer was attached yet, so the
    # lazily generated QuantizedLinear does not exist. Stand in a freshly executed copy of the module
    # (the state a new process has after import) while unpickling.
    lin = nn.Linear(4, 3)
    _quantize(lin)
    blob = pickle.dumps(lin)
    out = lin(torch.ones(2, 4))
    spec = importlib.util.find_spec(attach_mod.__name__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, attach_mod.__name__, fresh)
    spec.loader.exec_module(fresh)
    restored = pickle.loads(blob)
    assert isinstance(restored, nn.Linear)
    torch.testing.assert_close(restored(torch.ones(2, 4)), out, atol=0, rtol=0)


def test_a_layer_of_a_non_torch_class_unpickles_in_a_new_process(tmp_path):
    """A Linear subclass that keeps nn.Linear's forward gets a generated class no fresh process has
    until something attaches to that class: the pickle names the original class instead."""
    import subprocess

    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    net = nn.Sequential(NonDynamicallyQuantizableLinear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    _quantize(net)
    x = torch.randn(3, 8)
    torch.save((net, x, net(x)), tmp_path / "net.pt")
    code = (f"import torch; net, x, y = torch.load({str(tmp_path / 'net.pt')!r}, weights_only=False); "
            "from hwaware.quant import quant_states; print(type(net[0]).__name__, torch.equal(net(x), y), sorted(quant_states(net)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["Quantized_torch_nn_modules_linear_NonDynamicallyQuantizableLinear", "True", "['0',", "'2']"], \
        out.stderr[-2000:]


class Linear(nn.Linear):  # noqa: D101 - a user class that shares nn.Linear's name (e.g. from a model zoo)
    pass


def test_two_layer_classes_with_the_same_name_stay_picklable(monkeypatch):
    # Isolate the generated-class registry so this test cannot leak into others.
    attach_mod._quantized_class(nn.Linear, "linear")
    monkeypatch.setattr(attach_mod, "_CLASS_CACHE", dict(attach_mod._CLASS_CACHE))
    monkeypatch.setattr(attach_mod, "QuantizedLinear", attach_mod.QuantizedLinear)
    stock, mine = nn.Linear(4, 3), Linear(4, 3)
    _quantize(stock)
    _quantize(mine)
    x = torch.ones(2, 4)
    for m in (stock, mine):
        torch.testing.assert_close(pickle.loads(pickle.dumps(m))(x), m(x), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
def test_linear_gradients_flow_to_weight_and_bias():
    lin = nn.Linear(16, 8)
    _quantize(lin)
    x = torch.randn(5, 16, generator=_gen(6))
    upstream = torch.randn(5, 8, generator=_gen(7))
    (lin(x) * upstream).sum().backward()

    w = lin.weight.detach().clone().requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    (F.linear(_fq(x, ACT_SPEC), _fq(w, WEIGHT_SPEC), b) * upstream).sum().backward()
    assert float(lin.weight.grad.abs().sum()) > 0
    torch.testing.assert_close(lin.weight.grad, w.grad, atol=0, rtol=0)
    torch.testing.assert_close(lin.bias.grad, b.grad, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_gradients_reach_gathered_rows_only(mode):
    bag = nn.EmbeddingBag(50, 8, mode=mode, padding_idx=2)
    _quantize(bag)
    ids = torch.tensor([5, 7, 2, 7, 11, 40, 2, 5])
    offsets = torch.tensor([0, 3, 6])
    upstream = torch.randn(3, 8, generator=_gen(8))
    (bag(ids, offsets) * upstream).sum().backward()
    grad = bag.weight.grad
    touched = {int(i) for i in torch.nonzero(grad.abs().sum(1)).flatten()}
    assert touched == {5, 7, 11, 40}  # the padding row 2 was gathered but is excluded from pooling

    table = bag.weight.detach().clone().requires_grad_()
    ref = F.embedding_bag(ids, _fq(table, EMB_SPEC), offsets, mode=mode, padding_idx=2)
    (ref * upstream).sum().backward()
    # same terms, possibly summed in a different order for repeated ids
    torch.testing.assert_close(grad, table.grad, atol=1e-6, rtol=1e-6)


def test_embedding_gradients_reach_gathered_rows_only():
    emb = nn.Embedding(20, 4)
    _quantize(emb)
    ids = torch.tensor([[1, 3], [3, 19]])
    emb(ids).sum().backward()
    touched = {int(i) for i in torch.nonzero(emb.weight.grad.abs().sum(1)).flatten()}
    assert touched == {1, 3, 19}
    torch.testing.assert_close(emb.weight.grad[3], torch.full((4,), 2.0), atol=0, rtol=0)  # gathered twice, STE


# ------------------------------------------------------------------------------------------------
# weight observers, activation specs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("observer", ["moving_average", "histogram"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_weight_observer_sees_training_forwards_only(kind, observer):
    """A weight spec with a stateful observer was updated by every forward, eval too (validation, the
    sanity check of a resume), while activations observed training batches only: limit_val_batches
    changed the final weights."""
    layer = nn.Linear(16, 4) if kind == "linear" else nn.Conv1d(2, 4, 3)
    spec = QuantSpec(granularity="per_tensor", observer=observer, averaging_constant=0.5)
    states, _ = _quantize(layer, weight_spec=spec, activation_spec=None)
    wq = states[""].weight
    x = torch.randn(3, 16, generator=_gen(0)) if kind == "linear" else torch.randn(3, 2, 8, generator=_gen(0))
    layer.train()
    layer(x)
    trained = copy.deepcopy(wq.state_dict())
    assert int(trained["observer.observed"]) == 1
    with torch.no_grad():
        layer.weight.mul_(3.0)  # an eval forward on other weights: no range of theirs is recorded
    layer.eval()
    out = layer(x)
    assert all(torch.equal(trained[k], v) for k, v in wq.state_dict().items())
    # eval quantizes with the scale training left
    w = fake_quantize(layer.weight, trained["scale"], trained["zero_point"], spec)
    ref = F.linear(x, w, layer.bias) if kind == "linear" else F.conv1d(x, w, layer.bias)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    layer.train()
    layer(x)
    assert int(wq.observer.observed) == 2 and not torch.equal(wq.scale, trained["scale"])


def test_a_min_max_weight_tracks_the_live_weight_in_eval_too():
    """A min-max weight quantizer keeps no statistics: its scale is the weight's own, in eval as in training."""
    lin = nn.Linear(16, 4)
    states, _ = _quantize(lin, activation_spec=None)
    x = torch.randn(3, 16, generator=_gen(0))
    lin.train()
    lin(x)
    with torch.no_grad():
        lin.weight.mul_(2.0)
    lin.eval()
    torch.testing.assert_close(lin(x), F.linear(x, _fq(lin.weight, WEIGHT_SPEC), lin.bias), atol=0, rtol=0)
    mn, mx = channel_minmax(as_channels(lin.weight, WEIGHT_SPEC))
    torch.testing.assert_close(states[""].weight.scale, compute_qparams(mn, mx, WEIGHT_SPEC)[0], atol=0, rtol=0)


@pytest.mark.parametrize("spec, what", [
    (QuantSpec(bits=8), r"granularity='per_channel' \(int8/per_channel/sym\) is invalid for activations \(QuantSpec's "
                        r"default granularity is 'per_channel'"),
    (QuantSpec(bits=4, granularity="per_group", group_size=32), r"granularity='per_group' \(int4/g32/sym\)"),
    (QuantSpec(granularity="per_row"), r"granularity='per_row' with dynamic=False \(int8/per_row/sym\)"),
], ids=["per_channel", "per_group", "static_per_row"])
def test_activation_specs_with_a_scale_per_batch_position_are_refused(spec, what):
    """Static per_channel / per_group / per_row activation scales were one per batch position: the fit
    (or eval) crashed on a batch of another size. Refused for the global spec and for overrides."""
    model = nn.Sequential(nn.Linear(64, 8))
    fix = r"write QuantSpec\(bits=%d, granularity='per_row', dynamic=True\).*QuantSpec\(bits=%d, granularity='per_tensor'\)" % (
        spec.bits, spec.bits)
    with pytest.raises(ValueError, match=r"^activation_spec: " + what + ".*" + fix):
        find_quantizable(model, weight_spec=WEIGHT_SPEC, activation_spec=spec)
    with pytest.raises(ValueError, match=r"^layer_specs\['0'\]\['activation'\]: " + what):
        normalize_layer_specs({"0": {"activation": spec}})
    with pytest.raises(ValueError, match=r"^layer_specs\['0'\]\['activation'\]: " + what):
        find_quantizable(model, weight_spec=WEIGHT_SPEC, layer_specs={"0": {"activation": spec}})


@pytest.mark.parametrize("spec", [
    ACT_SPEC, QuantSpec(granularity="per_tensor"), QuantSpec(granularity="per_tensor", dynamic=True),
    QuantSpec(granularity="per_tensor", observer="histogram"), QuantSpec(granularity="per_row", symmetric=False, dynamic=True),
], ids=lambda s: s.short())
def test_activation_specs_activations_support_are_accepted(spec):
    model = nn.Sequential(nn.Linear(64, 8))
    plan, _ = find_quantizable(model, weight_spec=WEIGHT_SPEC, activation_spec=spec)
    assert plan["0"][2] == spec
    assert normalize_layer_specs({"0": {"activation": spec}}) == {"0": {"activation": spec}}


def test_layers_with_weights_hwaware_does_not_quantize_are_listed_with_the_reason():
    # a ConvTranspose or Conv3d stayed FP32 with no word in the report or the manifest
    model = nn.Sequential(nn.Linear(8, 8), nn.ConvTranspose1d(8, 8, 3), nn.Conv3d(2, 2, 1), nn.LSTM(8, 8), nn.Bilinear(4, 4, 2))
    plan, skipped = find_quantizable(model, weight_spec=QuantSpec(bits=8, granularity="per_channel"))
    assert set(plan) == {"0"}
    assert {name: why.split(" (")[0] for name, why in skipped.items()} == {
        "1": "hwaware has no quantization for ConvTranspose1d", "2": "hwaware has no quantization for Conv3d",
        "3": "hwaware has no quantization for LSTM", "4": "hwaware has no quantization for Bilinear"}


def test_an_int8_weight_spec_with_code_minus_128_has_no_deploy_op():
    # int8 layers are packed in [-127, 127]: a full-range spec trained on -128 and export packed -127
    from hwaware.export.deploy import no_deploy_op

    assert no_deploy_op("linear", QuantSpec(bits=8, granularity="per_channel")) is None
    why = no_deploy_op("linear", QuantSpec(bits=8, granularity="per_channel", narrow_range=False))
    assert why is not None and "narrow_range=False" in why and "[-127, 127]" in why
