"""kernels/int8_linear.py (W8A8) against hwaware.ops.reference, in Triton's interpreter on CPU
(or compiled, on a CUDA machine). Kernel modules are imported inside the tests: see conftest.py."""
import pytest
import torch

from hwaware.ops.packing import quantize_int8_weight
from hwaware.ops.reference import int8_linear_ref, quantize_per_token_ref
from tests.kernels.conftest import DEVICE
from tests.kernels.tolerances import assert_close_to_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _args(m, k, n, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    qw, s = quantize_int8_weight(torch.randn(n, k, generator=g) / k**0.5)
    b = torch.randn(n, generator=g) if bias else None
    return x, qw, s, b


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_is_bit_exact(dtype):
    from hwaware.kernels.int8_linear import quantize_per_token

    x = torch.randn(7, 300).to(dtype)
    x[1] = 0.0  # all-zero row: scale = eps, codes 0
    x[2, :5] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5]).to(dtype) * (x[2].abs().max().float() / 127)  # ties
    x[3, 7] = 1e4  # outlier: the rest of the row rounds to 0
    q, s = quantize_per_token(x.to(DEVICE))
    qr, sr = quantize_per_token_ref(x)
    torch.testing.assert_close(q.cpu(), qr, atol=0, rtol=0)
    torch.testing.assert_close(s.cpu(), sr, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 36, 1), (33, 100, 17), (16, 64, 48)])  # M=1/N=1; K % 32 != 0; even tiles
def test_int8_linear_matches_reference(shape, dtype):
    from hwaware.kernels.int8_linear import int8_linear

    m, k, n = shape
    x, qw, s, b = _args(m, k, n, dtype)
    y = int8_linear(*_dev(x, qw, s, b))
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close_to_ref(y, int8_linear_ref(x, qw, s, b))


def test_int8_linear_leading_dims_no_bias_relu_and_zero_row():
    from hwaware.kernels.int8_linear import int8_linear

    x, qw, s, _ = _args(6, 40, 8, torch.float16, bias=False)
    x3 = x.reshape(2, 3, 40).clone()
    x3[1, 2] = 0.0
    y = int8_linear(*_dev(x3, qw, s, None))
    ref = int8_linear_ref(x3, qw, s)
    assert y.shape == (2, 3, 8)
    assert_close_to_ref(y, ref)
    assert torch.count_nonzero(y[1, 2]) == 0  # a zero row gives exactly 0 (the bias, here none)
    yr = int8_linear(*_dev(x3, qw, s, None), relu=True)
    assert_close_to_ref(yr, ref.clamp_min(0))


def test_int8_linear_strided_inputs():
    from hwaware.kernels.int8_linear import int8_linear

    x, qw, s, b = _args(40, 24, 12)
    xt = x.t().contiguous().t()  # column-major view: strides (1, 40)
    wt = torch.stack([qw, -qw], dim=2).reshape(12, 48)[:, ::2]  # non-contiguous view of qw (stride_wk = 2)
    assert not xt.is_contiguous() and not wt.is_contiguous()
    y = int8_linear(*_dev(xt, wt, s, b))
    assert_close_to_ref(y, int8_linear_ref(x, qw, s, b))


def test_int8_linear_empty_batch():
    from hwaware.kernels.int8_linear import int8_linear

    x, qw, s, b = _args(0, 32, 8)
    y = int8_linear(*_dev(x, qw, s, b))
    assert y.shape == (0, 8)


def test_int8_linear_bad_inputs():
    from hwaware.kernels.int8_linear import int8_linear

    x, qw, s, b = _dev(*_args(4, 32, 8))
    with pytest.raises(TypeError, match=r"qweight must be \[N, K\] int8.*got dtype torch.float32"):
        int8_linear(x, qw.float(), s, b)
    with pytest.raises(TypeError, match=r"x must be .*got dtype torch.int64"):
        int8_linear(x.long(), qw, s, b)
    with pytest.raises(ValueError, match=r"x must have shape \[..., K\] with K = qweight.shape\[1\] = 32, got \[4, 31\]"):
        int8_linear(x[:, :31], qw, s, b)
    with pytest.raises(ValueError, match=r"w_scale must have shape \[N\] float32 = \[8\], got \[7\]"):
        int8_linear(x, qw, s[:7], b)
    with pytest.raises(TypeError, match=r"w_scale must be \[N\] float32.*got dtype torch.float16"):
        int8_linear(x, qw, s.half(), b)
    with pytest.raises(ValueError, match=r"bias must have shape \[N\] float = \[8\], got \[9\]"):
        int8_linear(x, qw, s, torch.zeros(9, device=DEVICE))
    with pytest.raises(ValueError, match="one device"):
        int8_linear(x, qw, s.to("meta"), b)


def test_a_row_holding_nan_or_inf_gives_nan_outputs_as_the_cpu_op():
    # tl.maximum does not propagate NaN: the row's scale stayed finite and its outputs were numbers
    from hwaware.kernels.int8_linear import int8_linear, quantize_per_token

    x, qw, s, b = _args(4, 40, 8)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    _, scale = quantize_per_token(x.to(DEVICE))
    assert scale.cpu()[[1, 2]].isnan().all() and scale.cpu()[[0, 3]].isfinite().all()
    out = int8_linear(*_dev(x, qw, s, b)).cpu()
    cpu = torch.ops.hwaware.int8_linear(x, qw, s, b)
    assert out[[1, 2]].isnan().all() and cpu[[1, 2]].isnan().all()
    assert_close_to_ref(out[[0, 3]], int8_linear_ref(x, qw, s, b)[[0, 3]])
