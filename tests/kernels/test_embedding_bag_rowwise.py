"""kernels/embedding_bag_rowwise.py (FBGEMM row-wise int8 / int4 tables) against hwaware.ops.reference.

Tolerances: max reads dequantized values (``q * scale + offset`` in fp32, fp fusion off) and is
bit-exact; sum / mean differ from F.embedding_bag only in fp32 summation order: 8 fp32 ulp of the
largest output (tolerances.py).
"""
import pytest
import torch

from hwaware.ops.packing import quantize_rowwise
from hwaware.ops.reference import embedding_bag_rowwise_ref
from tests.kernels.conftest import DEVICE
from tests.kernels.tolerances import assert_close_to_ref


def _args(bits, dim, rows=50, n_idx=30, idx_dtype=torch.int64, include_last_offset=False, psw=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = quantize_rowwise(torch.randn(rows, dim, generator=g), bits)
    indices = torch.randint(0, rows, (n_idx,), generator=g).to(idx_dtype)
    offsets = torch.tensor([0, 3, 3, 10, 11], dtype=idx_dtype)  # bag 1 empty; the last bag is long (19)
    if include_last_offset:
        offsets = torch.cat([offsets, torch.tensor([n_idx], dtype=idx_dtype)])
    weights = torch.randn(n_idx, generator=g) if psw else None
    return weight, indices, offsets, weights


def _run(bits, dim, mode, weight, indices, offsets, psw, include_last_offset):
    from hwaware.kernels.embedding_bag_rowwise import embedding_bag_rowwise

    dev = [None if t is None else t.to(DEVICE) for t in (weight, indices, offsets, psw)]
    out = embedding_bag_rowwise(dev[0], bits, dim, dev[1], dev[2], mode, dev[3], include_last_offset)
    ref = embedding_bag_rowwise_ref(weight, bits, dim, indices, offsets, mode, psw, include_last_offset)
    return out, ref


# dim 7 / 45: odd D (4-bit rows end in a padding nibble; qparams at unaligned byte offsets);
# 45 > the interpreter's BLOCK_D = 32 so columns span two programs
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dim", [16, 7, 45])
@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_bag_matches_reference(bits, dim, mode, include_last_offset):
    idx_dtype = torch.int32 if dim == 7 else torch.int64
    w, idx, off, _ = _args(bits, dim, include_last_offset=include_last_offset, idx_dtype=idx_dtype)
    out, ref = _run(bits, dim, mode, w, idx, off, None, include_last_offset)
    assert out.shape == (5, dim) and out.dtype == torch.float32
    assert torch.count_nonzero(out[1].cpu()) == 0  # empty bag -> 0 in every mode
    if mode == 2:
        torch.testing.assert_close(out.cpu(), ref, atol=0, rtol=0)
    else:
        assert_close_to_ref(out, ref)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_per_sample_weights(bits, include_last_offset):
    w, idx, off, psw = _args(bits, 9, include_last_offset=include_last_offset, psw=True)
    out, ref = _run(bits, 9, 0, w, idx, off, psw, include_last_offset)
    assert_close_to_ref(out, ref)


def test_embedding_bag_strided_table_and_edge_offsets():
    from hwaware.kernels.embedding_bag_rowwise import embedding_bag_rowwise

    w, idx, _, _ = _args(8, 12, rows=40)
    w2 = torch.stack([w, w.flip(0)], dim=1).reshape(80, -1)[::2]  # rows 2 apart
    assert not w2.is_contiguous() and torch.equal(w2, w)
    off = torch.tensor([0, 0, 30])  # empty first bag, a bag covering everything, an empty last bag
    out = embedding_bag_rowwise(w2.to(DEVICE), 8, 12, idx.to(DEVICE), off.to(DEVICE), 1)
    assert_close_to_ref(out, embedding_bag_rowwise_ref(w, 8, 12, idx, off, 1))
    # no bags at all
    empty = embedding_bag_rowwise(w.to(DEVICE), 8, 12, idx[:0].to(DEVICE), torch.tensor([0], device=DEVICE), 0,
                                  include_last_offset=True)
    assert empty.shape == (0, 12)


def test_embedding_bag_bad_inputs():
    from hwaware.kernels.embedding_bag_rowwise import embedding_bag_rowwise

    w, idx, off, psw = [t.to(DEVICE) for t in _args(4, 7, psw=True)]
    with pytest.raises(ValueError, match=r"a 4-bit row-wise table of dim=9 \(cols=9\) = \[\*, 9\], got \[50, 8\]"):
        embedding_bag_rowwise(w, 4, 9, idx, off, 0)
    with pytest.raises(ValueError, match=r"a 8-bit row-wise table of dim=7 \(cols=15\)"):
        embedding_bag_rowwise(w, 8, 7, idx, off, 0)
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        embedding_bag_rowwise(w, 3, 7, idx, off, 0)
    with pytest.raises(ValueError, match="mode=3 is not supported"):
        embedding_bag_rowwise(w, 4, 7, idx, off, 3)
    with pytest.raises(TypeError, match=r"indices \(torch.int32\) and offsets \(torch.int64\) must have the same dtype"):
        embedding_bag_rowwise(w, 4, 7, idx.int(), off, 0)
    with pytest.raises(ValueError, match="per_sample_weights is only supported with mode=0"):
        embedding_bag_rowwise(w, 4, 7, idx, off, 1, psw)
    with pytest.raises(ValueError, match=r"per_sample_weights must have shape .* = \[30\], got \[29\]"):
        embedding_bag_rowwise(w, 4, 7, idx, off, 0, psw[:29])
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 50\)"):
        embedding_bag_rowwise(w, 4, 7, torch.cat([idx[:-1], idx.new_tensor([50])]), off, 0)
    with pytest.raises(ValueError, match="offsets must start at 0, be non-decreasing"):
        embedding_bag_rowwise(w, 4, 7, idx, off.flip(0), 0)
    with pytest.raises(ValueError, match="the last offset must equal len"):
        embedding_bag_rowwise(w, 4, 7, idx, off, 0, include_last_offset=True)


def test_embedding_bag_unchecked_out_of_range_index_is_skipped_not_read():
    from hwaware.kernels.embedding_bag_rowwise import embedding_bag_rowwise

    w, idx, off, _ = _args(8, 8)
    bad = idx.clone()
    bad[0] = 10**6  # far outside the table: must not be read
    out = embedding_bag_rowwise(w.to(DEVICE), 8, 8, bad.to(DEVICE), off.to(DEVICE), 0, check_indices=False)
    ref = embedding_bag_rowwise_ref(w, 8, 8, idx[1:], off - (off > 0).long(), 0)  # the same bags without it
    assert_close_to_ref(out, ref)


def test_embedding_bag_unchecked_offsets_are_clipped_not_read_past():
    # with check_indices=False (a CUDA graph capture) an offset past len(indices) or below 0 read the
    # memory beside indices; a max bag of only skipped ids came out -inf
    from hwaware.kernels.embedding_bag_rowwise import embedding_bag_rowwise

    w = quantize_rowwise(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), 8)
    buf = torch.tensor([1, 2, 3, 4, 7, 7])
    idx = buf[:4]  # what lies past it is deterministic: rows 7, 7
    for off, bags in (([0, 6], [[1, 2, 3, 4], []]), ([-2, 2], [[], [3, 4]])):
        out = embedding_bag_rowwise(w.to(DEVICE), 8, 4, idx.to(DEVICE), torch.tensor(off).to(DEVICE), 0, check_indices=False)
        clipped = [[1, 2], [3, 4]] if off[0] < 0 else bags  # [-2, 2] clipped to [0, 2): bag 0 is ids 1, 2
        for b, ids in enumerate(clipped):
            want = embedding_bag_rowwise_ref(w, 8, 4, torch.tensor(ids, dtype=torch.long), torch.tensor([0]), 0) \
                if ids else torch.zeros(1, 4)
            assert_close_to_ref(out[b:b + 1], want)
    skipped = embedding_bag_rowwise(w.to(DEVICE), 8, 4, torch.tensor([10**6, -5]).to(DEVICE), torch.tensor([0]).to(DEVICE),
                                    2, check_indices=False)
    assert torch.equal(skipped.cpu(), torch.zeros(1, 4))
