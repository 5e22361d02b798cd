"""Routed ``nn.MultiheadAttention``: torch's attention, computed through two called layers."""
from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from torch import nn

from hwaware.quant.attention import (InProjection, RoutedMultiheadAttention, route_attention, route_refusal,
                                     unroute_attention)

E, H, L, S, N = 16, 4, 5, 7, 3


def _pair(batch_first: bool = True, dropout: float = 0.0, bias: bool = True):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, dropout=dropout, batch_first=batch_first, bias=bias)
    return m, route_attention(copy.deepcopy(m))


def _inputs(batch_first: bool, cross: str, batched: bool = True):
    g = torch.Generator().manual_seed(1)

    def t(length):
        shape = ((N, length, E) if batch_first else (length, N, E)) if batched else (length, E)
        return torch.randn(shape, generator=g)

    q = t(L)
    if cross == "self":
        return q, q, q
    kv = t(S)
    return (q, kv, kv) if cross == "kv" else (q, kv, t(S))


def _masks(kind: str, cross: str):
    s = L if cross == "self" else S
    g = torch.Generator().manual_seed(2)
    if kind == "none":
        return {}
    if kind == "key_padding_bool":
        kpm = torch.rand(N, s, generator=g) < 0.3
        kpm[:, 0] = False  # every query sees at least one key
        return {"key_padding_mask": kpm}
    if kind == "key_padding_float":
        return {"key_padding_mask": torch.randn(N, s, generator=g)}
    if kind == "attn_2d_bool":
        am = torch.rand(L, s, generator=g) < 0.3
        am[:, 0] = False
        return {"attn_mask": am}
    if kind == "attn_3d_float":
        return {"attn_mask": torch.randn(N * H, L, s, generator=g)}
    if kind == "causal":
        return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True} if cross == "self" else None
    if kind == "causal_and_padding":
        if cross != "self":
            return None
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[0, 3:] = True
        return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True, "key_padding_mask": kpm}
    raise AssertionError(kind)


CASES = list(itertools.product([True, False], ["self", "kv", "qkv"],
                               ["none", "key_padding_bool", "key_padding_float", "attn_2d_bool", "attn_3d_float", "causal",
                                "causal_and_padding"],
                               [(False, True), (True, True), (True, False)]))


@pytest.mark.parametrize("batch_first,cross,mask,weights", CASES)
def test_routed_attention_equals_torch_exactly(batch_first, cross, mask, weights):
    masks = _masks(mask, cross)
    if masks is None:
        pytest.skip("a causal mask is square: self-attention only")
    need_weights, average = weights
    m, r = _pair(batch_first)
    q, k, v = _inputs(batch_first, cross)
    kw = dict(masks, need_weights=need_weights, average_attn_weights=average)
    with torch.enable_grad():  # torch's slow path (eval under no_grad may take its fused kernel)
        want, want_w = m(q, k, v, **kw)
        got, got_w = r(q, k, v, **kw)
    assert torch.equal(got, want)
    assert (got_w is None) == (want_w is None) and (got_w is None or torch.equal(got_w, want_w))


def test_routed_attention_in_training_draws_the_same_dropout():
    m, r = _pair(dropout=0.3)
    m.train(), r.train()
    q, k, v = _inputs(True, "self")
    for need_weights in (True, False):
        torch.manual_seed(5)
        want = m(q, k, v, need_weights=need_weights)[0]
        torch.manual_seed(5)
        got = r(q, k, v, need_weights=need_weights)[0]
        assert torch.equal(got, want)


@pytest.mark.parametrize("cross", ["self", "kv"])
def test_unbatched_inputs_match_torch(cross):
    m, r = _pair()
    q, k, v = _inputs(True, cross, batched=False)
    with torch.enable_grad():
        want, want_w = m(q, k, v)
        got, got_w = r(q, k, v)
    # torch projects an unbatched self-attention input three times (unsqueezing made three tensors),
    # routing once: the same products summed in another blocking
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=0)
    assert got.shape == want.shape == (L, E) and got_w.shape == want_w.shape


def test_routing_keeps_the_state_dict_the_parameters_and_the_gradients():
    m, r = _pair()
    assert list(r.state_dict()) == list(m.state_dict())
    assert [n for n, _ in r.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert r.in_proj.weight is r.in_proj_weight and r.in_proj.bias is r.in_proj_bias
    # a checkpoint of either loads strictly into the other
    fresh = route_attention(nn.MultiheadAttention(E, H, batch_first=True))
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.in_proj.weight, m.in_proj_weight)
    plain = nn.MultiheadAttention(E, H, batch_first=True)
    plain.load_state_dict(r.state_dict())
    q, k, v = _inputs(True, "self")
    r(q, k, v)[0].sum().backward()
    assert r.in_proj_weight.grad is not None and r.out_proj.weight.grad is not None
    # deepcopy and pickle keep one tensor under both names
    for c in (copy.deepcopy(r), pickle.loads(pickle.dumps(r))):
        assert type(c) is RoutedMultiheadAttention and c.in_proj.weight is c.in_proj_weight
    r.half()
    assert r.in_proj.weight is r.in_proj_weight and r.in_proj_weight.dtype == torch.float16


def test_an_attention_without_bias_routes():
    m, r = _pair(bias=False)
    assert r.in_proj.bias is None
    q, k, v = _inputs(True, "self")
    with torch.enable_grad():
        assert torch.equal(r(q, k, v)[0], m(q, k, v)[0])


def test_unrouting_gives_torch_s_module_back():
    m, r = _pair()
    unroute_attention(r)
    assert type(r) is nn.MultiheadAttention and "in_proj" not in r._modules
    r2 = route_attention(copy.deepcopy(m))
    r2.in_proj = nn.Identity()
    with pytest.raises(ValueError, match="in_proj is a Identity, not the in_proj_weight view"):
        unroute_attention(r2)


@pytest.mark.parametrize("kwargs,why", [
    (dict(kdim=8, vdim=8), "separate q/k/v projection weights"),
    (dict(add_bias_kv=True), "add_bias_kv / add_zero_attn"),
    (dict(add_zero_attn=True), "add_bias_kv / add_zero_attn"),
])
def test_attention_that_cannot_be_routed_says_why(kwargs, why):
    m = nn.MultiheadAttention(E, H, **kwargs)
    assert why in route_refusal(m)
    with pytest.raises(ValueError, match=why):
        route_attention(m)
    assert type(m) is nn.MultiheadAttention


def test_a_subclass_is_not_routed():
    class Mine(nn.MultiheadAttention):
        pass

    with pytest.raises(TypeError, match="Mine is not an nn.MultiheadAttention"):
        route_attention(Mine(E, H))


def test_the_in_projection_reads_whatever_parameters_its_module_holds_now():
    m, r = _pair()
    assert list(r.in_proj.state_dict()) == [] and list(r.in_proj.parameters()) == []
    # assign=True puts new Parameter objects in the module (hwaware.load does): the view follows
    new = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    r.load_state_dict(new, assign=True)
    assert r.in_proj.weight is r.in_proj_weight and torch.equal(r.in_proj.weight, new["in_proj_weight"])
    q, k, v = _inputs(True, "self")
    m.load_state_dict(new)
    with torch.enable_grad():
        assert torch.equal(r(q, k, v)[0], m(q, k, v)[0])
    with torch.device("meta"):
        meta = route_attention(nn.MultiheadAttention(E, H, batch_first=True))
    meta.to_empty(device="cpu")  # new Parameters again
    assert meta.in_proj.weight is meta.in_proj_weight and meta.in_proj.weight.device.type == "cpu"
    assert isinstance(r.in_proj, InProjection) and r.in_proj.in_features == E and r.in_proj.out_features == 3 * E


def test_wrong_inputs_get_torch_s_errors():
    _, r = _pair()
    with pytest.raises(ValueError, match="query must be 2-D"):
        r(torch.randn(E), torch.randn(E), torch.randn(E))
    q = torch.randn(N, L, E)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        r(q, q, q, is_causal=True)
    with pytest.raises(RuntimeError, match="2D attn_mask"):
        r(q, q, q, attn_mask=torch.zeros(L + 1, L))


def test_an_out_proj_with_its_own_forward_or_hooks_is_not_routed():
    # torch never calls out_proj: routed, the module would run this forward / hook and compute
    # something else in FP32
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    m = nn.MultiheadAttention(E, H)
    m.out_proj = Doubled(E, E)
    assert "overrides forward() or has hooks" in route_refusal(m)
    m = nn.MultiheadAttention(E, H)
    m.out_proj.register_forward_hook(lambda mod, args, out: out * 0)
    assert "overrides forward() or has hooks" in route_refusal(m)
    with pytest.raises(ValueError, match="routing would change what it computes"):
        route_attention(m)


def test_a_shallow_copy_computes_with_its_own_parameters():
    # nn.DataParallel's replicas copy the module's __dict__: the view would still read the original's
    m, r = _pair()
    replica = r._replicate_for_data_parallel()  # as torch.nn.parallel.replicate does, each child replicated too
    replica._modules = {k: c._replicate_for_data_parallel() for k, c in r._modules.items()}
    replica.out_proj._parameters = dict(r.out_proj._parameters)  # (replicate assigns each replica's Parameters)
    replica._parameters = {k: None if v is None else nn.Parameter(v.detach() * 0) for k, v in r._parameters.items()}
    q, k, v = _inputs(True, "self")
    with torch.no_grad():
        out = replica(q, k, v, need_weights=False)[0]
    assert replica.in_proj._owner is replica and torch.equal(replica.in_proj.weight, torch.zeros(3 * E, E))
    assert r.in_proj._owner is r
    del out


def test_reset_parameters_leaves_the_attention_s_initialization_alone():
    m, r = _pair()
    before = r.in_proj_weight.detach().clone()
    r.apply(lambda mod: mod.reset_parameters() if isinstance(mod, InProjection) else None)
    assert torch.equal(r.in_proj_weight, before)
