"""``deploy.Int8Chain``: an exported ``nn.Sequential``'s run of CPU ``int_mm`` int8 layers is one
``hwaware::int8_mlp`` call, bit for bit the layers called in turn; what breaks a run; export and load."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import hwaware.export.exporter as exporter
from hwaware.export import export, load
from hwaware.export.deploy import Int8Chain, Int8Linear, Sparse24Linear, chain_int8
from hwaware.ops.reference import quantize_per_token_ref
from hwaware.sparsity import magnitude_mask_24
from hwaware.ops.packing import compress_24, quantize_int8_weight
from tests.helpers import TinyCTR, loaders


def _int8(k, n, impl="int_mm", relu=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw, s = quantize_int8_weight(torch.randn(n, k, generator=g) / k**0.5)
    return Int8Linear(qw, s, torch.randn(n, generator=g), {"cpu": impl}, relu)


def _mlp(impls=("int_mm", "int_mm", "int_mm")):
    return nn.Sequential(_int8(24, 32, impls[0], True), nn.Identity(), _int8(32, 16, impls[1], True, 1), nn.Identity(),
                         _int8(16, 4, impls[2], False, 2))


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = torch.ops.hwaware.int8_mlp.default
    monkeypatch.setattr(torch.ops.hwaware.int8_mlp, "default", lambda x, qws, *a: seen.append(len(qws)) or real(x, qws, *a))
    return seen


def test_a_run_is_one_call_and_the_same_bits(calls):
    seq = _mlp()
    plain = copy.deepcopy(seq)
    assert chain_int8(seq) == {"": [["0", "2", "4"]]} and type(seq) is Int8Chain
    x = torch.randn(50, 24)
    assert torch.equal(seq(x), plain(x)) and calls == [3]
    assert list(seq.state_dict()) == list(plain.state_dict())


def test_what_breaks_a_run(calls):
    x = torch.randn(7, 24)
    seq = _mlp(("int_mm", "dequant", "int_mm"))  # another implementation in the middle: no run of two
    assert chain_int8(seq) == {} and type(seq) is nn.Sequential
    seq = _mlp(("int_mm", "int_mm", "fbgemm"))  # the first two only
    plain = copy.deepcopy(seq)
    assert chain_int8(seq) == {"": [["0", "2"]]}
    assert torch.equal(seq(x), plain(x)) and calls == [2]
    seq, plain = _mlp(), copy.deepcopy(_mlp())
    chain_int8(seq)
    seen = []
    seq[1].register_forward_hook(lambda m, a, o: seen.append(o.shape))  # a hook must still fire
    assert torch.equal(seq(x), plain(x)) and seen == [(7, 32)] and calls == [2, 2]  # 2 and 4 still chain
    seq = _mlp()
    chain_int8(seq)
    seq[2].kernels["cpu"] = "fbgemm"  # chosen per call: a layer switched to another implementation leaves the run
    calls.clear()
    seq(x)
    assert calls == []
    bf = _mlp()
    chain_int8(bf)
    calls.clear()
    xb = x.bfloat16()  # per layer, other dtypes round each activation to that dtype: not chained
    assert torch.equal(bf(xb), _mlp()(xb)) and calls == []


def test_export_records_the_chain_and_load_rebuilds_it(tmp_path, monkeypatch):
    real = exporter.select_int8_kernels

    def all_int_mm(model, rows, device="cpu", allowed=None):  # the timing decides int_mm vs dequant; fix it here
        records = real(model, rows, device, allowed)
        for name, rec in records.items():
            model.get_submodule(name).kernels[device] = rec["chosen"] = rec["op_kernel"] = "int_mm"
        return records

    monkeypatch.setattr(exporter, "select_int8_kernels", all_int_mm)
    torch.manual_seed(0)
    dense, ids = torch.randn(16, 4), torch.randint(0, 50, (16,))
    art = export(TinyCTR(), tmp_path / "art", example_inputs=(dense, ids))
    for name in ("mlp.0", "mlp.2"):
        meta = art.manifest["layers"][name]
        assert meta["chain"] == ["mlp.0", "mlp.2"] and meta["kernel"]["cpu"].startswith("hwaware::int8_mlp")
    loaded = load(art.path, model=TinyCTR)
    assert type(loaded.mlp) is Int8Chain
    unchained = load(art.path, model=TinyCTR)
    unchained.mlp.__class__ = nn.Sequential
    _, val = loaders()
    with torch.no_grad():
        for batch in val:
            assert torch.equal(loaded.predict_step(batch), unchained.predict_step(batch))
    program = torch.export.load(os.path.join(art.path, "program.pt2"))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "hwaware.int8_mlp.default" in targets and "hwaware.int8_linear.default" not in targets
    torch.testing.assert_close(program.module()(dense, ids), loaded(dense, ids), atol=0, rtol=0)


def test_the_dtype_where_a_run_starts_decides_not_the_sequentials_input(calls):
    """A float32 input that an earlier child (or autocast) turns bf16 reaches the run as bf16: layer by
    layer then, as the plain Sequential computes it."""
    class ToBf16(nn.Module):
        def forward(self, x):
            return x.bfloat16()

    seq = nn.Sequential(ToBf16(), *_mlp())
    plain = copy.deepcopy(seq)
    assert chain_int8(seq) == {"": [["1", "3", "5"]]}
    x = torch.randn(40, 24)
    assert torch.equal(seq(x), plain(x)) and calls == []
    lin = nn.Sequential(nn.Linear(24, 24), *_mlp())
    plain = copy.deepcopy(lin)
    chain_int8(lin)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(lin(x), plain(x)) and calls == []
    assert torch.equal(lin(x), plain(x)) and calls == [3]  # float32 all the way: fused


def test_a_global_module_hook_sees_every_layer(calls):
    seq = _mlp()
    chain_int8(seq)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        seq(torch.randn(3, 24))
    finally:
        handle.remove()
    assert calls == [] and seen.count("Int8Linear") == 3


def _sparse(k, n, kernel="dense", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    qw, s = quantize_int8_weight(w * magnitude_mask_24(w))
    values, meta = compress_24(qw)
    return Sparse24Linear(values, meta, s, torch.randn(n, generator=g), {"cpu": kernel})


def test_int8_2_4_layers_join_a_run_as_one_int8_mlp24_call(monkeypatch):
    seen = []
    real = torch.ops.hwaware.int8_mlp24.default
    monkeypatch.setattr(torch.ops.hwaware.int8_mlp24, "default", lambda x, qws, *a: seen.append(len(qws)) or real(x, qws, *a))
    seq = nn.Sequential(_sparse(24, 32), nn.ReLU(), _int8(32, 16, seed=1), nn.ReLU(), _sparse(16, 4, seed=2))
    plain = copy.deepcopy(seq)
    assert chain_int8(seq) == {"": [["0", "2", "4"]]} and type(seq) is Int8Chain
    x = torch.randn(50, 24)
    assert torch.equal(seq(x), plain(x)) and seen == [3]
    assert seq.takes_quantized()  # (DLRM hands the chain its interaction's codes)
    codes, scales = quantize_per_token_ref(x)
    assert torch.equal(seq.forward_quantized(codes, scales), plain(x)) and seen == [3]  # (int8_mlp24_quantized)
    # what keeps a 2:4 layer out: another kernel, float values, weight-only serving
    for breaker in (_sparse(32, 16, "fbgemm", 1), _sparse(32, 16, "dequant", 1)):
        seq = nn.Sequential(_sparse(24, 32), nn.ReLU(), breaker, nn.ReLU(), _sparse(16, 4, seed=2))
        assert chain_int8(seq) == {}
    values, meta = _sparse(32, 16).values.float(), _sparse(32, 16).metadata
    seq = nn.Sequential(_sparse(24, 32), Sparse24Linear(values, meta, None, None), _sparse(16, 4, seed=2))
    assert chain_int8(seq) == {}
    wo = _sparse(32, 16, seed=1)
    wo.serve_weight_only()
    assert chain_int8(nn.Sequential(_sparse(24, 32), wo)) == {}
