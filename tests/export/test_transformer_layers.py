"""Transformer layers whose parents bypass their forward: ``nn.MultiheadAttention`` multiplies its
``out_proj.weight`` and ``in_proj_weight`` itself (hwaware routes it so that it calls them as the
layers ``in_proj`` / ``out_proj``), and ``nn.TransformerEncoderLayer``'s fused fast path (eval,
``no_grad``) multiplies ``linear1`` / ``linear2``'s weights itself. A quantized or deploy layer
there must either be skipped with its reason or be called for real."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hwaware import QuantSpec
from hwaware.export import export, load
from hwaware.export.deploy import Int8Linear
from hwaware.quant import quant_states
from hwaware.quant.attach import attach_quantization, find_quantizable


class TinyEncoder(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def _model():
    torch.manual_seed(0)
    return TinyEncoder().eval()


def _val():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (96, 12), generator=g)
    return DataLoader(TensorDataset(x, (x < 16).sum(1) % 4), batch_size=32)


def test_the_attention_projections_are_planned_as_layers_without_touching_the_model():
    m = _model()
    plan, skipped = find_quantizable(m, weight_spec=QuantSpec(bits=8, granularity="per_channel"))
    assert list(plan) == ["enc.self_attn.in_proj", "enc.self_attn.out_proj", "enc.linear1", "enc.linear2", "head"]
    assert not any("self_attn" in n for n in skipped)
    assert type(m.enc.self_attn) is nn.MultiheadAttention and "in_proj" not in m.enc.self_attn._modules
    attach_quantization(m, plan)
    # attaching routed the module: the two layers the plan named, in the order it named them
    assert [n for n, _ in m.enc.self_attn.named_children()] == ["in_proj", "out_proj"]
    assert list(quant_states(m)) == list(plan)


class SeparateKV(nn.Module):
    """Attention whose keys and values are narrower than its queries: torch keeps three projection
    weights (``q_proj_weight``...), which hwaware does not route."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, mem, mem, need_weights=False)[0].mean(1))


def test_attention_that_cannot_be_routed_is_reported_not_silently_left_fp32():
    plan, skipped = find_quantizable(SeparateKV(), weight_spec=QuantSpec(bits=8, granularity="per_channel"))
    assert list(plan) == ["head"]
    assert "never calls the layer" in skipped["attn.out_proj"]
    for w in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert "separate q/k/v projection weights" in skipped[f"attn.{w}"]


def test_2_4_pruning_reports_the_attention_input_projection_it_leaves_dense():
    from hwaware.sparsity.masks import find_prunable

    m = _model()
    layers, skipped = find_prunable(m)
    assert sorted(layers) == ["enc.linear1", "enc.linear2", "head"]
    assert "bare Parameter" in skipped["enc.self_attn.in_proj_weight"]
    # MHA multiplies out_proj.weight itself: no 2:4 kernel runs it and export stores it dense, so
    # pruning it would only cost accuracy
    assert "its parent MultiheadAttention multiplies .weight itself" in skipped["enc.self_attn.out_proj"]
    # once quantization routed the attention (it calls both projections), pruning still leaves it
    # dense: the layers pruned do not depend on which callback attached first
    attach_quantization(m, find_quantizable(m, weight_spec=QuantSpec(bits=8, granularity="per_channel"))[0])
    layers, skipped = find_prunable(m)
    assert sorted(layers) == ["enc.linear1", "enc.linear2", "head"]
    for name in ("enc.self_attn.in_proj", "enc.self_attn.out_proj"):
        assert "2:4 pruning leaves attention dense" in skipped[name]


def test_eval_without_grad_runs_the_quantized_layers():
    m = _model()
    x = next(iter(_val()))[0]
    with torch.no_grad():
        fp32 = m(x)
    plan, _ = find_quantizable(m, weight_spec=QuantSpec(bits=4, granularity="per_channel"))
    for st in attach_quantization(m, plan).values():
        for q in st.quantizers():
            q.quantize = True  # weights: min-max of the live weight, fake-quantized from now on
    m.eval()
    with torch.no_grad():
        fast = m(x)  # the fused fast path would multiply linear1/linear2's FP32 weights here
    with torch.enable_grad():
        slow = m(x).detach()  # never the fast path: the layers' own forwards
    assert m.enc.activation_relu_or_gelu == 0  # the encoder's fused fast path is off
    # the same layers either way (MultiheadAttention's own fused kernel still sums in another order)
    assert (fast - slow).abs().max() < 1e-5
    assert (fast - fp32).abs().max() > 1e-3  # and they are the quantized layers


def test_export_and_load_run_the_deploy_layers_under_no_grad(tmp_path):
    m = _model()
    art = export(m, tmp_path / "art", val_dataloader=_val(), metric="accuracy", max_drop=1.0)
    layers, dense = art.manifest["layers"], art.manifest.get("dense_layers", {})
    for name in ("enc.self_attn.in_proj", "enc.self_attn.out_proj", "enc.linear1", "enc.linear2"):
        assert layers[name]["scheme"] == "int8", name
    assert layers["enc.self_attn.in_proj"]["shape"] == [96, 32]
    assert not any("self_attn" in n for n in dense)
    assert isinstance(art.model.enc.linear1, Int8Linear) and isinstance(art.model.enc.self_attn.in_proj, Int8Linear)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "art" / "weights.safetensors"), "pt") as f:  # the packed in_proj only, no FP32 copy
        stored = set(f.keys())
    assert "enc.self_attn.in_proj.qweight" in stored and not any("in_proj_weight" in k or "in_proj_bias" in k for k in stored)
    x = next(iter(_val()))[0]
    loaded = load(art.path, model=TinyEncoder())
    assert isinstance(loaded.enc.self_attn.in_proj, Int8Linear) and loaded.enc.self_attn.in_proj_weight is None
    with torch.no_grad():
        assert torch.equal(loaded(x), art.model(x))
    assert set(quant_states(m)) == set()  # post-training: the user's model is left as it was
    assert type(m.enc.self_attn) is nn.MultiheadAttention and "in_proj" not in m.enc.self_attn._modules
    assert m.enc.activation_relu_or_gelu == 1  # its fused fast path too (export turned it off while it ran)


def test_a_bf16_model_exports_and_serves_in_bf16(tmp_path):
    # the packed tables returned float32 into a bf16 model: its attention then refused the mix
    model = _model().to(torch.bfloat16)
    x = next(iter(_val()))[0]
    art = export(model, tmp_path / "a", val_dataloader=_val(), metric="accuracy", max_drop=1.0, example_inputs=(x,))
    assert art.manifest["layers"]["emb"]["dtype"] == "bfloat16"
    served = load(art.path, model=TinyEncoder())  # (FP32-built: the artifact's bf16 tensors are assigned)
    with torch.no_grad():
        y = served(x)
        assert y.dtype == torch.bfloat16 and served.emb(x).dtype == torch.bfloat16
        torch.testing.assert_close(y, art.model(x), atol=0, rtol=0)


class PaddedEncoder(nn.Module):
    """torch's defaults: ``nn.TransformerEncoder(enable_nested_tensor=True)``, post-norm layers, and a
    padding mask, under which eval with ``no_grad`` packs the batch into a NestedTensor."""

    def __init__(self, vocab: int = 64, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x == 0
        h = self.enc(self.emb(x), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def _padded_model_and_val():
    torch.manual_seed(0)
    m = PaddedEncoder().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 64, (96, 12), generator=g)
    x[::2, 8:] = 0  # every other sequence padded at its end
    return m, DataLoader(TensorDataset(x, (x < 16).sum(1) % 4), batch_size=32)


def test_an_encoder_with_a_padding_mask_runs_its_quantized_layers_on_the_padded_batch():
    # the encoder packed the batch into a NestedTensor (eval, no_grad, a mask), which fake quant
    # cannot take: "NestedTensorImpl doesn't support sizes"
    m, val = _padded_model_and_val()
    x = next(iter(val))[0]
    plan, _ = find_quantizable(m, weight_spec=QuantSpec(bits=4, granularity="per_channel"))
    for st in attach_quantization(m, plan).values():
        for q in st.quantizers():
            q.quantize = True
    m.eval()
    with torch.no_grad():
        fast = m(x)
    with torch.enable_grad():
        slow = m(x).detach()  # never the nested path
    assert m.enc.use_nested_tensor is False
    assert (fast - slow).abs().max() < 1e-5
    from hwaware.quant.attach import detach_quantization

    detach_quantization(m)
    assert m.enc.use_nested_tensor is True and all(layer.activation_relu_or_gelu == 1 for layer in m.enc.layers)


def test_an_encoder_with_a_padding_mask_exports_and_serves(tmp_path):
    # the gate ran hwaware::int8_linear on a NestedTensor: "Could not run ... from the 'NestedTensorCPU' backend"
    m, val = _padded_model_and_val()
    art = export(m, tmp_path / "art", val_dataloader=val, metric="accuracy", max_drop=1.0)
    assert art.manifest["layers"]["enc.layers.1.linear2"]["scheme"] == "int8"
    assert m.enc.use_nested_tensor is True  # the user's model is left as it was
    x = next(iter(val))[0]
    loaded = load(art.path, model=PaddedEncoder())
    assert loaded.enc.use_nested_tensor is False
    with torch.no_grad():
        assert torch.equal(loaded(x), art.model(x))


def test_a_layer_spec_for_an_unrouted_attention_projection_says_why_it_matches_nothing():
    # "matches no quantizable layer" although the pattern matched out_proj, which stays FP32
    import pytest

    with pytest.raises(ValueError, match=r"layer_specs pattern '\*.out_proj' matches no quantizable layer of SeparateKV "
                                         r"\(it matches attn.out_proj, which stay FP32: its parent "
                                         r"MultiheadAttention multiplies .weight itself"):
        find_quantizable(SeparateKV(), weight_spec=QuantSpec(bits=8, granularity="per_channel"),
                         layer_specs={"*.out_proj": QuantSpec(bits=8, granularity="per_channel")})
    # a routable module's projections take layer specs and skip patterns by their layer names
    plan, skipped = find_quantizable(_model(), weight_spec=QuantSpec(bits=8, granularity="per_channel"), skip=["*.in_proj"],
                                     layer_specs={"*.out_proj": QuantSpec(bits=4, granularity="per_group", group_size=32)})
    assert "enc.self_attn.in_proj" not in plan and "skip pattern" in skipped["enc.self_attn.in_proj"]
    assert plan["enc.self_attn.out_proj"][1].bits == 4


def test_a_model_that_is_one_attention_module_exports_and_loads(tmp_path):
    # a top-level module: its packed in-projection is "in_proj", its FP32 one "in_proj_weight"
    torch.manual_seed(0)
    m = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(6, 5, 32)
    art = export(m, tmp_path / "art", example_inputs=(x, x, x))
    assert art.manifest["layers"]["in_proj"]["scheme"] == "int8"
    loaded = load(art.path, model=nn.MultiheadAttention(32, 4, batch_first=True))
    assert loaded.in_proj_weight is None and isinstance(loaded.in_proj, Int8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(x, x, x)[0], art.model(x, x, x)[0])


def test_attention_modules_sharing_an_in_projection_weight_pack_it_as_tied():
    from hwaware.sparsity.masks import weight_key
    from hwaware.quant.attention import in_projection_view

    a, b = nn.MultiheadAttention(32, 4), nn.MultiheadAttention(32, 4)
    b.in_proj_weight = a.in_proj_weight
    assert weight_key(in_projection_view(a)) == weight_key(in_projection_view(b))


class ReadsInProjection(nn.Module):
    """A model that reads its attention's ``in_proj_weight`` itself, outside the attention call:
    packed, the in-projection has no FP32 weight there."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.read = read
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(getattr(self.attn, self.read).dtype)
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


import pytest  # noqa: E402


def test_an_in_projection_the_model_reads_itself_stays_dense(tmp_path):
    read = "in_proj_weight"
    torch.manual_seed(0)
    m = ReadsInProjection(read).eval()
    x = torch.randn(4, 6, 32)
    art = export(m, tmp_path / "art", example_inputs=(x,))
    layers, dense = art.manifest["layers"], art.manifest.get("dense_layers", {})
    assert "attn.in_proj" not in layers and layers["attn.out_proj"]["scheme"] == "int8"
    assert f"reads attn.{read} outside" in dense["attn.in_proj"]
    assert art.model.attn.in_proj_weight is not None  # kept FP32, and served
    loaded = load(art.path, model=ReadsInProjection(read))
    with torch.no_grad():
        assert torch.equal(loaded(x), art.model(x))
    assert type(m.attn) is nn.MultiheadAttention  # post-training: the user's model as it was


def test_a_skip_pattern_naming_in_proj_weight_keeps_the_in_projection_fp32():
    spec = QuantSpec(bits=8, granularity="per_channel")
    plan, skipped = find_quantizable(_model(), weight_spec=spec, skip=["enc.self_attn.in_proj_weight"])
    assert "enc.self_attn.in_proj" not in plan and "enc.self_attn.out_proj" in plan
    assert "skip pattern" in skipped["enc.self_attn.in_proj"]


def test_load_refuses_packed_projections_under_attention_it_cannot_route(tmp_path):
    # an artifact of a routable module, loaded into a model whose attention cannot be routed
    from hwaware.export.artifact import ArtifactError

    torch.manual_seed(0)
    m = nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True))
    x = torch.randn(6, 5, 32)

    class First(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, q):
            return self.attn(q, q, q, need_weights=False)[0]

    for skip, first in (((), "in_proj"), (["*.in_proj"], "out_proj")):
        art = export(First(m[0]), tmp_path / f"art{first}", example_inputs=(x,), skip=skip)
        assert "attn.out_proj" in art.manifest["layers"]
        for other in (nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True),
                      nn.MultiheadAttention(32, 4, add_bias_kv=True, batch_first=True)):
            with pytest.raises(ArtifactError, match=rf"layer 'attn\.{first}' is packed .* cannot be routed"):
                load(art.path, model=First(other))
        load(art.path, model=First(nn.MultiheadAttention(32, 4, batch_first=True)))


def test_2_4_pruning_accepts_the_in_proj_weight_skip_pattern_before_and_after_routing():
    from hwaware.quant.attach import route_for
    from hwaware.sparsity.masks import find_prunable

    m = _model()
    find_prunable(m, skip=["enc.self_attn.in_proj_weight"])
    route_for(m, ["enc.self_attn.in_proj"])
    _, skipped = find_prunable(m, skip=["enc.self_attn.in_proj_weight"])
    assert "enc.self_attn.in_proj" in skipped
