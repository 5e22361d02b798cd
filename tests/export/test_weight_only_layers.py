"""A layer QAT trained weight-only (``activation: None``) is served weight-only: the export's
kernel choice could put it on an int8 implementation that quantizes its input (``int_mm``,
``fbgemm``), which QAT never trained for."""
from __future__ import annotations

import pytest
import torch

from hwaware.export import ArtifactError, export, load
from hwaware.export.deploy import Int8Linear
from tests.export.test_recorded_hparams import _rehashed
from tests.helpers import TinyCTR, loaders, train_with_quant


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    _, model, cb = train_with_quant(tmp_path_factory.mktemp("fit"), max_epochs=3, start_epoch=1, calibration_batches=2,
                                    layer_specs={"mlp.0": {"activation": None}})
    assert cb.report["layers"]["mlp.0"]["activation"] is None
    return model


def test_a_weight_only_layer_runs_dequant_and_only_the_others_are_chosen_for(trained, tmp_path):
    _, val = loaders()
    # int_mm only: before, mlp.0 ran it too, on int8 activations QAT never trained with
    art = export(trained, tmp_path / "a", val_dataloader=val, max_drop=1.0, int8_impls=("int_mm",),
                 example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    layers = art.manifest["layers"]
    assert layers["mlp.0"]["weight_only"] is True and layers["mlp.0"]["kernels"]["cpu"] == "dequant"
    assert layers["mlp.0"]["activation"].startswith("none: the input stays float")
    assert layers["mlp.0"]["selection"]["cpu"]["why"].startswith("weight-only layer (activation None: QAT trained it so")
    assert "weight_only" not in layers["mlp.2"] and layers["mlp.2"]["kernels"]["cpu"] == "int_mm"
    assert layers["mlp.2"]["qat_activation"] and "qat_activation" not in layers["mlp.0"]
    assert set(art.manifest["regression"]["by_impl"]) == {"int_mm"}  # the gate switched mlp.2 only
    # served as recorded: load rebuilds the pin, and re-timing on this CPU keeps it
    for kernels in ("recorded", "measure"):
        served = load(art.path, model=TinyCTR, kernels=kernels)
        assert served.mlp[0].weight_only and served.mlp[0].kernels["cpu"] == "dequant", kernels
        with torch.no_grad():
            for dense, ids, _ in val:
                assert torch.equal(served(dense, ids), art.model(dense, ids))
    assert set(load(art.path, model=TinyCTR, kernels="measure").hwaware_selection) == {"mlp.2"}  # mlp.0: nothing to time


def test_post_training_layers_are_not_pinned(tmp_path):
    torch.manual_seed(0)
    art = export(TinyCTR(), tmp_path / "a", int8_impls=("int_mm",), example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    assert all("weight_only" not in m for m in art.manifest["layers"].values())
    assert isinstance(art.model.mlp[0], Int8Linear) and art.model.mlp[0].kernels["cpu"] == "int_mm"


@pytest.mark.parametrize("edit, why", [
    (lambda e: e.update(weight_only="yes"), r"weight_only='yes'; expected true or false"),
    (lambda e: e["kernels"].update(cpu="int_mm"), r"weight_only with CPU kernel 'int_mm'; a weight-only layer runs 'dequant'"),
])
def test_an_edited_weight_only_entry_is_refused(trained, tmp_path, edit, why):
    art = export(trained, tmp_path / "a")
    _rehashed(art.path, lambda m: edit(m["layers"]["mlp.0"]))
    with pytest.raises(ArtifactError, match=r"layer 'mlp.0' \(Int8Linear\): its entry is malformed \(ValueError: " + why):
        load(art.path, model=TinyCTR)


def test_a_weight_only_layer_is_pinned_on_cuda_too():
    # CUDA's int8_linear ran its W8A8 Triton kernel whatever impl said: the pin held on CPU only.
    # The CUDA implementations' dequant path is plain torch: run here on CPU tensors, against the CPU op.
    from hwaware.export.deploy import Sparse24Linear
    from hwaware.ops import _cuda, packing

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    w[:, 1::2] = 0  # 2:4 (every other entry)
    q, s = packing.quantize_int8_weight(w)
    bias, x = torch.randn(8, generator=g), torch.randn(5, 16, generator=g)
    layer = Int8Linear(q, s, bias)
    layer.serve_weight_only()
    assert layer.kernels == {"cpu": "dequant", "cuda": "dequant"}
    want = torch.ops.hwaware.int8_linear(x, q, s, bias, "dequant", True)
    assert torch.equal(_cuda._int8_linear_cuda(x, q, s, bias, layer.kernels["cuda"], True), want)
    values, meta = packing.compress_24(q)
    sparse = Sparse24Linear(values, meta, s, bias)
    sparse.serve_weight_only()
    want = torch.ops.hwaware.sparse24_linear(x, values, meta, s, bias, "dequant")
    assert torch.equal(_cuda._sparse24_linear_cuda_impl(x, values, meta, s, bias, sparse.kernels["cuda"]), want)


def test_a_failing_gate_with_every_int8_layer_pinned_is_a_regression_error(tmp_path):
    # no layer left to gate per implementation, and the fallback looked one up: KeyError 'int_mm'
    from hwaware.export import RegressionError

    _, model, _ = train_with_quant(tmp_path / "fit", max_epochs=3, start_epoch=1, calibration_batches=2, activation_spec=None)
    with torch.no_grad():
        model.mlp[2].weight.mul_(-1)  # broken after QAT: the kept FP32 reference is still good
    _, val = loaders()
    with pytest.raises(RegressionError, match=r"auroc dropped .* more than max_drop=0.001; nothing was written"):
        export(model, tmp_path / "a", val_dataloader=val, max_drop=0.001, int8_impls=("int_mm",))


def test_a_layer_too_wide_for_int32_sums_is_served_weight_only_and_gated_so(tmp_path):
    # K past fbgemm's exact int32 range: the integer implementations refuse it (they summed it wrong
    # before), so export pins it to dequant, says why, and load keeps it there
    from torch import nn

    from hwaware.ops import FBGEMM_MAX_K

    torch.manual_seed(0)
    k = FBGEMM_MAX_K + 7
    model = nn.Sequential(nn.Linear(k, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(32, k)
    art = export(model, tmp_path / "a", val_dataloader=[(x, (x[:, :1] > 0).float())], max_drop=1.0, example_inputs=(x[:4],))
    wide, narrow = art.manifest["layers"]["0"], art.manifest["layers"]["2"]
    assert wide["weight_only"] is True and wide["kernels"]["cpu"] == "dequant" and f"K={k} inputs" in wide["note"]
    assert wide["selection"]["cpu"]["why"].startswith(f"K={k} inputs") and "weight_only" not in narrow
    loaded = load(art.path, model=nn.Sequential(nn.Linear(k, 4), nn.ReLU(), nn.Linear(4, 1)), kernels="measure")
    assert loaded[0].kernels["cpu"] == "dequant"
    assert torch.equal(loaded(x), art.model(x))
