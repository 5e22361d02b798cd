"""Row-wise deploy tables of ``nn.EmbeddingBag`` / ``nn.Embedding`` with ``padding_idx``: the bag
leaves the padded entries out (a sum without them, a mean over the others), as torch does, and the
artifact keeps ``padding_idx`` through save and load."""
import pytest
import torch
from torch import nn

import hwaware
from hwaware.export.deploy import RowwiseEmbedding, RowwiseEmbeddingBag
from hwaware.ops.packing import dequantize_rowwise, quantize_rowwise


def _tables(bits, rows=30, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    fused = quantize_rowwise(torch.randn(rows, dim, generator=g), bits)
    return fused, dequantize_rowwise(fused, bits, dim)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_padded_entries_are_left_out_of_the_bag(bits, mode, include_last_offset, weighted):
    fused, dense = _tables(bits)
    if weighted and mode != "sum":  # per_sample_weights: mode 'sum' only, refused as torch refuses it
        bag = RowwiseEmbeddingBag(fused, bits, 8, mode, include_last_offset, padding_idx=3)
        with pytest.raises(ValueError, match=r"per_sample_weights is only supported for mode='sum', got mode='mean'"):
            bag(torch.tensor([1, 3, 4]), torch.tensor([0, 3] if include_last_offset else [0]), per_sample_weights=torch.rand(3))
        return
    pad = 3
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (40,), generator=g)
    ids[::3] = pad
    ids[20:25] = pad  # the bag [20, 25) holds padding only
    offsets = torch.tensor([0, 5, 5, 12, 20, 25, 33])  # bag [5, 5) is empty
    if include_last_offset:
        offsets = torch.cat([offsets, torch.tensor([40])])
    psw = torch.rand(40, generator=g) if weighted else None
    served = RowwiseEmbeddingBag(fused, bits, 8, mode, include_last_offset, padding_idx=pad)
    ref = nn.EmbeddingBag.from_pretrained(dense, mode=mode, padding_idx=pad, include_last_offset=include_last_offset)
    got, want = served(ids, offsets, psw), ref(ids, offsets, psw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[1], torch.zeros(8)) and torch.equal(got[4], torch.zeros(8))  # empty, padding only
    if mode == "sum":  # weighing a padded entry by 0 is exactly leaving it out
        keep = ids != pad
        no_pad = RowwiseEmbeddingBag(fused, bits, 8, "sum", False)
        bag_of = torch.bucketize(torch.arange(40), offsets[:7], right=True) - 1
        w = (psw if weighted else torch.ones(40))[keep]
        new_offsets = torch.searchsorted(bag_of[keep], torch.arange(7))
        assert torch.equal(got[:7] if include_last_offset else got, no_pad(ids[keep], new_offsets, w))


def test_two_d_input_and_a_plain_embedding_with_padding_idx():
    fused, dense = _tables(8)
    served = RowwiseEmbeddingBag(fused, 8, 8, "mean", False, padding_idx=0)
    ids = torch.tensor([[0, 1, 2], [0, 0, 0], [4, 0, 5]])
    ref = nn.EmbeddingBag.from_pretrained(dense, mode="mean", padding_idx=0)
    torch.testing.assert_close(served(ids), ref(ids), atol=1e-6, rtol=1e-6)
    # nn.Embedding's padding_idx only stops gradients: the lookup returns the stored row
    emb = RowwiseEmbedding(fused, 8, 8, "sum", False)
    torch.testing.assert_close(emb(ids), dense[ids], atol=1e-6, rtol=1e-6)
    assert torch.equal(emb(ids)[1, 0], emb(torch.tensor([0]))[0])


def test_bad_padding_idx_is_refused():
    fused, _ = _tables(8)
    for pad, mode in [(30, "sum"), (-1, "sum"), (True, "sum"), (2, "max"), (1.0, "mean")]:
        with pytest.raises(ValueError, match="padding_idx"):
            RowwiseEmbeddingBag(fused, 8, 8, mode, False, padding_idx=pad)


class Bags(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.EmbeddingBag(20, 8, mode="mean", padding_idx=0)
        self.b = nn.EmbeddingBag(20, 8, mode="sum", padding_idx=19)
        self.e = nn.Embedding(20, 8, padding_idx=0)
        self.lin = nn.Linear(24, 1)

    def forward(self, ids):
        return self.lin(torch.cat([self.a(ids), self.b(ids), self.e(ids).sum(1)], 1))


def test_export_packs_padded_tables_and_load_keeps_padding_idx(tmp_path):
    torch.manual_seed(0)
    model = Bags()
    art = hwaware.export(model, tmp_path / "art")
    layers = art.manifest["layers"]
    assert layers["a"]["scheme"] == layers["b"]["scheme"] == layers["e"]["scheme"] == "rowwise_int8"
    # (e's is an attribute a forward may read; its lookup returns the stored row, as nn.Embedding's)
    assert (layers["a"]["padding_idx"], layers["b"]["padding_idx"], layers["e"]["padding_idx"]) == (0, 19, 0)
    ids = torch.tensor([[0, 1, 2, 0], [19, 19, 0, 0], [5, 19, 7, 0]])
    loaded = hwaware.load(tmp_path / "art", model=Bags)
    assert loaded.a.padding_idx == 0 and loaded.b.padding_idx == 19 and loaded.e.padding_idx == 0
    with torch.no_grad():
        assert torch.equal(loaded(ids), art.model(ids))
        torch.testing.assert_close(loaded(ids), model(ids), atol=0.05, rtol=0.05)  # int8 rows vs FP32
        # the padded entries are left out: bag 1 of `a` is the mean of its one other row
        torch.testing.assert_close(loaded.a(ids)[1], loaded.a(torch.tensor([[19]]))[0])


class FlatBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 4, mode="mean", padding_idx=0)

    def forward(self, ids, offsets):
        return self.bag(ids, offsets)


def test_the_program_of_a_padded_mean_bag_serves_batch_1_and_2(tmp_path):
    # the mean's per-bag counts sliced offsets[1:], so torch.export fixed the batch at 3 or more
    torch.manual_seed(0)
    ids, offsets = torch.tensor([0, 3, 4, 0, 5, 6, 7, 0]), torch.tensor([0, 2, 5])
    art = hwaware.export(FlatBag(), tmp_path / "art", example_inputs=(ids, offsets))
    assert art.manifest["program"]["batch_range"][1][0] <= 1
    program = torch.export.load(str(tmp_path / "art" / "program.pt2")).module()
    for ids_b, off_b in ((ids[:3], offsets[:1]), (ids[:5], offsets[:2]), (ids, offsets)):
        torch.testing.assert_close(program(ids_b, off_b), art.model(ids_b, off_b), atol=0, rtol=0)


@pytest.mark.parametrize("pad", [None, 0])
def test_two_d_input_is_b_bags_whatever_include_last_offset_says(pad):
    # as torch: [B, L] ids are B bags; with include_last_offset=True the deploy table returned B - 1
    fused, dense = _tables(8)
    ids = torch.tensor([[0, 1, 2], [3, 0, 4], [4, 0, 5], [7, 8, 9]])
    served = RowwiseEmbeddingBag(fused, 8, 8, "mean", True, padding_idx=pad)
    ref = nn.EmbeddingBag.from_pretrained(dense, mode="mean", padding_idx=pad, include_last_offset=True)
    assert ref(ids).shape == (4, 8)
    torch.testing.assert_close(served(ids), ref(ids), atol=1e-6, rtol=1e-6)
