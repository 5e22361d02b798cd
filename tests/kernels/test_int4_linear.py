"""kernels/int4_linear.py (W4A16, group-wise int4) against hwaware.ops.reference."""
import pytest
import torch

from hwaware.ops.packing import quantize_int4_weight
from hwaware.ops.reference import int4_linear_ref
from tests.kernels.conftest import DEVICE
from tests.kernels.tolerances import assert_close_to_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _args(m, k, n, group_size, symmetric, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    packed, scales, zeros = quantize_int4_weight(torch.randn(n, k, generator=g), group_size, symmetric)
    b = torch.randn(n, generator=g) if bias else None
    return x, packed, scales, zeros, b


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


# M <= 16 runs the split-K + reduce path, larger M the single-pass epilogue (the interpreter has one
# config of each). BLOCK_K always divides the group size, so K (a multiple of the group) is always a
# whole number of K tiles; K = 160 is 5 tiles, split unevenly (3 + 2) between the two K programs.
# M = 1 / N = 1, N not a multiple of the tile, every group size of the spec.
SHAPES = [(1, 160, 1, 32), (5, 96, 17, 32), (20, 128, 24, 64), (3, 256, 8, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_linear_matches_reference(shape, symmetric, dtype):
    from hwaware.kernels.int4_linear import int4_linear

    m, k, n, gs = shape
    x, p, s, z, b = _args(m, k, n, gs, symmetric, dtype)
    y = int4_linear(*_dev(x, p, s, z), gs, *_dev(b))
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close_to_ref(y, int4_linear_ref(x, p, s, z, gs, b))


def test_int4_linear_leading_dims_strided_and_no_bias():
    from hwaware.kernels.int4_linear import int4_linear

    x, p, s, z, _ = _args(12, 64, 10, 32, False, torch.float16, bias=False)
    x3 = x.t().contiguous().t().reshape(3, 4, 64)  # not viewable as 2-D rows without a copy: reshape copies
    p2 = torch.stack([p, p ^ 0xFF], dim=1).reshape(20, 32)[::2]  # rows 2 apart: a strided view of p
    assert not p2.is_contiguous() and torch.equal(p2, p)
    y = int4_linear(*_dev(x3, p2, s, z), 32, None)
    assert y.shape == (3, 4, 10)
    assert_close_to_ref(y, int4_linear_ref(x3, p, s, z, 32))


def test_int4_linear_bad_inputs():
    from hwaware.kernels.int4_linear import int4_linear

    x, p, s, z, b = _dev(*_args(4, 64, 8, 32, False))
    with pytest.raises(TypeError, match=r"packed must be \[N, K/2\] uint8.*got dtype torch.int8"):
        int4_linear(x, p.view(torch.int8), s, z, 32, b)
    with pytest.raises(ValueError, match=r"group_size=48 must be a positive int dividing K = 2 \* packed.shape\[1\] = 64"):
        int4_linear(x, p, s, z, 48, b)
    with pytest.raises(ValueError, match=r"scales must have shape .*\(group_size=64\) = \[8, 1\], got \[8, 2\]"):
        int4_linear(x, p, s, z, 64, b)  # scales packed for group 32, called with 64
    with pytest.raises(TypeError, match=r"zeros must be .*int8.*got dtype torch.uint8"):
        int4_linear(x, p, s, z.view(torch.uint8), 32, b)
    with pytest.raises(ValueError, match=r"with K = 2 \* packed.shape\[1\] = 64, got \[4, 32\]"):
        int4_linear(x[:, :32], p, s, z, 32, b)
    xs, ps, ss, zs, _ = _dev(*_args(2, 64, 4, 64, False))
    with pytest.raises(ValueError, match="group_size=8 must be a multiple of 16"):
        int4_linear(xs, ps, torch.ones(4, 8, device=DEVICE), None, 8, None)


def test_int4_linear_strided_bias_and_column_major_x():
    # bias is indexed bias[n] in the kernels, so a strided view must be made contiguous first; a
    # column-major 2-D x stays a view through reshape and is made row-major (int32 k offsets)
    from hwaware.kernels.int4_linear import int4_linear

    x, p, s, z, b = _args(20, 64, 10, 32, False, torch.float32)
    b2 = torch.stack([b, -b], dim=1).reshape(-1)[::2]  # every other element: stride 2
    xt = x.t().contiguous().t()  # [M, K] with strides (1, M)
    assert not b2.is_contiguous() and xt.stride(1) != 1
    for m in (20, 3):  # large-M epilogue and split-K reduce (both add the bias)
        y = int4_linear(*_dev(xt[:m], p, s, z), 32, *_dev(b2))
        assert_close_to_ref(y, int4_linear_ref(x[:m], p, s, z, 32, b))


@pytest.mark.parametrize("edit, match", [
    (lambda scales, zeros: scales.__setitem__((0, 0), -1.0), r"scales must be finite and > 0"),
    (lambda scales, zeros: scales.__setitem__((0, 0), float("nan")), r"scales must be finite and > 0, got nan"),
    (lambda scales, zeros: zeros.__setitem__((0, 0), 20), r"zeros must lie in \[0, 15\]"),
])
def test_the_cuda_implementation_refuses_the_values_the_cpu_op_refuses(edit, match):
    # the CUDA side ran only the shape checks: a negative or NaN scale, a zero point of 20, served numbers
    import hwaware.ops  # noqa: F401  (registers the ops)
    from hwaware.ops import _cuda

    x, packed, scales, zeros, b = _args(3, 64, 8, 32, symmetric=False)
    edit(scales, zeros)
    with pytest.raises(ValueError, match=match):
        torch.ops.hwaware.int4_linear(x, packed, scales, zeros, 32, b)
    with pytest.raises(ValueError, match=match):
        _cuda._int4_linear_cuda(*[None if t is None else t.to(DEVICE) for t in (x, packed, scales, zeros)], 32,
                                b.to(DEVICE))
