"""``hwaware::int8_mlp``: L int8 layers in one call, equal bit for bit to L ``int8_linear(impl="int_mm")``
calls, with and without the native library; bad inputs; opcheck."""
import pytest
import torch

import hwaware.ops as ops
from hwaware.ops.packing import quantize_int8_weight
from hwaware.quant import native


def _layers(dims, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    qws, scales, biases = [], [], []
    for k, n in zip(dims, dims[1:]):
        qw, s = quantize_int8_weight(torch.randn(n, k, generator=g) / k**0.5)
        qws.append(qw)
        scales.append(s)
        biases.append(torch.randn(n, generator=g) if bias else None)
    return qws, scales, biases


def _per_layer(x, qws, scales, biases, relus):
    for qw, s, b, r in zip(qws, scales, biases, relus):
        x = ops.int8_linear(x, qw, s, b, "int_mm", r)
    return x


@pytest.fixture
def impl():  # without the native library int8_mlp *is* the per-layer loop: nothing to compare
    if native._load() is None:
        pytest.skip(native.native_status())
    return "native"


@pytest.mark.parametrize("dims,relus", [((37, 64, 48, 5), (True, True, False)), ((16, 8, 8), (False, True)),
                                        ((367, 256, 128), (True, True)), ((9, 3), (True,))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(300,), (2, 5), (0,)])
def test_equals_int8_linear_layer_by_layer_bit_for_bit(impl, dims, relus, bias, lead):
    qws, scales, biases = _layers(dims, bias)
    x = torch.randn(*lead, dims[0])
    y = ops.int8_mlp(x, qws, scales, biases, list(relus))
    assert y.shape == (*lead, dims[-1])
    assert torch.equal(y, _per_layer(x, qws, scales, biases, relus))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_round_each_activation_as_the_layers_do(impl, dtype):
    """Called in turn, the layers return x.dtype, so each activation is rounded to it before the
    next layer quantizes it; int8_mlp must do the same (it runs layer by layer there)."""
    qws, scales, biases = _layers((64, 128, 128, 32))
    x = torch.randn(256, 64).to(dtype)
    y = ops.int8_mlp(x, qws, scales, biases, [True, True, False])
    assert y.dtype == dtype and torch.equal(y, _per_layer(x, qws, scales, biases, (True, True, False)))


def test_the_fused_epilogue_writes_the_codes_the_two_passes_write():
    if native._load() is None:
        pytest.skip(native.native_status())
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-50_000, 50_000, (70, 300), generator=g, dtype=torch.int32)
    sx, sw, b = torch.rand(70, generator=g) / 100, torch.rand(300, generator=g) / 100, torch.randn(300, generator=g)
    for relu in (False, True):
        q, s = native.w8a8_epilogue_quant(acc, sx, sw, b, relu, torch.empty(70, 300, dtype=torch.int8))
        q2, s2 = native.quant_tokens_i8(native.w8a8_epilogue(acc, sx, sw, b, relu))
        assert torch.equal(q, q2) and torch.equal(s, s2)


def test_rejects_bad_inputs():
    qws, scales, biases = _layers((16, 8, 4))
    x = torch.randn(5, 16)
    with pytest.raises(ValueError, match="one qweight, w_scale, bias .* per layer"):
        ops.int8_mlp(x, qws, scales[:1], biases, [True, False])
    with pytest.raises(ValueError, match="at least one layer"):
        ops.int8_mlp(x, [], [], [], [])
    with pytest.raises(ValueError, match=r"qweights\[1\] must be \[N, K\] with K = 8 \(layer 0's outputs\), got \[4, 16\]"):
        ops.int8_mlp(x, [qws[0], qws[0][:4]], scales[:1] + [scales[1]], biases, [True, False])
    with pytest.raises(TypeError, match=r"w_scales\[1\] must be \[N\] float32"):
        ops.int8_mlp(x, qws, [scales[0], scales[1].double()], biases, [True, False])
    with pytest.raises(ValueError, match=r"x must have shape \[..., K\] with K = qweight.shape\[1\] = 16"):
        ops.int8_mlp(torch.randn(5, 15), qws, scales, biases, [True, False])


def test_opcheck():
    qws, scales, biases = _layers((16, 8, 4))
    torch.library.opcheck(torch.ops.hwaware.int8_mlp.default, (torch.randn(6, 16), qws, scales, biases, [True, False]))
    torch.library.opcheck(torch.ops.hwaware.int8_mlp.default,
                          (torch.randn(2, 3, 16), qws, scales, [None, biases[1]], [False, True]))
