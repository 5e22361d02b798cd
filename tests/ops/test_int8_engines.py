"""The W8A8 layers in one C pass (``native.int8_mlp``, ``_native/w8a8.c``) on each engine this
CPU has, AMX tiles, VNNI and VPMADDWD: the packed layout, and every output equal bit for bit to the
``torch._int_mm`` passes it replaces (which equal ``int8_linear_ref``).

An engine's tests run only where the CPU (and for AMX the OS) has it, and say so in their skip
reason; elsewhere ``int8_linear`` / ``int8_mlp`` never take that path.
``tests/quant/test_native.py`` runs this file again against builds for other CPUs (AVX-512 VNNI
without AMX, AVX-VNNI without AVX-512, AVX2 alone, AVX-512 without VNNI) where this one can run
their code."""
import pytest
import torch

import hwaware.ops as ops
from hwaware.ops.reference import int8_linear_ref
from hwaware.quant import native
from tests.helpers import int8_layers, use_int8_engine

@pytest.fixture(params=list(native.ENGINES))
def engine(request, monkeypatch):
    """Run the test on one engine, the faster ones switched off."""
    use_int8_engine(monkeypatch, request.param)
    return request.param


@pytest.fixture
def int_mm_path():
    """Call ``f`` with every engine switched off: the _int_mm passes the engines must equal."""
    def run(f, *args):
        with native.only_engines():
            assert native.int8_engine() is None
            return f(*args)
    return run


def _layers(dims, bias, seed=0):
    qws, scales, biases = int8_layers(dims, seed)
    return qws, scales, biases if bias else [None] * len(biases)


def _reference_packing(w: torch.Tensor) -> torch.Tensor:
    """The layout in torch ops: pad [N, K] to [16a, 64b], then tile (column block, k block) holds
    row r = k // 4 of 16 columns x 4 codes; then int32 128 * sum_k w[n, k] over the padded N."""
    n, k = w.shape
    npad, kpad = -n % 16, -k % 64
    wp = torch.nn.functional.pad(w, (0, kpad, 0, npad))
    nb, kb = wp.shape[0] // 16, wp.shape[1] // 64
    tiles = wp.view(nb, 16, kb, 16, 4).permute(0, 2, 3, 1, 4).reshape(-1)
    offsets = (wp.long().sum(1) * 128).to(torch.int32)
    return torch.cat([tiles, offsets.view(torch.int8)])


@pytest.mark.parametrize("n,k", [(1, 1), (16, 64), (17, 65), (48, 13), (256, 367), (5, 130)])
def test_pack_is_the_tile_layout_then_the_column_offsets(n, k):
    if native.int8_engine() is None:
        pytest.skip(f"no int8 engine here (native: {native.native_status()})")
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    assert torch.equal(native.int8_pack(w), _reference_packing(w))
    assert torch.equal(native.int8_pack(w.t().contiguous().t()), _reference_packing(w))  # strided input


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 17, 31, 32, 33, 100, 1000])
@pytest.mark.parametrize("dims,relus", [((367, 256, 128), (True, True)), ((13, 64, 16), (True, False)),
                                        ((65, 17, 33, 1), (True, False, False)), ((64, 48), (False,)),
                                        ((1, 1), (True,)), ((1, 8), (False,)), ((1, 17, 3), (True, False)),
                                        ((130, 5), (False,))])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_equals_the_int_mm_passes(engine, int_mm_path, rows, dims, relus, bias):
    qws, scales, biases = _layers(dims, bias)
    x = torch.randn(rows, dims[0]) * 3
    got = ops.int8_mlp(x, qws, scales, biases, list(relus))
    want = int_mm_path(ops.int8_mlp, x, qws, scales, biases, list(relus))
    assert torch.equal(got, want)
    if len(dims) == 2:  # and the reference itself (K = 1 once tripped torch._int_mm on a strided view)
        ref = int8_linear_ref(x, qws[0], scales[0], biases[0])
        assert torch.equal(got, ref.relu() if relus[0] else ref)


def test_codes_of_minus_128_multiply_exactly(engine, int_mm_path):
    """Codes the per-token quantizer never makes (it stops at -127), handed in directly: the VNNI
    engine's a + 128 is then 0, and the column offset still makes the product exact."""
    qws, scales, biases = _layers((100, 40, 24), True)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-128, 128, (37, 100), dtype=torch.int8, generator=g)
    codes[0], codes[1, ::2] = -128, -128
    sx = torch.rand(37, generator=g) * 1e-2
    got = ops.int8_mlp_quantized(codes, sx, qws, scales, biases, [True, False])
    want = int_mm_path(ops.int8_mlp_quantized, codes, sx, qws, scales, biases, [True, False])
    assert torch.equal(got, want)
    assert torch.equal(got, ops._int8_mlp_quantized_any(codes, sx, qws, scales, biases, [True, False]))


def test_the_pass_checks_its_buffers_before_reading_them(engine):
    w = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    packed, s, b, x = native.int8_pack(w), torch.rand(16), torch.randn(16), torch.randn(5, 64)
    assert torch.equal(native.int8_mlp(x, [packed], [64, 16], [s], [b], [True]),
                       torch.relu(int8_linear_ref(x, w, s, b)))
    for args, match in [(([packed[:-1]], [64, 16], [s], [b]), r"packed\[0\] must be .* of 1088 elements"),
                        (([packed], [64, 17], [s], [b]), r"packed\[0\] must be .* of 2176 elements"),
                        (([packed], [64, 16], [s[:3]], [b]), r"w_scales\[0\]"),
                        (([packed], [64, 16], [s], [b.double()]), r"biases\[0\]"),
                        (([packed], [64, 16, 8], [s], [b]), "nlayers \\+ 1 dims")]:
        with pytest.raises(ValueError, match=match):
            native.int8_mlp(x, *args, [True])
    with pytest.raises(ValueError, match="codes must be"):
        native.int8_mlp(None, [packed], [64, 16], [s], [b], [True], quantized=(torch.zeros(5, 63, dtype=torch.int8), s[:5]))


def test_single_layer_equals_the_reference_bit_for_bit(engine):
    qws, scales, biases = _layers((367, 256), True)
    x = torch.randn(517, 367)
    got = ops.int8_linear(x, qws[0], scales[0], biases[0], "int_mm")
    assert torch.equal(got, int8_linear_ref(x, qws[0], scales[0], biases[0]))


def test_full_range_codes_accumulate_exactly(engine, int_mm_path):
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


def test_sums_past_int32_wrap_back_to_the_exact_product(engine, int_mm_path):
    """K = 70,000 codes of 127: the exact product 127^2 K = 1.13e9 fits in int32, but the VNNI
    engine's sum((a + 128) w) = 255 * 127 * K = 2.27e9 does not; it wraps, and so does the column
    offset it subtracts, so the difference is exact again."""
    k = 70_000
    qw = torch.full((3, k), 127, dtype=torch.int8)
    qw[1] = -127
    qw[2, ::2] = -127
    x = torch.ones(5, k)
    x[1] = -1.0
    s = torch.full((3,), 1e-3)
    got = ops.int8_linear(x, qw, s, None, "int_mm")
    assert got[0, 0].item() == pytest.approx(127 * k * 1e-3, rel=1e-6)
    assert got[1, 1].item() == pytest.approx(127 * k * 1e-3, rel=1e-6)
    assert torch.equal(got, int_mm_path(ops.int8_linear, x, qw, s, None, "int_mm"))
    assert torch.equal(got, int8_linear_ref(x, qw, s, None))


def test_non_finite_rows_stay_in_their_rows(engine, int_mm_path):
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


def test_thread_count_does_not_change_bits(engine):
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


def test_half_input_single_layer(engine, int_mm_path):
    qws, scales, biases = _layers((96, 40), True)
    x = torch.randn(33, 96).to(torch.bfloat16)
    got = ops.int8_linear(x, qws[0], scales[0], biases[0], "int_mm", True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, int_mm_path(ops.int8_linear, x, qws[0], scales[0], biases[0], "int_mm", True))


def test_an_in_place_weight_update_repacks(engine, int_mm_path):
    qws, scales, biases = _layers((64, 32), False)
    x = torch.randn(20, 64)
    before = ops.int8_linear(x, qws[0], scales[0], None, "int_mm")
    qws[0].neg_()
    after = ops.int8_linear(x, qws[0], scales[0], None, "int_mm")
    assert torch.equal(after, -before)
    assert torch.equal(after, int_mm_path(ops.int8_linear, x, qws[0], scales[0], None, "int_mm"))
