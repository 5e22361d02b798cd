"""``hwaware::embedding_bags_rowwise``: T row-wise tables in one call, equal bit for bit to T calls of
``embedding_bag_rowwise`` (fbgemm's kernels), over widths, dims, modes, bag shapes, id dtypes and
layouts, threads and the no-native fallback; bad inputs; opcheck; torch.export."""
import pytest
import torch

from hwaware.ops.packing import quantize_rowwise
from hwaware.quant import native

bags = torch.ops.hwaware.embedding_bags_rowwise
one = torch.ops.hwaware.embedding_bag_rowwise


def _tables(bits, dim, rows=(50, 7, 300), seed=0):
    g = torch.Generator().manual_seed(seed)
    bits = [bits] * len(rows) if isinstance(bits, int) else list(bits)
    return [quantize_rowwise(torch.randn(r, dim, generator=g) * (t + 1), b) for t, (r, b) in enumerate(zip(rows, bits))], bits


def _ids(rows, batch, per_bag, dtype=torch.int64, seed=1):
    """ids [T, N] and shared offsets [B]; per_bag None: random bag sizes with empty bags."""
    g = torch.Generator().manual_seed(seed)
    if per_bag is None:
        sizes = torch.randint(0, 4, (batch,), generator=g)
        sizes[1] = 0
    else:
        sizes = torch.full((batch,), per_bag)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
    n = int(sizes.sum())
    ids = torch.stack([torch.randint(0, r, (n,), generator=g) for r in rows])
    return ids.to(dtype), offsets.to(dtype)


def _per_table(weights, bits, dim, ids, offsets, mode):
    return torch.stack([one(w, b, dim, ids[t].contiguous(), offsets, mode, None, False)
                        for t, (w, b) in enumerate(zip(weights, bits))])


@pytest.fixture(params=["native", "fallback"])
def impl(request, monkeypatch):
    if request.param == "native" and native._load() is None:
        pytest.skip(f"native library unavailable: {native.native_status()}")
    if request.param == "fallback":  # no C compiler: T calls of embedding_bag_rowwise
        monkeypatch.setattr(native, "rowwise_bags", lambda *a, **k: None)
    return request.param


@pytest.fixture
def native_only():  # the fallback is T calls of embedding_bag_rowwise: the very thing these compare with
    if native._load() is None:
        pytest.skip(f"native library unavailable: {native.native_status()}")


@pytest.mark.parametrize("bits", [8, 4, (8, 4, 8)], ids=["int8", "int4", "mixed"])
@pytest.mark.parametrize("dim", [16, 7, 40, 1])
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("per_bag", [1, 3, None], ids=["single", "fixed3", "ragged"])
def test_equals_per_table_calls_bit_for_bit(native_only, bits, dim, mode, per_bag):
    weights, bits = _tables(bits, dim)
    ids, offsets = _ids([w.shape[0] for w in weights], 37, per_bag)
    out = bags(weights, bits, dim, ids, offsets, mode)
    assert out.shape == (3, 37, dim) and out.dtype == torch.float32
    assert torch.equal(out, _per_table(weights, bits, dim, ids, offsets, mode))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_strided_ids_of_a_batch_and_int32(native_only, dtype):
    """DLRM passes sparse.t() of a [B, T] batch: a [T, B] view with strides (1, T), no copy."""
    weights, bits = _tables(8, 16, rows=(50, 7, 300, 20))
    g = torch.Generator().manual_seed(3)
    sparse = torch.stack([torch.randint(0, w.shape[0], (300,), generator=g) for w in weights], 1).to(dtype)  # [B, T]
    offsets = torch.arange(300, dtype=dtype)
    out = bags(weights, bits, 16, sparse.t(), offsets, 0)
    assert torch.equal(out, _per_table(weights, bits, 16, sparse.t().contiguous(), offsets, 0))


def test_thread_count_does_not_change_a_bit():
    if native._load() is None:
        pytest.skip(native.native_status())
    weights, bits = _tables((8, 4, 8), 16, rows=(5000, 300, 2000))
    ids, offsets = _ids([w.shape[0] for w in weights], 4096, None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = bags(weights, bits, 16, ids, offsets, 0)
        torch.set_num_threads(2)
        b = bags(weights, bits, 16, ids, offsets, 0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b) and torch.equal(a, _per_table(weights, bits, 16, ids, offsets, 0))


def test_empty_batch_and_no_ids(impl):
    weights, bits = _tables(8, 16)
    empty = bags(weights, bits, 16, torch.zeros(3, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 0)
    assert empty.shape == (3, 0, 16)
    zeros = bags(weights, bits, 16, torch.zeros(3, 0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 1)
    assert torch.equal(zeros, torch.zeros(3, 4, 16))  # empty bags sum (and average) to 0, as F.embedding_bag


def test_ids_are_checked_even_when_no_bag_reads_them(impl):
    weights, bits = _tables(8, 16)
    ids = torch.tensor([[3], [9], [1]])  # table 1 has 7 rows
    with pytest.raises(IndexError, match=r"indices\[1\] must lie in \[0, 7\) \(rows of weights\[1\]\), got 9"):
        bags(weights, bits, 16, ids, torch.zeros(0, dtype=torch.int64), 0)
    with pytest.raises(IndexError):  # as the per-table op does
        one(weights[1], 8, 16, ids[1], torch.zeros(0, dtype=torch.int64), 0, None, False)


def test_rejects_bad_inputs(impl):
    weights, bits = _tables(8, 16)
    ids, offsets = _ids([w.shape[0] for w in weights], 10, 1)
    with pytest.raises(IndexError, match=r"indices\[1\] must lie in \[0, 7\) \(rows of weights\[1\]\), got 7"):
        bad = ids.clone()
        bad[1, 4] = 7
        bags(weights, bits, 16, bad, offsets, 0)
    with pytest.raises(IndexError, match=r"indices\[2\] must lie in \[0, 300\)"):
        bad = ids.clone()
        bad[2, 9] = -1
        bags(weights, bits, 16, bad, offsets, 0)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        bags(weights, bits, 16, ids, offsets + 1, 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        bags(weights, bits, 16, ids, offsets.flip(0), 0)
    with pytest.raises(ValueError, match="exceed N=10"):
        bags(weights, bits, 16, ids, torch.tensor([0, 11]), 0)
    with pytest.raises(ValueError, match=r"bits must give one width per table: 3 weights, got 2 bits"):
        bags(weights, bits[:2], 16, ids, offsets, 0)
    with pytest.raises(ValueError, match=r"bits\[0\]=2 is not supported"):
        bags(weights, [2, 8, 8], 16, ids, offsets, 0)
    with pytest.raises(ValueError, match=r"weights\[2\] must have shape \[R, 12\] for a 4-bit row-wise table of dim=16"):
        bags(weights, [8, 8, 4], 16, ids, offsets, 0)
    with pytest.raises(TypeError, match=r"weights\[0\] must be \[R, cols\] uint8"):
        bags([weights[0].float()] + weights[1:], bits, 16, ids, offsets, 0)
    with pytest.raises(ValueError, match=r"mode=2 is not supported by the table-batched op"):
        bags(weights, bits, 16, ids, offsets, 2)
    with pytest.raises(ValueError, match=r"indices must be 2-D \[T, N\] with T = len\(weights\) = 3"):
        bags(weights, bits, 16, ids[:2], offsets, 0)
    # mixed int32 / int64 ids and offsets, as F.embedding_bag takes them (a program traced with int64)
    want = bags(weights, bits, 16, ids, offsets, 0)
    assert torch.equal(bags(weights, bits, 16, ids, offsets.int(), 0), want)
    assert torch.equal(bags(weights, bits, 16, ids.int(), offsets, 0), want)
    with pytest.raises(TypeError, match="indices must be"):
        bags(weights, bits, 16, ids.float(), offsets, 0)
    with pytest.raises(ValueError, match="weights must hold at least one"):
        bags([], [], 16, ids[:0], offsets, 0)


def test_opcheck():
    for bits, dim, mode in ((8, 16, 0), ((4, 8, 4), 7, 1)):
        weights, bits = _tables(bits, dim)
        ids, offsets = _ids([w.shape[0] for w in weights], 9, None)
        torch.library.opcheck(bags.default, (weights, bits, dim, ids, offsets, mode))


def test_export_with_a_dynamic_batch(tmp_path):
    class Tables(torch.nn.Module):
        def __init__(self):
            super().__init__()
            weights, self.bits = _tables((8, 4), 16, rows=(50, 60))
            for t, w in enumerate(weights):
                self.register_buffer(f"w{t}", w)

        def forward(self, sparse):  # [B, T]
            offsets = torch.arange(sparse.shape[0])
            return bags([self.w0, self.w1], self.bits, 16, sparse.t(), offsets, 0).sum(0)

    m = Tables()
    sparse = torch.randint(0, 50, (8, 2))
    ep = torch.export.export(m, (sparse,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    assert "hwaware.embedding_bags_rowwise.default" in {str(n.target) for n in ep.graph.nodes}
    torch.export.save(ep, tmp_path / "p.pt2")
    loaded = torch.export.load(tmp_path / "p.pt2").module()
    other = torch.randint(0, 50, (13, 2))
    assert torch.equal(loaded(other), m(other))


@pytest.mark.parametrize("scale", [1e-6, 1.5e4])
def test_int4_half_scales_at_the_ends_of_float16(native_only, scale):
    """Row scales and offsets are float16 in the int4 layout: subnormal ones (a 1e-6 table) and large
    ones convert exactly, as fbgemm converts them."""
    g = torch.Generator().manual_seed(7)
    weights = [quantize_rowwise(torch.randn(40, 16, generator=g) * scale, 4) for _ in range(2)]
    ids, offsets = _ids([40, 40], 25, None)
    out = bags(weights, [4, 4], 16, ids, offsets, 0)
    assert torch.equal(out, _per_table(weights, [4, 4], 16, ids, offsets, 0))
