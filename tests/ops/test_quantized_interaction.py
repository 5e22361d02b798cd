"""The interaction's rows straight into the top MLP's int8 input: ``hwaware::dot_interaction_int8`` is
``quantize_per_token`` of ``hwaware::dot_interaction`` bit for bit, ``hwaware::int8_mlp_quantized`` of
those codes is ``hwaware::int8_mlp`` of the float rows bit for bit (with and without AMX, and the
reference math), and DLRM's exported forward takes that path only where it gives the same bits."""
import copy

import pytest
import torch

import hwaware.ops as ops
from hwaware.ops.reference import quantize_per_token_ref
from hwaware.quant import native
from tests.helpers import dlrm_unfused, int8_chain_top, int8_layers, record_calls, use_int8_engine


def _vectors(batch, nvec, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g) for _ in range(nvec)]


def _quantize(z):
    """The codes and scales int8_mlp's first layer makes of float rows z (native pass, or the reference)."""
    got = native.quant_tokens_i8(z.contiguous()) if z.numel() else None
    return got if got is not None else quantize_per_token_ref(z)


@pytest.mark.parametrize("batch,nvec,dim,pad", [(2048, 27, 16, 0), (33, 5, 7, 3), (1, 2, 40, 1), (16, 27, 16, 4),
                                                (17, 1, 3, 0), (0, 3, 4, 2)])
def test_codes_are_the_quantized_interaction(batch, nvec, dim, pad):
    vs = _vectors(batch, nvec, dim)
    codes, scales = ops.dot_interaction_int8(vs, pad)
    want_codes, want_scales = _quantize(ops.dot_interaction(vs, pad))
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert codes.shape == (batch, dim + nvec * (nvec - 1) // 2 + pad) and scales.shape == (batch,)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    if pad:
        assert (codes[:, -pad:] == 0).all()


def test_a_row_with_nan_or_inf_gets_a_nan_scale_and_the_others_are_untouched():
    vs = _vectors(40, 6, 16)
    vs[2][3, 4], vs[0][17, 0], vs[5][39, 15] = float("nan"), float("inf"), -float("inf")
    codes, scales = ops.dot_interaction_int8(vs, 0)
    want_codes, want_scales = _quantize(ops.dot_interaction(vs, 0))
    bad = torch.tensor([3, 17, 39])
    assert scales[bad].isnan().all() and want_scales[bad].isnan().all()
    keep = ~scales.isnan()
    assert keep.sum() == 37
    assert torch.equal(codes[keep], want_codes[keep]) and torch.equal(scales[keep], want_scales[keep])


def test_without_the_one_pass_the_two_passes_give_the_same(monkeypatch):
    vs = _vectors(50, 7, 9)
    fused = ops.dot_interaction_int8(vs, 2)
    monkeypatch.setattr(native, "dot_interaction_int8", lambda vectors, pad: None)
    two = ops.dot_interaction_int8(vs, 2)
    assert torch.equal(fused[0], two[0]) and torch.equal(fused[1], two[1])
    strided = [torch.randn(9, 50).t() for _ in range(3)]  # non-contiguous vectors are made contiguous
    assert torch.equal(ops.dot_interaction_int8(strided, 0)[0], _quantize(ops.dot_interaction(strided, 0))[0])


def test_other_dtypes_quantize_the_float32_rows():
    vs = [v.double() for v in _vectors(12, 4, 8)]
    codes, scales = ops.dot_interaction_int8(vs, 1)
    want = quantize_per_token_ref(ops.dot_interaction(vs, 1).float())
    assert torch.equal(codes, want[0]) and torch.equal(scales, want[1])


@pytest.mark.parametrize("rows", [1, 31, 32, 33, 64, 100, 2048])
@pytest.mark.parametrize("dims", [(367, 256, 128), (13, 64, 16), (65, 17, 33, 1), (64, 48)])
@pytest.mark.parametrize("engine", [*native.ENGINES, None])
def test_mlp_of_the_codes_is_the_mlp_of_the_floats(monkeypatch, rows, dims, engine):
    use_int8_engine(monkeypatch, engine)
    qws, scales, biases = int8_layers(dims)
    relus = [True] * (len(dims) - 2) + [False]
    x = torch.randn(rows, dims[0]) * 2
    codes, sx = _quantize(x)
    got = ops.int8_mlp_quantized(codes, sx, qws, scales, biases, relus)
    assert got.dtype == torch.float32 and got.shape == (rows, dims[-1])
    assert torch.equal(got, ops.int8_mlp(x, qws, scales, biases, relus))
    assert torch.equal(got, ops._int8_mlp_quantized_any(codes, sx, qws, scales, biases, relus))  # the reference math


def test_mlp_of_the_codes_reads_strided_and_empty_inputs():
    qws, scales, biases = int8_layers((40, 24, 8))
    x = torch.randn(70, 40)
    codes, sx = _quantize(x)
    wide = torch.zeros(70, 64, dtype=torch.int8)
    wide[:, :40] = codes
    got = ops.int8_mlp_quantized(wide[:, :40], sx, qws, scales, biases, [True, False])
    assert torch.equal(got, ops.int8_mlp(x, qws, scales, biases, [True, False]))
    empty = ops.int8_mlp_quantized(codes[:0], sx[:0], qws, scales, biases, [True, False])
    assert empty.shape == (0, 8)


def test_rejects_bad_inputs():
    qws, scales, biases = int8_layers((16, 8))
    codes, sx = _quantize(torch.randn(5, 16))
    with pytest.raises(TypeError, match="codes must be .*int8"):
        ops.int8_mlp_quantized(codes.float(), sx, qws, scales, biases, [False])
    with pytest.raises(TypeError, match="scales must be .*float32"):
        ops.int8_mlp_quantized(codes, sx.double(), qws, scales, biases, [False])
    with pytest.raises(ValueError, match=r"codes must be \[M, K\] and scales \[M\]"):
        ops.int8_mlp_quantized(codes, sx[:4], qws, scales, biases, [False])
    with pytest.raises(ValueError, match=r"K = qweights\[0\].shape\[1\] = 16, got \[5, 15\]"):
        ops.int8_mlp_quantized(codes[:, :15], sx, qws, scales, biases, [False])
    with pytest.raises(ValueError, match="at least one layer"):
        ops.int8_mlp_quantized(codes, sx, [], [], [], [])
    with pytest.raises(ValueError, match="pad=-1 must be >= 0"):
        ops.dot_interaction_int8(_vectors(3, 2, 4), -1)
    with pytest.raises(ValueError, match="at least one"):
        ops.dot_interaction_int8([], 0)


def test_opcheck():
    qws, scales, biases = int8_layers((16, 8, 4))
    codes, sx = _quantize(torch.randn(6, 16))
    torch.library.opcheck(torch.ops.hwaware.int8_mlp_quantized.default, (codes, sx, qws, scales, biases, [True, False]))
    torch.library.opcheck(torch.ops.hwaware.dot_interaction_int8.default, (_vectors(6, 4, 8), 3))


def _exported_dlrm(top=(32, 16)):
    from hwaware.recsys import DLRM

    torch.manual_seed(0)
    model = DLRM(table_sizes=(50, 30, 20), embedding_dim=8, bottom_mlp=(16, 8), top_mlp=top).eval()
    int8_chain_top(model)
    dense, sparse = torch.randn(45, 13), torch.stack([torch.randint(0, n, (45,)) for n in (50, 30, 20)], 1)
    return model, dense, sparse


@pytest.fixture
def seen(monkeypatch):
    """Records each call of hwaware::dot_interaction_int8 (as DLRM makes it, through .default)."""
    return record_calls(monkeypatch, torch.ops.hwaware.dot_interaction_int8)


def test_dlrm_feeds_the_int8_chain_codes_and_gets_the_same_bits(seen, monkeypatch):
    model, dense, sparse = _exported_dlrm()
    with torch.no_grad():
        out = model(dense, sparse)
        assert seen == [1]
        assert torch.equal(out, dlrm_unfused(model, dense, sparse))
    monkeypatch.undo()  # the real overload for torch.export (2.11's export read the counting lambda's _dispatch_cache)
    program = torch.export.export(model, (dense, sparse))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"hwaware.dot_interaction_int8.default", "hwaware.int8_mlp_quantized.default"} <= targets
    assert torch.equal(program.module()(dense, sparse), out)


def test_dlrm_keeps_the_float_rows_where_something_would_see_them(seen):
    model, dense, sparse = _exported_dlrm()
    with torch.no_grad():
        want = dlrm_unfused(model, dense, sparse)
    inputs = []
    hooked = copy.deepcopy(model)
    hooked.top_mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with torch.no_grad():
        assert torch.equal(hooked(dense, sparse), want)
    assert len(inputs) == 1 and inputs[0].dtype == torch.float32  # the hook saw the float rows
    dequant = copy.deepcopy(model)
    dequant.top_mlp[0].kernels = {"cpu": "dequant"}  # the chain no longer starts with int_mm
    with torch.no_grad():
        dequant(dense, sparse)
    assert seen == []
