"""``hwaware::dot_interaction``: the C pass (CPU float32) and its backward against the torch-ops
reference, error bounds from float32 summation, autograd, opcheck, bad inputs."""
import pytest
import torch

import hwaware.ops as ops
from hwaware.ops.reference import dot_interaction_backward_ref, dot_interaction_ref
from hwaware.quant import native

EPS = torch.finfo(torch.float32).eps
SHAPES = [(2048, 27, 16, 1), (7, 2, 16, 2), (33, 5, 7, 1), (64, 40, 33, 0), (1, 17, 16, 3), (9, 32, 5, 0), (5, 1, 3, 0),
          (130, 16, 64, 0)]


def _vectors(batch, nvec, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g) for _ in range(nvec)]


def _pair_bound(vectors):
    """|error| bound of a float32 dot of length D summed in any order: D * eps * sum_d |a_d b_d|."""
    a = torch.stack([v.double().abs() for v in vectors], 1)
    mags = torch.bmm(a, a.transpose(1, 2))
    nvec, dim = len(vectors), vectors[0].shape[1]
    rows, cols = torch.triu_indices(nvec, nvec, offset=1)
    return dim * EPS * mags[:, rows, cols]


@pytest.fixture(autouse=True)
def _needs_native():
    if native._load() is None:
        pytest.skip(f"native library unavailable: {native.native_status()}")


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_is_x_pairs_and_zero_padding_within_float32_summation_error(shape):
    batch, nvec, dim, pad = shape
    vs = _vectors(batch, nvec, dim)
    out = ops.dot_interaction(vs, pad)
    npair = nvec * (nvec - 1) // 2
    assert out.shape == (batch, dim + npair + pad) and out.dtype == torch.float32
    assert torch.equal(out[:, :dim], vs[0]) and torch.equal(out[:, dim + npair:], torch.zeros(batch, pad))
    exact = dot_interaction_ref([v.double() for v in vs], pad)[:, dim:dim + npair]
    err = (out[:, dim:dim + npair].double() - exact).abs()
    assert (err <= _pair_bound(vs)).all()
    # the torch-ops path (another summation order) agrees within twice the bound
    assert ((out - dot_interaction_ref(vs, pad)).abs()[:, dim:dim + npair].double() <= 2 * _pair_bound(vs)).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_the_reference_gradient(shape):
    batch, nvec, dim, pad = shape
    vs = _vectors(batch, nvec, dim, seed=1)
    grad = torch.randn(batch, dim + nvec * (nvec - 1) // 2 + pad, generator=torch.Generator().manual_seed(2))
    leaves = [v.clone().requires_grad_(True) for v in vs]
    ops.dot_interaction(leaves, pad).backward(grad)
    exact = dot_interaction_backward_ref(grad.double(), [v.double() for v in vs], pad)
    # grad v_k = grad x [k=0] + sum_j G[k, j] v_j: nvec terms of magnitude |G| |v|, plus the x term
    g = torch.zeros(batch, nvec, nvec, dtype=torch.float64)
    rows, cols = torch.triu_indices(nvec, nvec, offset=1)
    g[:, rows, cols] = grad[:, dim:dim + rows.numel()].double().abs()
    g = g + g.transpose(1, 2)
    mags = torch.bmm(g, torch.stack([v.double().abs() for v in vs], 1))
    mags[:, 0] += grad[:, :dim].double().abs()
    for k, leaf in enumerate(leaves):
        assert leaf.grad.shape == vs[k].shape
        assert ((leaf.grad.double() - exact[k]).abs() <= (nvec + 1) * EPS * mags[:, k]).all()


def test_results_do_not_depend_on_the_thread_count():
    vs = _vectors(600, 27, 16, seed=3)  # 600 * 27 * 27 * 16 multiply-adds: over the C pass's threading cut
    grad = torch.randn(600, 16 + 351 + 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.dot_interaction(vs, 1), torch.ops.hwaware.dot_interaction_backward(grad, vs, 1)
        torch.set_num_threads(2)
        two = ops.dot_interaction(vs, 1), torch.ops.hwaware.dot_interaction_backward(grad, vs, 1)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and all(torch.equal(a, b) for a, b in zip(one[1], two[1]))


@pytest.mark.parametrize("dim", [16, 5, 40])
def test_a_samples_result_does_not_depend_on_its_batch(dim):
    """The C pass works on blocks of 16 samples (one per SIMD lane) with a zero-padded last block:
    every sample gets the same arithmetic wherever it sits, so a batch of 37 equals its samples
    run one at a time, bit for bit."""
    vs = _vectors(37, 27, dim, seed=5)
    whole = ops.dot_interaction(vs, 2)
    for b in (0, 15, 16, 31, 32, 36):
        assert torch.equal(ops.dot_interaction([v[b:b + 1] for v in vs], 2), whole[b:b + 1])
    assert torch.equal(ops.dot_interaction([v[5:26] for v in vs], 2), whole[5:26])


def test_non_contiguous_inputs_other_dtypes_and_the_eager_fallback(monkeypatch):
    vs = _vectors(12, 4, 8, seed=4)
    out = ops.dot_interaction(vs, 1)
    wide = [torch.stack([v, -v], 2)[:, :, 0] for v in vs]  # the same values, column stride 2
    assert not wide[0].is_contiguous() and torch.equal(ops.dot_interaction(wide, 1), out)
    half = [v.bfloat16() for v in vs]  # not float32: the torch-ops reference in that dtype
    assert torch.equal(ops.dot_interaction(half, 1), dot_interaction_ref(half, 1))
    monkeypatch.setattr(native, "dot_interaction", lambda vectors, pad: None)  # no native library
    monkeypatch.setattr(native, "dot_interaction_backward", lambda grad, vectors, pad: None)
    assert torch.equal(ops.dot_interaction(vs, 1), dot_interaction_ref(vs, 1))
    leaves = [v.clone().requires_grad_(True) for v in vs]
    ops.dot_interaction(leaves, 1).sum().backward()
    expected = dot_interaction_backward_ref(torch.ones(12, 8 + 6 + 1), vs, 1)
    assert all(torch.equal(leaf.grad, e) for leaf, e in zip(leaves, expected))


def test_the_backward_op_checks_what_it_hands_the_c_pass():
    vs = _vectors(6, 3, 4)
    grad = torch.randn(6, 4 + 3)
    with pytest.raises(TypeError, match=r"vectors\[1\] is torch.float64"):
        torch.ops.hwaware.dot_interaction_backward(grad, [vs[0], vs[1].double(), vs[2]], 0)
    with pytest.raises(ValueError, match=r"grad must be torch.float32 \[B, D \+ V\(V-1\)/2 \+ pad\] = \[6, 7\]"):
        torch.ops.hwaware.dot_interaction_backward(grad[:, :5], vs, 0)


def test_double_backward_raises():
    leaves = [v.requires_grad_(True) for v in _vectors(4, 3, 5)]
    out = ops.dot_interaction(leaves, 0).sum()
    with pytest.raises(RuntimeError, match="hwaware::dot_interaction has no double backward"):
        torch.autograd.grad(out, leaves, create_graph=True)


def test_rejects_bad_inputs():
    vs = _vectors(4, 3, 5)
    with pytest.raises(ValueError, match=r"at least one \[B, D\] tensor"):
        ops.dot_interaction([], 0)
    with pytest.raises(ValueError, match=r"vectors\[0\] must be 2-D \[B, D\], got shape \[4, 5, 1\]"):
        ops.dot_interaction([vs[0][..., None]], 0)
    with pytest.raises(ValueError, match=r"vectors\[2\] must have vectors\[0\]'s shape \[B, D\] = \[4, 5\], got \[4, 6\]"):
        ops.dot_interaction([vs[0], vs[1], torch.randn(4, 6)], 0)
    with pytest.raises(TypeError, match=r"vectors\[1\] is torch.float64 on cpu; every vector must match vectors\[0\]"):
        ops.dot_interaction([vs[0], vs[1].double()], 0)
    with pytest.raises(TypeError, match=r"vectors\[1\] must be \[B, D\] float"):
        ops.dot_interaction([vs[0], torch.ones(4, 5, dtype=torch.int64)], 0)
    with pytest.raises(ValueError, match=r"pad=-1 must be >= 0"):
        ops.dot_interaction(vs, -1)


@pytest.mark.parametrize("pad", [0, 3])
def test_opcheck(pad):
    vs = _vectors(6, 4, 8, seed=5)
    torch.library.opcheck(torch.ops.hwaware.dot_interaction.default, (vs, pad))
    leaves = [v.clone().requires_grad_(True) for v in vs]
    torch.library.opcheck(torch.ops.hwaware.dot_interaction.default, (leaves, pad))
    grad = torch.randn(6, 8 + 6 + pad)
    torch.library.opcheck(torch.ops.hwaware.dot_interaction_backward.default, (grad, vs, pad))


def test_dlrm_forward_is_the_torch_ops_interaction_and_exports_with_the_op():
    from hwaware.recsys import DLRM

    torch.manual_seed(0)
    model = DLRM(table_sizes=(50, 30, 20), embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(12,), interaction_pad=4).eval()
    dense, sparse = torch.randn(10, 13), torch.stack([torch.randint(0, n, (10,)) for n in (50, 30, 20)], 1)

    def reference(dense, sparse):  # DLRM's interaction written with torch ops (its formula before the fused op)
        x = model.bottom_mlp(dense)
        offsets = torch.arange(dense.shape[0])
        vectors = [x] + [emb(sparse[:, t].contiguous(), offsets) for t, emb in enumerate(model.embeddings)]
        return model.top_mlp(dot_interaction_ref(vectors, model._pad)).squeeze(1)

    with torch.no_grad():
        out, ref = model(dense, sparse), reference(dense, sparse)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    program = torch.export.export(model, (dense, sparse))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "hwaware.dot_interaction.default" in targets
    torch.testing.assert_close(program.module()(dense, sparse), out, atol=0, rtol=0)


def test_dlrm_trains_under_torch_compile_fullgraph():
    """The op's fake kernels and registered autograd let inductor compile a whole training step."""
    from hwaware.recsys import DLRM

    torch.manual_seed(0)
    model = DLRM(table_sizes=(50, 30, 20), embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(12,))
    dense, sparse = torch.randn(32, 13), torch.stack([torch.randint(0, n, (32,)) for n in (50, 30, 20)], 1)
    label = torch.rand(32)

    def grads(m):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(dense, sparse), label)
        return torch.autograd.grad(loss, list(model.parameters()))

    eager = grads(model)
    torch._dynamo.reset()
    compiled = grads(torch.compile(model, fullgraph=True))
    for a, b in zip(eager, compiled):  # inductor fuses the MLP's float ops differently: not bit-exact
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
