"""``hwaware::embedding_interaction`` and ``_int8``: a deployed DLRM's one-id lookups and its
interaction in one pass are bit for bit ``embedding_bags_rowwise`` then ``dot_interaction`` /
``dot_interaction_int8`` (native pass, no-native path, mixed 8/4-bit tables, odd widths, strided and
int32 ids, NaN rows), bad ids and arguments get the table-batched op's errors, and DLRM's exported
forward takes the pass only where it gives the same bits."""
import copy

import pytest
import torch

import hwaware.ops as ops
from hwaware.export.deploy import RowwiseEmbeddingBag
from hwaware.ops.packing import quantize_rowwise
from hwaware.quant import native
from tests.helpers import dlrm_unfused, int8_chain_top, record_calls

OP = torch.ops.hwaware.embedding_interaction_int8.default
FLOAT_OP = torch.ops.hwaware.embedding_interaction.default


def _tables(bits, rows, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [quantize_rowwise(torch.randn(r, dim, generator=g), b) for r, b in zip(rows, bits)]


def _ids(rows, batch, dtype=torch.int64, seed=1):
    """[B, T] ids (a batch's sparse features); callers pass the strided [T, B] view, as DLRM does."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, r, (batch,), generator=g) for r in rows], 1).to(dtype)


def _two_ops(x, weights, bits, ids, pad, quantized=True):
    offsets = torch.arange(x.shape[0], dtype=ids.dtype)
    bags = ops.embedding_bags_rowwise(weights, bits, x.shape[1], ids, offsets, 0)
    vectors = [x] + list(bags.unbind(0))
    return ops.dot_interaction_int8(vectors, pad) if quantized else ops.dot_interaction(vectors, pad)


@pytest.mark.parametrize("batch,bits,dim,pad,dtype", [
    (2048, [8] * 26, 16, 0, torch.int64),       # the recipe's shape
    (33, [8, 4, 8, 4, 4], 20, 3, torch.int32),  # mixed widths, a second column block, padding
    (17, [4, 4], 7, 1, torch.int64),            # odd 4-bit width (a padding nibble)
    (1, [8], 16, 0, torch.int64),
    (0, [8, 4], 16, 2, torch.int64),
])
def test_one_pass_is_the_lookups_then_the_interaction_bit_for_bit(batch, bits, dim, pad, dtype):
    rows = [50 + 7 * t for t in range(len(bits))]
    weights = _tables(bits, rows, dim)
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(2))
    ids = _ids(rows, batch, dtype).t()  # strided
    codes, scales = OP(x, weights, bits, ids, pad)
    want_codes, want_scales = _two_ops(x, weights, bits, ids, pad)
    assert codes.shape == (batch, dim + (len(bits) + 1) * len(bits) // 2 + pad)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    assert torch.equal(OP(x, weights, bits, ids.contiguous(), pad)[0], codes)
    rows = FLOAT_OP(x, weights, bits, ids, pad)
    assert rows.dtype == torch.float32 and torch.equal(rows, _two_ops(x, weights, bits, ids, pad, quantized=False))


def test_without_the_native_pass_the_two_ops_run_and_give_the_same(monkeypatch):
    bits, rows = [8, 4, 8], [40, 30, 20]
    weights, x = _tables(bits, rows, 16), torch.randn(45, 16)
    ids = _ids(rows, 45).t()
    fused, rows = OP(x, weights, bits, ids, 1), FLOAT_OP(x, weights, bits, ids, 1)
    monkeypatch.setattr(native, "bags_interaction", lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(OP(x, weights, bits, ids, 1), fused))
    assert torch.equal(FLOAT_OP(x, weights, bits, ids, 1), rows)


def test_a_nan_row_of_x_gets_a_nan_scale_and_the_rest_are_untouched():
    bits, rows = [8, 8], [30, 30]
    weights, x = _tables(bits, rows, 16), torch.randn(20, 16)
    x[3, 5] = float("nan")
    ids = _ids(rows, 20).t()
    codes, scales = OP(x, weights, bits, ids, 0)
    want_codes, want_scales = _two_ops(x, weights, bits, ids, 0)
    assert torch.isnan(scales[3]) and torch.isnan(want_scales[3])
    keep = torch.arange(20) != 3
    assert torch.equal(codes[keep], want_codes[keep]) and torch.equal(scales[keep], want_scales[keep])


def test_an_id_outside_its_table_names_the_first_one_in_table_then_position_order():
    bits, rows = [8, 8, 4], [10, 7, 300]
    weights, x = _tables(bits, rows, 16), torch.randn(40, 16)
    sparse = _ids(rows, 40)
    sparse[30, 2], sparse[20, 1], sparse[25, 1] = -1, 9, 7
    with pytest.raises(IndexError, match=r"indices\[1\] must lie in \[0, 7\) \(rows of weights\[1\]\), got 9"):
        OP(x, weights, bits, sparse.t(), 0)
    sparse[20, 1], sparse[25, 1] = 0, 0
    for op in (OP, FLOAT_OP):
        with pytest.raises(IndexError, match=r"indices\[2\] must lie in \[0, 300\) \(rows of weights\[2\]\), got -1"):
            op(x, weights, bits, sparse.t(), 0)


def test_rejects_bad_arguments():
    bits, rows = [8, 8], [10, 10]
    weights, x, ids = _tables(bits, rows, 16), torch.randn(4, 16), _ids(rows, 4).t()
    for op in (OP, FLOAT_OP):
        with pytest.raises(TypeError, match=r"x must be \[B, D\] float32"):
            op(x.double(), weights, bits, ids, 0)
    with pytest.raises(ValueError, match=r"indices must be \[T, B\] with B = x.shape\[0\] = 4"):
        OP(x, weights, bits, ids[:, :3], 0)
    with pytest.raises(ValueError, match=r"indices must be 2-D \[T, N\] with T = len\(weights\) = 2"):
        OP(x, weights, bits, ids[:1], 0)
    with pytest.raises(ValueError, match=r"weights\[0\] must have shape \[R, 24\] for a 8-bit row-wise table of dim=16"):
        OP(x, _tables([8], [10], 12) + weights[1:], bits, ids, 0)
    with pytest.raises(ValueError, match=r"bits\[1\]=2 is not supported"):
        OP(x, weights, [8, 2], ids, 0)
    with pytest.raises(ValueError, match=r"pad=-1 must be >= 0"):
        OP(x, weights, bits, ids, -1)
    with pytest.raises(ValueError, match=r"weights must hold at least one row-wise table"):
        OP(x, [], [], ids[:0], 0)


def test_opcheck():
    bits, rows = [8, 4], [10, 12]
    for op in (OP, FLOAT_OP):
        torch.library.opcheck(op, (torch.randn(6, 8), _tables(bits, rows, 8), bits, _ids(rows, 6).t(), 3))


def _deployed_dlrm(table_bits=(8, 4, 8), top=(32, 16)):
    """A DLRM as export leaves it: row-wise tables and an int_mm chain at the top (the bottom stays float)."""
    from hwaware.recsys import DLRM

    torch.manual_seed(0)
    sizes = (50, 30, 20)
    model = DLRM(table_sizes=sizes, embedding_dim=8, bottom_mlp=(16, 8), top_mlp=top).eval()
    for t, b in enumerate(table_bits):
        model.embeddings[t] = RowwiseEmbeddingBag(quantize_rowwise(model.embeddings[t].weight.detach(), b), b, 8, "sum", False)
    int8_chain_top(model)
    return model, torch.randn(45, 13), _ids(sizes, 45)


@pytest.fixture
def fused_calls(monkeypatch):
    return record_calls(monkeypatch, torch.ops.hwaware.embedding_interaction_int8)


def test_deployed_dlrm_takes_the_one_pass_and_gets_the_same_bits(fused_calls):
    model, dense, sparse = _deployed_dlrm()
    with torch.no_grad():
        out = model(dense, sparse)
        assert fused_calls == [1]
        assert torch.equal(out, dlrm_unfused(model, dense, sparse))
    program = torch.export.export(model, (dense, sparse))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"hwaware.embedding_interaction_int8.default", "hwaware.int8_mlp_quantized.default"} <= targets
    assert "hwaware.embedding_bags_rowwise.default" not in targets
    assert torch.equal(program.module()(dense, sparse), out)


def test_deployed_dlrm_keeps_the_lookups_where_something_would_see_them(fused_calls):
    model, dense, sparse = _deployed_dlrm()
    with torch.no_grad():
        want = dlrm_unfused(model, dense, sparse)
    seen = []
    table_hook = copy.deepcopy(model)
    table_hook.embeddings[1].register_forward_hook(lambda m, a, o: seen.append(o))
    list_hook = copy.deepcopy(model)
    list_hook.embeddings.register_forward_hook(lambda m, a, o: seen.append(o))
    max_table = copy.deepcopy(model)  # a table the batched call does not serve
    max_table.embeddings[2].mode = "max"
    with torch.no_grad():
        assert torch.equal(table_hook(dense, sparse), want)
        assert torch.equal(list_hook(dense, sparse), want)
        max_table(dense, sparse)
    assert len(seen) == 2 and fused_calls == []


def test_deployed_dlrm_bad_id_names_the_table(fused_calls):
    model, dense, sparse = _deployed_dlrm()
    sparse[7, 2] = 20
    with torch.no_grad(), pytest.raises(IndexError, match=r"indices\[2\] must lie in \[0, 20\) \(rows of weights\[2\]\), got 20"):
        model(dense, sparse)


def test_native_wrappers_refuse_a_bits_list_of_another_length():
    """The C passes read one width per table: a short list must not reach them."""
    bits, rows = [8, 8], [10, 10]
    weights, x, ids = _tables(bits, rows, 16), torch.randn(4, 16), _ids(rows, 4).t()
    for call in (lambda: native.bags_interaction(x, weights, bits[:1], ids, 0, True),
                 lambda: native.rowwise_bags(weights, bits[:1], 16, ids, torch.arange(4), False)):
        with pytest.raises(ValueError, match=r"bits must give one width per table: 2 weights, got 1 bits"):
            call()


def test_deployed_dlrm_rejects_a_sparse_batch_of_another_size():
    model, dense, sparse = _deployed_dlrm()
    with torch.no_grad(), pytest.raises(ValueError, match=r"dense and sparse must hold the same batch, got dense \(45, 13\) "
                                                          r"and sparse \(44, 3\)"):
        model(dense, sparse[:44])


def test_deployed_dlrm_runs_under_torch_compile_fullgraph():
    model, dense, sparse = _deployed_dlrm()
    with torch.no_grad():
        want = model(dense, sparse)
        got = torch.compile(model, fullgraph=True)(dense, sparse)  # default backend: inductor
    assert torch.equal(got, want)


def test_deployed_dlrm_with_a_float_top_still_reads_the_tables_in_the_interaction(monkeypatch):
    model, dense, sparse = _deployed_dlrm()
    model.top_mlp[0].kernels = {"cpu": "dequant"}  # the chain no longer starts with int_mm: float rows
    with torch.no_grad():
        want = dlrm_unfused(model, dense, sparse)
    calls = record_calls(monkeypatch, torch.ops.hwaware.embedding_interaction)
    seen = []
    model.top_mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        assert torch.equal(model(dense, sparse), want)
    assert calls == [1] and len(seen) == 1 and seen[0].shape == (45, 8 + 6)  # the hook saw the float rows
    # the bottom MLP is still a float nn.Linear here, but the deploy ops serve inference only
    with pytest.raises(RuntimeError, match=r"hwaware::\w+ is an inference op and has no backward"):
        model(dense, sparse).sum().backward()
