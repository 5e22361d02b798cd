"""KL validation: histogram KL properties, output KL vs formulas, per-layer collection vs manual SQNR."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwaware.quant.attach import attach_quantization, find_quantizable, quant_states
from hwaware.quant.kl import LayerErrorCollector, channel_kl, collect_layer_errors, histogram_kl, output_kl
from hwaware.quant.primitives import as_channels, channel_minmax, compute_qparams, fake_quantize, sqnr_db
from hwaware.quant.spec import QuantSpec

WEIGHT_SPEC = QuantSpec(bits=8, granularity="per_channel")
ACT_SPEC = QuantSpec(bits=8, granularity="per_row", dynamic=True)
# collector SQNR accumulates squared errors per call; the manual reference sums once over all calls
SQNR_REL_TOL = 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fq(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    mn, mx = channel_minmax(as_channels(t, spec))
    return fake_quantize(t, *compute_qparams(mn, mx, spec), spec)


# ------------------------------------------------------------------------------------------------
# histogram KL
# ------------------------------------------------------------------------------------------------
def test_histogram_kl_of_identical_tensors_is_zero():
    x = torch.randn(64, 128, generator=_gen(0))
    assert histogram_kl(x, x) == 0.0
    assert histogram_kl(x, x.clone(), bins=16) == 0.0
    assert histogram_kl(torch.ones(10), torch.ones(10)) == 0.0  # degenerate range


def test_histogram_kl_grows_with_noise():
    x = torch.randn(64, 128, generator=_gen(0))
    noise = torch.randn(64, 128, generator=_gen(1))
    # measured: 0.0028, 0.0098, 0.10 nats
    kls = [histogram_kl(x, x + level * noise) for level in (0.05, 0.25, 1.0)]
    assert 0.0 < kls[0] < kls[1] < kls[2]


def test_histogram_kl_orders_bit_widths_of_a_linear_output():
    g = _gen(2)
    x = torch.randn(64, 128, generator=g)  # [B, K]
    w = torch.randn(32, 128, generator=g) / math.sqrt(128)  # [N, K]
    ref = F.linear(x, w)
    kls = {}
    for bits in (8, 4, 2):
        wspec = QuantSpec(bits=bits, granularity="per_channel")
        aspec = QuantSpec(bits=bits, granularity="per_row", dynamic=True)
        kls[bits] = histogram_kl(ref, F.linear(_fq(x, aspec), _fq(w, wspec)))
    # measured: int8 7e-5, int4 4e-4, int2 3.4e-2 nats
    assert 0.0 < kls[8] < kls[4] < kls[2]


def test_histogram_kl_reference_and_errors():
    r = torch.tensor([0.0, 0.0, 1.0, 1.0] * 64)  # 256 values -> bins capped at 8
    a = torch.tensor([0.0, 1.0, 1.0, 1.0] * 64)
    p = torch.zeros(8, dtype=torch.float64)
    q = torch.zeros(8, dtype=torch.float64)
    p[0], p[-1], q[0], q[-1] = 128, 128, 64, 192
    eps = 1e-8
    p, q = (p + eps) / (p + eps).sum(), (q + eps) / (q + eps).sum()
    assert histogram_kl(r, a) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-12)
    assert histogram_kl(r, torch.full_like(r, float("nan"))) == math.inf
    with pytest.raises(ValueError, match=r"bins=1"):
        histogram_kl(r, a, bins=1)
    with pytest.raises(ValueError, match=r"empty"):
        histogram_kl(torch.empty(0), torch.empty(0))


# ------------------------------------------------------------------------------------------------
# output KL
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(256,), (256, 1)])
def test_output_kl_bernoulli_matches_formula(shape):
    r = torch.randn(shape, generator=_gen(3)) * 2.0
    a = r + torch.randn(shape, generator=_gen(4)) * 0.3
    p = torch.sigmoid(r.double().flatten())
    q = torch.sigmoid(a.double().flatten())
    expected = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean()
    assert output_kl(r, a) == pytest.approx(float(expected), rel=1e-10)
    assert output_kl(r, r) == 0.0


def test_output_kl_softmax_matches_torch_kl_div():
    r = torch.randn(32, 10, generator=_gen(5)) * 3.0  # [B, C] logits
    a = r + torch.randn(32, 10, generator=_gen(6)) * 0.5
    ref = F.kl_div(F.log_softmax(a.double(), -1), F.log_softmax(r.double(), -1), reduction="batchmean", log_target=True)
    assert output_kl(r, a) == pytest.approx(float(ref), rel=1e-10)
    assert output_kl(r, a) > 0.0


def test_output_kl_reads_probabilities_and_multilabel_outputs_as_told():
    # float64, so the sigmoid / softmax applied here rounds no more than output_kl's own
    r = torch.randn(64, 1, generator=_gen(7)).double() * 2.0
    a = r + torch.randn(64, 1, generator=_gen(8)).double() * 0.3
    # a probability output (sigmoid in forward) carries the same distribution as its logit
    assert output_kl(torch.sigmoid(r), torch.sigmoid(a), "probabilities") == pytest.approx(output_kl(r, a), rel=1e-9)
    # ... and read as logits it is understated (what the default did to it, silently)
    assert output_kl(torch.sigmoid(r), torch.sigmoid(a)) < 0.3 * output_kl(r, a)
    c = torch.randn(32, 6, generator=_gen(9)).double()
    d = c + torch.randn(32, 6, generator=_gen(10)).double() * 0.4
    assert output_kl(c.softmax(-1), d.softmax(-1), "probabilities") == pytest.approx(output_kl(c, d), rel=1e-9)
    # two binary heads: the sum over heads of each head's Bernoulli KL, per sample
    h, g = torch.randn(40, 2, generator=_gen(11)).double(), torch.randn(40, 2, generator=_gen(12)).double() * 0.3
    heads = sum(output_kl(h[:, i], (h + g)[:, i]) for i in range(2))
    assert output_kl(h, h + g, "multilabel_logits") == pytest.approx(heads, rel=1e-9)
    assert output_kl(h.sigmoid(), (h + g).sigmoid(), "multilabel_probabilities") == pytest.approx(heads, rel=1e-9)
    # read as softmax logits, a shift both heads share cancels
    assert output_kl(h, h + 0.5) < 1e-12 < output_kl(h, h + 0.5, "multilabel_logits")
    with pytest.raises(ValueError, match=r"output_kl kind='logit'; expected one of \('logits', 'probabilities'"):
        output_kl(r, a, "logit")


def test_output_kl_shape_mismatch():
    with pytest.raises(ValueError, match=r"shapes differ, \(4, 3\) vs \(4, 2\)"):
        output_kl(torch.zeros(4, 3), torch.zeros(4, 2))


# ------------------------------------------------------------------------------------------------
# channel KL (the per-layer measure)
# ------------------------------------------------------------------------------------------------
def test_channel_kl_matches_kl_div_of_scaled_softmax():
    r = torch.randn(24, 10, generator=_gen(10)) * 4.0 + 1.0  # [samples, C]
    a = r + torch.randn(24, 10, generator=_gen(11)) * 0.2
    s = r.double().std()
    ref = F.kl_div(F.log_softmax(a.double() / s, -1), F.log_softmax(r.double() / s, -1), reduction="none", log_target=True).sum(-1)
    kl = channel_kl(r, a)
    assert kl.shape == (24,)
    torch.testing.assert_close(kl, ref, atol=1e-15, rtol=1e-10)
    assert bool((channel_kl(r, r) == 0).all())
    # invariant to the layer's scale (a power of two keeps the float32 inputs exact)
    torch.testing.assert_close(channel_kl(r * 64.0, a * 64.0), kl, atol=1e-15, rtol=1e-9)


def test_channel_kl_conv_layout_and_single_logit():
    r = torch.randn(2, 6, 3, 4, generator=_gen(12))  # [B, C, H, W]: C is the distribution axis
    a = r + torch.randn(2, 6, 3, 4, generator=_gen(13)) * 0.1
    kl = channel_kl(r, a, channel_dim=1)
    assert kl.shape == (2 * 3 * 4,)
    torch.testing.assert_close(kl, channel_kl(r.movedim(1, -1), a.movedim(1, -1)), atol=0, rtol=0)

    logit = torch.randn(64, 1, generator=_gen(14))
    logit_q = logit + 0.05
    p, q = torch.sigmoid(logit.double()[:, 0]), torch.sigmoid(logit_q.double()[:, 0])
    bern = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(channel_kl(logit, logit_q), bern, atol=1e-15, rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# per-layer collection
# ------------------------------------------------------------------------------------------------
def _quantized_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    plan, _ = find_quantizable(model, weight_spec=WEIGHT_SPEC, activation_spec=ACT_SPEC)
    plan["4"] = ("linear", QuantSpec(bits=4, granularity="per_channel"), QuantSpec(bits=4, granularity="per_row", dynamic=True))
    states = attach_quantization(model, plan)
    for st in states.values():
        for q in st.quantizers():
            q.quantize = True
    return model, states


def test_layer_error_collector_matches_manual_sqnr():
    model, states = _quantized_mlp()
    batches = [torch.randn(48, 32, generator=_gen(7 + i)) for i in range(2)]

    # manual: feed each layer the quantized model's own input, run it quantized and in FP32
    refs = {n: [] for n in states}
    outs = {n: [] for n in states}
    for x in batches:
        h = x
        for name, layer in model.named_children():
            if name in states:
                outs[name].append(layer(h))
                refs[name].append(F.linear(h, layer.weight, layer.bias))
            h = layer(h)

    with LayerErrorCollector(states).attach_to(model) as c:
        for x in batches:
            model(x)
    res = c.results()
    assert set(res) == {"0", "2", "4"}
    for name in states:
        expected = sqnr_db(torch.cat(refs[name]), torch.cat(outs[name]))
        assert res[name]["sqnr_db"] == pytest.approx(expected, rel=SQNR_REL_TOL)
        # mean per-sample channel KL over all samples of all calls (each call scaled by its own std)
        kls = torch.cat([channel_kl(r, o) for r, o in zip(refs[name], outs[name])])
        assert res[name]["kl"] == pytest.approx(float(kls.mean()), rel=1e-9)
        assert res[name]["kl"] > 0.0
    # the int4 layer is the noisiest by both measures
    assert res["4"]["sqnr_db"] < min(res["0"]["sqnr_db"], res["2"]["sqnr_db"])
    assert res["4"]["kl"] > max(res["0"]["kl"], res["2"]["kl"])

    # hooks are gone after the block: more forwards change nothing
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    model(batches[0])
    assert c.results() == res
    # the collector restored every layer's quantization
    assert all(st.enabled for st in quant_states(model).values())


def test_collector_skips_disabled_layers_and_context_manager_helper():
    model, states = _quantized_mlp()
    states["2"].enabled = False
    x = torch.randn(16, 32, generator=_gen(9))
    with collect_layer_errors(model, states) as c:
        out = model(x)
        assert sum(len(m._forward_hooks) for m in model.modules()) == 3
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    res = c.results()
    assert set(res) == {"0", "4"}
    # the collector's FP32 re-run does not disturb the quantized output
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)


def test_collector_sqnr_is_inf_for_an_exact_layer():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4, 8))
        lin.bias.zero_()
    plan, _ = find_quantizable(lin, weight_spec=WEIGHT_SPEC)
    states = attach_quantization(lin, plan)
    states[""].weight.quantize = True
    x = torch.randint(-3, 4, (6, 8)).float()  # identity rows are exactly representable
    with LayerErrorCollector(states).attach_to(lin) as c:
        lin(x)
    assert c.results()[""] == {"kl": 0.0, "sqnr_db": math.inf}
