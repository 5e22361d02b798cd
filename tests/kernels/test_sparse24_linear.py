"""kernels/sparse24_linear.py (2:4 compressed weights) against hwaware.ops.reference / packing."""
import pytest
import torch

from hwaware.ops.packing import compress_24, decompress_24, quantize_int8_weight
from hwaware.ops.reference import sparse24_linear_ref
from tests.kernels.conftest import DEVICE
from hwaware.quant.primitives import sqnr_db
from tests.kernels.tolerances import MIN_SQNR_16BIT_LIBRARY_DB, assert_close_to_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _w24(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4).scatter_(-1, keep, 1.0).reshape(n, k)
    w = w * mask
    w[0, :4] = 0.0  # an all-zero group (positions 0, 1 hold explicit zeros)
    if k >= 8:
        w[-1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # one non-zero at position 3
    return w


def _args(m, k, n, values_dtype, x_dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    w = _w24(n, k, seed)
    if values_dtype == torch.int8:
        qw, w_scale = quantize_int8_weight(w)
        values, meta = compress_24(qw)
    else:
        values, meta = compress_24(w.to(values_dtype))
        w_scale = None
    x = torch.randn(m, k, generator=g).to(x_dtype)
    b = torch.randn(n, generator=g) if bias else None
    return x, values, meta, w_scale, b


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("values_dtype", DTYPES + [torch.int8])
def test_decompress_24_is_exact(values_dtype):
    from hwaware.kernels.sparse24_linear import decompress_24 as decompress_triton

    _, values, meta, _, _ = _args(1, 36, 5, values_dtype, torch.float32)  # K/4 = 9 groups: odd, padded nibble
    out = decompress_triton(*_dev(values, meta))
    torch.testing.assert_close(out.cpu(), decompress_24(values, meta), atol=0, rtol=0)


# (M=1, K=36: 9 groups, odd meta nibble count, K % BLOCK_K != 0, N=1), (M=17, K=72, N=20: partial tiles)
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("values_dtype", DTYPES + [torch.int8])
@pytest.mark.parametrize("shape", [(1, 36, 1), (17, 72, 20)])
def test_sparse24_linear_matches_reference(shape, values_dtype, x_dtype):
    from hwaware.kernels.sparse24_linear import sparse24_linear

    m, k, n = shape
    x, v, meta, ws, b = _args(m, k, n, values_dtype, x_dtype)
    y = sparse24_linear(*_dev(x, v, meta, ws, b))
    assert y.shape == (m, n) and y.dtype == x_dtype
    assert_close_to_ref(y, sparse24_linear_ref(x, v, meta, ws, b))


def test_sparse24_linear_leading_dims_strided_no_bias():
    from hwaware.kernels.sparse24_linear import sparse24_linear

    x, v, meta, ws, _ = _args(6, 40, 8, torch.int8, torch.bfloat16, bias=False)
    x3 = x.t().contiguous().t()[:, None, :].expand(6, 2, 40)  # strided, broadcast leading dims
    v2 = torch.stack([v, v], dim=1).reshape(16, 20)[::2]  # rows 2 apart
    assert not v2.is_contiguous()
    y = sparse24_linear(*_dev(x3, v2, meta, ws, None))
    assert y.shape == (6, 2, 8)
    assert_close_to_ref(y, sparse24_linear_ref(x3, v, meta, ws))


def test_sparse24_linear_bad_inputs():
    from hwaware.kernels.sparse24_linear import sparse24_linear

    x, v, meta, ws, b = _dev(*_args(4, 32, 8, torch.int8, torch.float32))
    with pytest.raises(ValueError, match="int8 values need w_scale"):
        sparse24_linear(x, v, meta, None, b)
    with pytest.raises(ValueError, match="w_scale is only for int8 values"):
        sparse24_linear(x, v.float(), meta, ws, b)
    with pytest.raises(ValueError, match=r"meta must have shape \[N, ceil\(K/8\)\] uint8 for K=32 = \[8, 4\], got \[8, 3\]"):
        sparse24_linear(x, v, meta[:, :3], ws, b)
    with pytest.raises(TypeError, match=r"meta must be .*uint8.*got dtype torch.int8"):
        sparse24_linear(x, v, meta.view(torch.int8), ws, b)
    with pytest.raises(ValueError, match=r"K a multiple of 4, got \[8, 15\] \(K=30\)"):
        sparse24_linear(x[:, :30], v[:, :15], meta, ws, b)
    with pytest.raises(TypeError, match=r"values must be .*got dtype torch.int32"):
        sparse24_linear(x, v.int(), meta, ws, b)


def test_semi_structured_path_refuses_cpu_and_int8():
    from hwaware.kernels.sparse24_linear import to_semi_structured

    _, v, meta, _, _ = _args(1, 32, 8, torch.float16, torch.float16)
    with pytest.raises(ValueError, match="CUDA-only"):
        to_semi_structured(v, meta)
    _, vi, metai, _, _ = _args(1, 32, 8, torch.int8, torch.float16)
    with pytest.raises(TypeError, match="got dtype torch.int8"):
        to_semi_structured(vi, metai)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's semi-structured sparse kernels are CUDA-only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_path_matches_reference_cuda(dtype):
    from hwaware.kernels.sparse24_linear import sparse24_linear_semi_structured, to_semi_structured

    x, v, meta, _, b = _args(64, 128, 64, dtype, dtype)  # sizes torch's CUTLASS / cuSPARSELt kernels accept
    w = to_semi_structured(*_dev(v, meta))
    y = sparse24_linear_semi_structured(*_dev(x), w, *_dev(b))
    ref = sparse24_linear_ref(x, v, meta, None, b)
    # torch's kernels accumulate in their own order and add the bias in x.dtype: an SQNR bound
    assert sqnr_db(ref, y.cpu()) >= MIN_SQNR_16BIT_LIBRARY_DB


@pytest.mark.parametrize("values_dtype", [torch.float16, torch.int8])
def test_sparse24_linear_strided_bias_and_scale(values_dtype):
    # bias[n] and w_scale[n] are indexed unstrided in the kernel: strided views are made contiguous
    from hwaware.kernels.sparse24_linear import sparse24_linear

    x, v, meta, ws, b = _args(5, 32, 12, values_dtype, torch.float32)
    b2 = torch.stack([b, -b], dim=1).reshape(-1)[::2]
    ws2 = None if ws is None else torch.stack([ws, 2 * ws], dim=1).reshape(-1)[::2]
    xt = x.t().contiguous().t()
    y = sparse24_linear(*_dev(xt, v, meta, ws2, b2))
    assert_close_to_ref(y, sparse24_linear_ref(x, v, meta, ws, b))


def test_the_cuda_dequant_weight_follows_its_scale():
    # the CUDA dequant cache was keyed on (values, meta) only: a new or edited w_scale served the old weight
    from hwaware.ops import _cuda

    w = _w24(8, 32)
    q, s = quantize_int8_weight(w)
    values, meta = compress_24(q)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    run = lambda scale: _cuda._sparse24_linear_cuda_impl(x.to(DEVICE), values.to(DEVICE), meta.to(DEVICE),  # noqa: E731
                                                         scale.to(DEVICE), None, "dequant").cpu()
    first = run(s)
    torch.testing.assert_close(run(s * 2), first * 2, atol=1e-5, rtol=1e-5)
    s.mul_(3)  # in place: a new version of the same tensor
    torch.testing.assert_close(run(s), first * 3, atol=1e-5, rtol=1e-5)
    # the same function as the CPU op: exact in the interpreter (the same CPU GEMM); on a GPU cuBLAS
    # sums in another order (seen on an H100: 2e-6 relative)
    tol = 0 if DEVICE == "cpu" else 1e-5
    torch.testing.assert_close(run(s), torch.ops.hwaware.sparse24_linear(x, values, meta, s, None, "dequant"),
                               atol=tol, rtol=tol)


def _small_m_configs():
    from hwaware.kernels import sparse24_linear as mod

    if DEVICE == "cpu":  # interpreter: split 1 to 4 ways over 6 K tiles of 32, the 4-way split leaving one program none
        return mod, "_CONFIG_INTERPRET_SMALL_M", [mod._cfg(16, 16, 32, 1, 1, group_m=2, split_k=s) for s in (1, 3, 4)], (3, 164, 5)
    return mod, "_CONFIGS_SMALL_M", list(mod._CONFIGS_SMALL_M), (3, 1044, 70)  # every config the GPU autotunes over


@pytest.mark.parametrize("values_dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("bias", [True, False])
def test_every_small_m_config_and_split_matches_reference(monkeypatch, values_dtype, bias):
    # the split-K partial store and the reduce kernel (bias, per-token and per-channel scales) under
    # each split, K % 8 == 4 (a padded nibble) and a partial last K tile; on a GPU each config is
    # forced in turn (the autotuner alone runs only the one it picks)
    mod, name, configs, (m, k, n) = _small_m_configs()
    x, v, meta, ws, b = _args(m, k, n, values_dtype, torch.float16 if DEVICE == "cuda" else torch.float32, bias=bias)
    ref = sparse24_linear_ref(x, v, meta, ws, b)
    for cfg in configs:
        monkeypatch.setattr(mod, name, [cfg])
        y = mod.sparse24_linear(*_dev(x, v, meta, ws, b))
        try:
            assert_close_to_ref(y, ref)
        except AssertionError as e:
            raise AssertionError(f"config {cfg}: {e}") from None
