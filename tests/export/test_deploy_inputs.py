"""Inputs the packed embedding layers must refuse as nn.EmbeddingBag / nn.Embedding do, not serve."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hwaware.export.deploy import RowwiseEmbeddingBag
from hwaware.ops.packing import quantize_rowwise


def _bag(**kw):
    torch.manual_seed(0)
    return RowwiseEmbeddingBag(quantize_rowwise(torch.randn(10, 4), 8), 8, 4, "sum", False, **kw)


def test_float_offsets_are_refused_as_torch_does():
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match="Long, Int"):  # what nn.EmbeddingBag says
        nn.EmbeddingBag(10, 4)(ids, torch.tensor([0.0, 1.9]))
    with pytest.raises(TypeError, match=r"RowwiseEmbeddingBag: offsets must be an int64 or int32 tensor, got torch.float32"):
        _bag()(ids, torch.tensor([0.0, 1.9]))  # was truncated to [0, 1] and served


def test_2d_input_with_offsets_is_refused_as_torch_does():
    ids = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="if input is 2D, then offsets has to be None"):
        nn.EmbeddingBag(10, 4)(ids, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"2-D input is a batch of fixed-length bags and takes no offsets, got offsets of "
                                         r"shape \[2\]"):
        _bag()(ids, torch.tensor([0, 1]))  # the offsets were silently ignored
    assert _bag()(ids).shape == (2, 4)


def test_the_lookup_returns_the_dtype_of_the_table_it_replaced():
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 2])
    assert _bag()(ids, offsets).dtype == torch.float32
    half = _bag(dtype=torch.float16)
    assert half(ids, offsets).dtype == torch.float16 and half.describe()["dtype"] == "float16"
    torch.testing.assert_close(half(ids, offsets), _bag()(ids, offsets).half(), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"RowwiseEmbeddingBag dtype=torch.int8; expected one of"):
        _bag(dtype=torch.int8)


class UserItems(nn.Module):
    def __init__(self):
        super().__init__()
        self.user = nn.Embedding(30, 8)
        self.items = nn.EmbeddingBag(40, 8, mode="sum")

    def forward(self, users, items, offsets):
        return (self.user(users) * self.items(items, offsets)).sum(-1)


def test_the_program_takes_int32_ids_as_the_eager_model_does(tmp_path):
    """The program traced with int64 ids bakes int64 offsets for nn.Embedding's lookup; int32 ids then
    failed in the op with "indices (torch.int32) and offsets (torch.int64) must have the same dtype",
    naming offsets the caller never passed."""
    import hwaware

    torch.manual_seed(0)
    users, items, offsets = torch.randint(0, 30, (6,)), torch.randint(0, 40, (15,)), torch.tensor([0, 2, 5, 9, 10, 12])
    hwaware.export(UserItems(), tmp_path / "art", example_inputs=(users, items, offsets))
    program = torch.export.load(str(tmp_path / "art" / "program.pt2")).module()
    want = hwaware.load(tmp_path / "art", model=UserItems)(users, items, offsets)
    assert torch.equal(program(users, items, offsets), want)
    for args in ((users.int(), items, offsets), (users, items.int(), offsets), (users.int(), items.int(), offsets.int())):
        assert torch.equal(program(*args), want)
