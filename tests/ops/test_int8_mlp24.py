"""``hwaware::int8_mlp24`` / ``int8_mlp24_quantized``: int8_mlp over layers some of which are 2:4
compressed. Bit for bit the 2:4 layers' own op (``sparse24_linear``, kernel "dense") and the dense
ones' (``int8_linear`` int_mm) called in turn, and ``int8_mlp`` of the decompressed codes; the codes
are decompressed once (the cache entry ``sparse24_linear`` uses); bad inputs; opcheck."""
import pytest
import torch

import hwaware.ops as ops
from hwaware.ops.packing import compress_24, decompress_24, quantize_int8_weight
from hwaware.ops.reference import quantize_per_token_ref
from hwaware.sparsity import magnitude_mask_24


def _layers(dims, sparse, bias=True, seed=0):
    """Per layer ``(stored, meta or None, w_scale, bias)``; ``sparse[i]``: layer i is 2:4 compressed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for (k, n), s24 in zip(zip(dims, dims[1:]), sparse):
        w = torch.randn(n, k, generator=g) / k**0.5
        if s24:
            w = w * magnitude_mask_24(w)
        qw, s = quantize_int8_weight(w)
        b = torch.randn(n, generator=g) if bias else None
        if s24:
            values, meta = compress_24(qw)
            out.append((values, meta, s, b))
        else:
            out.append((qw, None, s, b))
    return [list(c) for c in zip(*out)]


def _per_layer(x, stored, metas, scales, biases, relus):
    for qw, meta, s, b, r in zip(stored, metas, scales, biases, relus):
        if meta is None:
            x = ops.int8_linear(x, qw, s, b, "int_mm", r)
        else:
            x = ops.sparse24_linear(x, qw, meta, s, b, "dense")
            x = torch.relu(x) if r else x
    return x


@pytest.mark.parametrize("dims,sparse,relus", [((368, 256, 128, 4), (True, True, True), (True, True, False)),
                                               ((16, 8, 12), (False, True), (True, False)),
                                               ((24, 32, 8), (True, False), (False, True)),
                                               ((8, 4), (True,), (True,))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(300,), (2, 5), (0,)])
def test_equals_the_layers_in_turn_and_int8_mlp_of_the_codes(dims, sparse, relus, bias, lead):
    stored, metas, scales, biases = _layers(dims, sparse, bias)
    x = torch.randn(*lead, dims[0])
    y = ops.int8_mlp24(x, stored, metas, scales, biases, list(relus))
    assert y.shape == (*lead, dims[-1])
    assert torch.equal(y, _per_layer(x, stored, metas, scales, biases, relus))
    codes = [qw if m is None else decompress_24(qw, m) for qw, m in zip(stored, metas)]
    assert torch.equal(y, ops.int8_mlp(x, codes, scales, biases, list(relus)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_run_layer_by_layer(dtype):
    stored, metas, scales, biases = _layers((64, 128, 32), (True, True))
    x = torch.randn(40, 64).to(dtype)
    y = ops.int8_mlp24(x, stored, metas, scales, biases, [True, False])
    assert y.dtype == dtype and torch.equal(y, _per_layer(x, stored, metas, scales, biases, (True, False)))


def test_quantized_input_is_the_float_one_quantized():
    stored, metas, scales, biases = _layers((368, 256, 128), (True, True))
    x = torch.randn(77, 368)
    codes, sx = quantize_per_token_ref(x)
    y = ops.int8_mlp24_quantized(codes, sx, stored, metas, scales, biases, [True, True])
    assert torch.equal(y, ops.int8_mlp24(x, stored, metas, scales, biases, [True, True]))


def test_codes_are_decompressed_once_and_shared_with_sparse24_linear(monkeypatch):
    stored, metas, scales, biases = _layers((32, 16, 8), (True, True))
    ops.clear_cache()
    made = []
    real = ops.decompress_24
    monkeypatch.setattr(ops, "decompress_24", lambda *a: made.append(1) or real(*a))
    x = torch.randn(5, 32)
    for _ in range(3):
        ops.int8_mlp24(x, stored, metas, scales, biases, [True, False])
    ops.sparse24_linear(x, stored[0], metas[0], scales[0], biases[0], "dense")  # the same entry
    assert len(made) == 2


def test_rejects_bad_inputs():
    stored, metas, scales, biases = _layers((16, 8, 4), (True, True))
    x = torch.randn(5, 16)
    with pytest.raises(ValueError, match="one meta \\(or None\\) per layer, got 1 metas for 2 qweights"):
        ops.int8_mlp24(x, stored, metas[:1], scales, biases, [True, False])
    with pytest.raises(TypeError, match=r"qweights\[0\] must be \[N, K/2\] int8 2:4 values"):
        ops.int8_mlp24(x, [stored[0].float()] + stored[1:], metas, scales, biases, [True, False])
    with pytest.raises(ValueError, match=r"metas\[1\] must have shape \[N, ceil\(K/8\)\] = \[4, 1\], got \[4, 2\]"):
        ops.int8_mlp24(x, stored, [metas[0], torch.zeros(4, 2, dtype=torch.uint8)], scales, biases, [True, False])
    with pytest.raises(TypeError, match=r"metas\[0\] must be \[N, ceil\(K/8\)\] uint8"):
        ops.int8_mlp24(x, stored, [metas[0].to(torch.int8), metas[1]], scales, biases, [True, False])
    with pytest.raises(ValueError, match=r"qweights\[1\] must be \[N, K\] with K = 8 \(layer 0's outputs\), got \[4, 16\]"):
        ops.int8_mlp24(x, [stored[0], torch.zeros(4, 16, dtype=torch.int8)], [metas[0], None], scales, biases, [True, False])
    with pytest.raises(ValueError, match=r"x must have shape \[..., K\] with K = qweight.shape\[1\] = 16"):
        ops.int8_mlp24(torch.randn(5, 12), stored, metas, scales, biases, [True, False])
    codes, sx = quantize_per_token_ref(x)
    with pytest.raises(ValueError, match="codes must be \\[M, K\\] with K = qweights\\[0\\].shape\\[1\\] = 16"):
        ops.int8_mlp24_quantized(codes[:, :12], sx, stored, metas, scales, biases, [True, False])


def test_opcheck():
    stored, metas, scales, biases = _layers((16, 8, 4), (True, False))
    torch.library.opcheck(torch.ops.hwaware.int8_mlp24.default, (torch.randn(6, 16), stored, metas, scales, biases, [True, False]))
    torch.library.opcheck(torch.ops.hwaware.int8_mlp24.default,
                          (torch.randn(2, 3, 16), stored, metas, scales, [None, biases[1]], [False, True]))
    codes, sx = quantize_per_token_ref(torch.randn(6, 16))
    torch.library.opcheck(torch.ops.hwaware.int8_mlp24_quantized.default, (codes, sx, stored, metas, scales, biases, [True, False]))
