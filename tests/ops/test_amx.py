"""The W8A8 layers on AMX tiles (``native.amx_mlp``, ``_native/w8a8.c``): the tile layout, and every
output equal bit for bit to the ``torch._int_mm`` passes it replaces (which equal ``int8_linear_ref``).

These run only where the CPU and OS have AMX-INT8; elsewhere ``int8_linear`` / ``int8_mlp`` never take
this path, and the tests say so in their skip reason."""
import pytest
import torch

import hwaware.ops as ops
from hwaware.ops.reference import int8_linear_ref
from hwaware.quant import native
from tests.helpers import int8_layers

pytestmark = pytest.mark.skipif(not native.amx_available(),
                                reason=f"no AMX-INT8 here (native: {native.native_status()})")


@pytest.fixture
def int_mm_path(monkeypatch):
    """Call ``f`` with AMX switched off: the _int_mm passes the AMX path must equal."""
    def run(f, *args):
        with monkeypatch.context() as m:
            m.setattr(native, "_amx", False)
            return f(*args)
    return run


def _layers(dims, bias, seed=0):
    qws, scales, biases = int8_layers(dims, seed)
    return qws, scales, biases if bias else [None] * len(biases)


def _reference_packing(w: torch.Tensor) -> torch.Tensor:
    """The tile layout in torch ops: pad [N, K] to [16a, 64b], then tile (column block, k block)
    holds row r = k // 4 of 16 columns x 4 codes."""
    n, k = w.shape
    npad, kpad = -n % 16, -k % 64
    wp = torch.nn.functional.pad(w, (0, kpad, 0, npad))
    nb, kb = wp.shape[0] // 16, wp.shape[1] // 64
    return wp.view(nb, 16, kb, 16, 4).permute(0, 2, 3, 1, 4).reshape(-1)


@pytest.mark.parametrize("n,k", [(1, 1), (16, 64), (17, 65), (48, 13), (256, 367), (5, 130)])
def test_pack_is_the_tile_layout(n, k):
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    assert torch.equal(native.amx_pack(w), _reference_packing(w))
    assert torch.equal(native.amx_pack(w.t().contiguous().t()), _reference_packing(w))  # strided input


@pytest.mark.parametrize("rows", [1, 31, 32, 33, 100, 1000])
@pytest.mark.parametrize("dims,relus", [((367, 256, 128), (True, True)), ((13, 64, 16), (True, False)),
                                        ((65, 17, 33, 1), (True, False, False)), ((64, 48), (False,)),
                                        ((1, 1), (True,)), ((130, 5), (False,))])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_equals_the_int_mm_passes(int_mm_path, rows, dims, relus, bias):
    qws, scales, biases = _layers(dims, bias)
    x = torch.randn(rows, dims[0]) * 3
    got = ops.int8_mlp(x, qws, scales, biases, list(relus))
    want = int_mm_path(ops.int8_mlp, x, qws, scales, biases, list(relus))
    assert torch.equal(got, want)


def test_single_layer_equals_the_reference_bit_for_bit():
    qws, scales, biases = _layers((367, 256), True)
    x = torch.randn(517, 367)
    got = ops.int8_linear(x, qws[0], scales[0], biases[0], "int_mm")
    assert torch.equal(got, int8_linear_ref(x, qws[0], scales[0], biases[0]))


def test_full_range_codes_accumulate_exactly(int_mm_path):
    """Every weight and activation code at +-127 over K = 4096: int32 sums of 66e6, exact."""
    k, n = 4096, 48
    qw = torch.where(torch.rand(n, k) < 0.5, 127, -127).to(torch.int8)
    qw[0] = 127
    x = torch.where(torch.rand(40, k) < 0.5, 1.0, -1.0)
    x[0] = 1.0
    s = torch.full((n,), 1e-3)
    got = ops.int8_linear(x, qw, s, None, "int_mm")
    assert got[0, 0].item() == pytest.approx(127 * k * (1 / 127) * 127 * 1e-3, rel=1e-6)
    assert torch.equal(got, int_mm_path(ops.int8_linear, x, qw, s, None, "int_mm"))


def test_non_finite_rows_stay_in_their_rows(int_mm_path):
    qws, scales, biases = _layers((70, 40, 24), True)
    x = torch.randn(50, 70)
    x[3, 5], x[34, 0], x[49, 69] = float("nan"), float("inf"), -float("inf")
    got = ops.int8_mlp(x, qws, scales, biases, [True, False])
    want = int_mm_path(ops.int8_mlp, x, qws, scales, biases, [True, False])
    bad = torch.tensor([3, 34, 49])
    assert got[bad].isnan().all()
    keep = torch.ones(50, dtype=torch.bool)
    keep[bad] = False
    assert torch.equal(got[keep], want[keep])


def test_thread_count_does_not_change_bits():
    qws, scales, biases = _layers((367, 256, 128), True)
    x = torch.randn(2048, 367)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.int8_mlp(x, qws, scales, biases, [True, False])
        torch.set_num_threads(2)
        two = ops.int8_mlp(x, qws, scales, biases, [True, False])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_half_input_single_layer(int_mm_path):
    qws, scales, biases = _layers((96, 40), True)
    x = torch.randn(33, 96).to(torch.bfloat16)
    got = ops.int8_linear(x, qws[0], scales[0], biases[0], "int_mm", True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, int_mm_path(ops.int8_linear, x, qws[0], scales[0], biases[0], "int_mm", True))


def test_an_in_place_weight_update_repacks(int_mm_path):
    qws, scales, biases = _layers((64, 32), False)
    x = torch.randn(20, 64)
    before = ops.int8_linear(x, qws[0], scales[0], None, "int_mm")
    qws[0].neg_()
    after = ops.int8_linear(x, qws[0], scales[0], None, "int_mm")
    assert torch.equal(after, -before)
    assert torch.equal(after, int_mm_path(ops.int8_linear, x, qws[0], scales[0], None, "int_mm"))
