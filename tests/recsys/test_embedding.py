"""``EmbeddingBagList``: per-table in FP32/QAT, one table-batched op after export, same numbers."""
import os

import pytest
import torch
from torch import nn

import hwaware
from hwaware.export.deploy import RowwiseEmbeddingBag
from hwaware.ops.packing import quantize_rowwise
from hwaware.recsys import DLRM, EmbeddingBagList
from tests.recsys.test_dlrm import TINY, TINY_TABLES, _inputs


def _rowwise(rows, dim, bits, mode="sum", seed=0):
    g = torch.Generator().manual_seed(seed)
    return RowwiseEmbeddingBag(quantize_rowwise(torch.randn(rows, dim, generator=g), bits), bits, dim, mode, False)


def _ids(tables, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in tables], 1)  # [B, T]


def _one_by_one(tables, sparse):
    offsets = torch.arange(sparse.shape[0])
    return [m(sparse[:, t].contiguous(), offsets) for t, m in enumerate(tables)]


def test_fp32_tables_are_called_in_turn():
    torch.manual_seed(0)
    tables = EmbeddingBagList(nn.EmbeddingBag(n, 4, mode="sum") for n in (5, 9, 3))
    sparse = _ids((5, 9, 3), 11)
    got = tables(sparse.t(), torch.arange(11))
    assert all(torch.equal(a, b) for a, b in zip(got, _one_by_one(tables, sparse)))
    assert list(tables.state_dict()) == ["0.weight", "1.weight", "2.weight"]  # a plain ModuleList's keys


def test_rowwise_tables_are_one_op_call_and_equal_per_table_calls(monkeypatch):
    tables = EmbeddingBagList([_rowwise(50, 16, 8), _rowwise(7, 16, 4, seed=1), _rowwise(30, 16, 8, seed=2)])
    sparse = _ids((50, 7, 30), 64)
    calls = []
    real = torch.ops.hwaware.embedding_bags_rowwise.default
    monkeypatch.setattr(torch.ops.hwaware.embedding_bags_rowwise, "default",
                        lambda *a: calls.append(len(a[0])) or real(*a))
    got = tables(sparse.t(), torch.arange(64))
    assert calls == [3]
    assert all(torch.equal(a, b) for a, b in zip(got, _one_by_one(tables, sparse)))


def test_mixed_tables_group_what_they_can():
    """A table left in FP32, a mean table and a dim-8 table beside the sum/dim-16 group: each result
    equals that table's own call."""
    torch.manual_seed(0)
    tables = EmbeddingBagList([_rowwise(50, 16, 8), nn.EmbeddingBag(9, 16, mode="sum"), _rowwise(7, 16, 4, "mean", seed=1),
                               _rowwise(30, 8, 8, seed=2), _rowwise(40, 16, 4, seed=3)])
    sparse = _ids((50, 9, 7, 30, 40), 21)
    got = tables(sparse.t(), torch.arange(21))
    want = _one_by_one(tables, sparse)
    assert [g.shape[1] for g in got] == [16, 16, 16, 8, 16]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_hooked_tables_are_called_so_their_hooks_run(monkeypatch):
    tables = EmbeddingBagList([_rowwise(50, 16, 8), _rowwise(7, 16, 4, seed=1), _rowwise(30, 16, 8, seed=2)])
    sparse = _ids((50, 7, 30), 12)
    tables[1].register_forward_hook(lambda m, a, o: torch.zeros_like(o))  # replaces that table's output
    calls = []
    real = torch.ops.hwaware.embedding_bags_rowwise.default
    monkeypatch.setattr(torch.ops.hwaware.embedding_bags_rowwise, "default",
                        lambda *a: calls.append(len(a[0])) or real(*a))
    got = tables(sparse.t(), torch.arange(12))
    assert calls == [2] and torch.equal(got[1], torch.zeros(12, 16))
    assert torch.equal(got[2], tables[2](sparse[:, 2].contiguous(), torch.arange(12)))
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(m))
    try:
        tables(sparse.t(), torch.arange(12))
    finally:
        handle.remove()
    assert calls == [2] and sum(m is t for m in seen for t in tables) == 3  # a global hook: every table called


def test_an_out_of_range_id_names_the_lists_table():
    torch.manual_seed(0)
    tables = EmbeddingBagList([nn.EmbeddingBag(9, 16, mode="sum"), _rowwise(10, 16, 8), _rowwise(5, 16, 8, seed=1)])
    sparse = _ids((9, 10, 5), 4)
    sparse[1, 2] = 7
    with pytest.raises(IndexError, match=r"ids\[2\] \(table 2\) must lie in \[0, 5\), got 7"):
        tables(sparse.t(), torch.arange(4))


def test_ids_must_be_one_row_per_table():
    tables = EmbeddingBagList(nn.EmbeddingBag(5, 4) for _ in range(3))
    with pytest.raises(ValueError, match=r"ids must be \[T, N\] with T = 3 tables"):
        tables(torch.zeros(2, 4, dtype=torch.long), torch.arange(4))
    with pytest.raises(ValueError, match=r"ids must be \[T, N\] with T = 3 tables .* got \[12\]"):
        tables(torch.zeros(12, dtype=torch.long), torch.arange(4))


def test_exported_dlrm_serves_its_tables_with_one_call(tmp_path):
    torch.manual_seed(0)
    model = DLRM(**TINY).eval()
    dense, sparse = _inputs(16)
    art = hwaware.export(model, str(tmp_path / "a"), example_inputs=(dense, sparse))
    served = hwaware.load(art.path)
    assert all(type(m) is RowwiseEmbeddingBag for m in served.embeddings)
    kernels = {art.manifest["layers"][f"embeddings.{t}"]["kernel"]["cpu"].split(" [")[0] for t in range(len(TINY_TABLES))}
    assert kernels == {"hwaware::embedding_bags_rowwise"}  # what the manifest (hwaware inspect) says runs them
    program = torch.export.load(os.path.join(art.path, "program.pt2"))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    # one call reads every table: DLRM's lookups inside its interaction (the lookup op alone elsewhere)
    one_call = ("hwaware.embedding_bags_rowwise.default", "hwaware.embedding_interaction.default",
                "hwaware.embedding_interaction_int8.default")
    assert sum(targets.count(t) for t in one_call) == 1
    assert "hwaware.embedding_bag_rowwise.default" not in targets
    d2, s2 = _inputs(9, TINY_TABLES, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(d2, s2), served(d2, s2), atol=0, rtol=0)
        # the batched lookups are the per-table lookups, bit for bit
        offsets = torch.arange(9)
        vectors = served.embeddings(s2.t(), offsets)
        assert all(torch.equal(v, m(s2[:, t].contiguous(), offsets)) for t, (v, m) in enumerate(zip(vectors, served.embeddings)))


def test_tables_packed_from_bf16_are_called_on_their_own_and_return_bf16(tmp_path):
    """The table-batched op returns float32; a table packed from bf16 returns bf16 (what the layer it
    replaced returned), so it is not batched, in the list or in DLRM's fused lookup, and the manifest
    names the per-table op."""
    torch.manual_seed(0)
    model = DLRM(**TINY).to(torch.bfloat16).eval()
    dense, sparse = _inputs(16)
    art = hwaware.export(model, str(tmp_path / "a"), example_inputs=(dense.bfloat16(), sparse))
    served = hwaware.load(art.path)
    assert all(type(m) is RowwiseEmbeddingBag and m.out_dtype == torch.bfloat16 for m in served.embeddings)
    kernels = {art.manifest["layers"][f"embeddings.{t}"]["kernel"]["cpu"].split(" [")[0] for t in range(len(TINY_TABLES))}
    assert kernels == {"hwaware::embedding_bag_rowwise"}
    offsets = torch.arange(16)
    vectors = served.embeddings(sparse.t(), offsets)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, m(sparse[:, t].contiguous(), offsets))
               for t, (v, m) in enumerate(zip(vectors, served.embeddings)))
    with torch.no_grad():
        out = served(dense.bfloat16(), sparse)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(torch.export.load(os.path.join(art.path, "program.pt2")).module()(dense.bfloat16(), sparse),
                                   out, atol=0, rtol=0)
