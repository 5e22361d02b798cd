"""export's argument checks: what it accepts, and errors that name the argument before any work."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hwaware.export import export


def _mlp_and_val():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(64, 8)
    return model, [(x, (x[:, :1] > 0).float())]


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5),
                                   torch.tensor(1, dtype=torch.int64), np.int64(1), 1, 0.5])
def test_max_drop_accepts_any_real_scalar(tmp_path, value):
    model, val = _mlp_and_val()
    art = export(model, tmp_path / "art", val_dataloader=val, max_drop=value)
    assert type(art.report["max_drop"]) is float and art.report["max_drop"] == pytest.approx(float(value))


@pytest.mark.parametrize("value, type_name", [
    (True, "builtins.bool"), (np.bool_(False), "numpy.bool"), (torch.tensor(True), "torch.Tensor"),
    (math.nan, "builtins.float"), (np.float32("inf"), "numpy.float32"), (torch.tensor(-0.1), "torch.Tensor"),
    (-1, "builtins.int"), (torch.tensor([0.1]), "torch.Tensor"), (np.array([0.1, 0.2]), "numpy.ndarray"),
    ("0.1", "builtins.str"), (None, "builtins.NoneType"), (torch.tensor(0.1 + 0j), "torch.Tensor"),
])
def test_max_drop_rejects_non_real_non_finite_negative_or_non_scalar_values(tmp_path, value, type_name):
    model, val = _mlp_and_val()
    with pytest.raises(ValueError, match=r"max_drop=.*of type " + type_name.replace(".", r"\.")
                       + r".*; expected a finite real number >= 0"):
        export(model, tmp_path / "art", val_dataloader=val, max_drop=value)
    assert not (tmp_path / "art").exists()


class _CountingLoader:
    """Validation batches that count how often the gate (or anything) iterates them."""

    def __init__(self, batches):
        self.batches, self.iterated = batches, 0

    def __iter__(self):
        self.iterated += 1
        return iter(self.batches)


@pytest.mark.parametrize("given, match", [
    (lambda d, i: (d,), r"does not fit TinyCTR\.forward\(dense, ids\): missing a required argument: 'ids'; given 1 input\(s\): \(Tensor\[8, 4\] float32\)"),
    (lambda d, i: (d, i, i), r"does not fit TinyCTR\.forward.*too many positional arguments; given 3 input\(s\)"),
    (lambda d, i: d, r"example_inputs=Tensor\[8, 4\] float32; expected a tuple of the tensors TinyCTR\.forward takes"),
    (lambda d, i: (d, [1, 2]), r"example_inputs\[1\]\[0\] is int; expected tensors, or dicts \(str keys\), lists and tuples"),
])
def test_example_inputs_that_do_not_fit_forward_fail_first_and_say_so(tmp_path, given, match):
    from tests.helpers import TinyCTR, loaders

    _, val = loaders()
    val = _CountingLoader(list(val))
    dense, ids = torch.randn(8, 4), torch.randint(0, 50, (8,))
    with pytest.raises(TypeError, match=match):
        export(TinyCTR(), tmp_path / "art", val_dataloader=val, max_drop=1.0, example_inputs=given(dense, ids))
    assert val.iterated == 0 and not (tmp_path / "art").exists()  # refused before the gate ran
    # the same, fitting forward: exported (a list is taken as the tuple of inputs)
    art = export(TinyCTR(), tmp_path / "art", val_dataloader=val, max_drop=1.0, example_inputs=[dense, ids])
    assert len(art.manifest["inputs"]) == 2 and val.iterated > 0


def test_example_inputs_with_a_batch_of_0_rows_are_refused(tmp_path):
    """A deployment trial: program.pt2 served batch 0 only ("Guard failed: dense.size()[0] == 0" at any
    real batch) and the kernels were chosen by timings on no rows."""
    from tests.helpers import TinyCTR

    with pytest.raises(ValueError, match=r"example_inputs has a batch of 0 rows: \[0\] Tensor\[0, 4\] float32, \[1\] "
                                         r"Tensor\[0\] int64.*two rows or more"):
        export(TinyCTR(), tmp_path / "art", example_inputs=(torch.randn(0, 4), torch.randint(0, 50, (0,))))
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("kw, error, match", [
    ({"sparse24": "no"}, TypeError, r"sparse24='no'; expected True or False"),  # was taken as True
    ({"output_fn": 5}, TypeError, r"output_fn=5; expected None or a function"),  # failed inside the gate, unnamed
    ({"device": torch.device("cuda")}, ValueError, r"device=device\(type='cuda'\); export measures and gates on 'cpu'"),
])
def test_flags_and_functions_of_the_wrong_kind_are_named_before_any_work(tmp_path, kw, error, match):
    model, val = _mlp_and_val()
    loader = _CountingLoader(val)
    with pytest.raises(error, match=match):
        export(model, tmp_path / "art", val_dataloader=loader, max_drop=1.0, **kw)
    assert loader.iterated == 0 and not (tmp_path / "art").exists()


def test_device_may_be_given_as_a_torch_device(tmp_path):
    model, val = _mlp_and_val()
    assert export(model, tmp_path / "art", val_dataloader=val, max_drop=1.0, device=torch.device("cpu")).report["passed"]


def test_a_reference_module_keeps_each_submodules_train_flag(tmp_path):
    model, val = _mlp_and_val()
    reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    reference.load_state_dict(model.state_dict())
    reference[0].eval()  # a mix: the top module training, one child frozen
    export(model, tmp_path / "art", val_dataloader=val, max_drop=1.0, reference=reference)
    assert [m.training for m in reference.modules()] == [True, False, True, True]


class _Head(nn.Module):
    """A table, a 32-wide body and a head: what a post-training user picks layers of."""

    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(40, 8, mode="sum")
        self.body = nn.Linear(8 + 4, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 1)

    def forward(self, dense, ids):
        e = self.emb(ids, torch.arange(ids.shape[0]))
        return self.head(torch.relu(self.mid(torch.relu(self.body(torch.cat([dense, e], 1)))))).squeeze(-1)


def _head_val():
    g = torch.Generator().manual_seed(1)
    dense, ids = torch.randn(96, 4, generator=g), torch.randint(0, 40, (96,), generator=g)
    return [(dense[i:i + 32], ids[i:i + 32], (dense[i:i + 32, 0] > 0).float()) for i in (0, 32, 64)]


def test_post_training_export_takes_skip_and_layer_specs(tmp_path):
    """A user with a trained FP32 model had no way to keep its head FP32 or put a layer in int4
    without reaching into hwaware's internals (a PTQ trial)."""
    from hwaware import QuantSpec, load
    from hwaware.quant.attach import quant_states

    torch.manual_seed(0)
    model, val = _Head(), _head_val()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    art = export(model, tmp_path / "a", val_dataloader=val, max_drop=1.0, skip="head",
                 layer_specs={"mid": QuantSpec(bits=4, granularity="per_group", group_size=32),
                              "body": {"activation": None}})
    layers = art.manifest["layers"]
    assert {n: m["scheme"] for n, m in layers.items()} == {"emb": "rowwise_int8", "body": "int8", "mid": "int4"}
    assert layers["body"]["weight_only"] is True and layers["body"]["kernels"] == {"cpu": "dequant", "cuda": "dequant"}
    assert art.manifest["dense_layers"] == {"head": "skipped by post-training quantization: matches skip pattern 'head'"}
    assert art.manifest["post_training"] is True
    assert art.manifest["post_training_options"] == {"skip": ["head"], "layer_specs": {
        "mid": {"weight": QuantSpec(bits=4, granularity="per_group", group_size=32).to_dict()}, "body": {"activation": None}}}
    # the user's model is left as it was
    assert not quant_states(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loaded = load(art.path, model=_Head())
    dense, ids, _ = val[0]
    torch.testing.assert_close(loaded(dense, ids), art.model(dense, ids), atol=0, rtol=0)
    torch.testing.assert_close(loaded.head.weight, model.head.weight, atol=0, rtol=0)


@pytest.mark.parametrize("kw, error, match", [
    (dict(skip=3), ValueError, r"skip=3 is invalid; expected a sequence of fnmatch patterns"),
    (dict(skip=["nope"]), ValueError, r"skip pattern 'nope' matches no"),
    (dict(layer_specs={"mid": {"activation": __import__("hwaware").QuantSpec(granularity="per_tensor")}}), ValueError,
     r"layer_specs\['mid'\]\['activation'\] is int8/per_tensor/sym; post-training export takes no calibration"),
    (dict(layer_specs={"mid": {"activation": __import__("hwaware").QuantSpec(granularity="per_row", dynamic=True,
                                                                             symmetric=False)}}), ValueError,
     r"layer_specs\['mid'\]\['activation'\] is int8/per_row/asym/dyn; post-training export takes no calibration and "
     r"serves a Linear's input per token"),  # (was accepted, and served symmetric)
    (dict(layer_specs={"mid": __import__("hwaware").QuantSpec(bits=8, granularity="per_tensor")}), ValueError,
     r"layer_specs asks post-training export for specs no deploy op packs .* mid: no deploy op for int8/per_tensor/sym"),
    (dict(layer_specs=["mid"]), TypeError, r"layer_specs must be a mapping"),
])
def test_post_training_skip_and_layer_specs_are_checked_before_any_work(tmp_path, kw, error, match):
    model, val = _Head(), _head_val()
    with pytest.raises(error, match=match):
        export(model, tmp_path / "a", val_dataloader=val, **kw)
    assert not (tmp_path / "a").exists()


def test_skip_and_layer_specs_are_refused_for_a_model_qat_quantized(tmp_path):
    from hwaware import QuantSpec
    from hwaware.quant.attach import attach_quantization, find_quantizable

    model, val = _Head(), _head_val()
    plan, _ = find_quantizable(model, weight_spec=QuantSpec(bits=8, granularity="per_channel"))
    attach_quantization(model, plan)
    for kw in (dict(skip="head"), dict(layer_specs={"mid": QuantSpec(bits=4, granularity="per_group", group_size=32)}),
               dict(layer_specs={"mid": {"activation": QuantSpec(granularity="per_tensor")}})):  # (not the PTQ message)
        with pytest.raises(ValueError, match=r"skip= and layer_specs= choose what post-training export quantizes; _Head "
                                             r"was quantized by QAT \(3 layers\)"):
            export(model, tmp_path / "a", val_dataloader=val, **kw)
    assert not (tmp_path / "a").exists()
