"""What the manifest (and ``hwaware inspect``) says about each layer after a real fit: 2:4 layers packed
int4 (the 2:4 structure is not packed), and the layers QAT left out, with the callback's reasons."""
from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl

from hwaware import QuantSpec
from hwaware.callbacks import ProgressiveQuantization, SemiStructuredSparsity
from hwaware.cli import main
from hwaware.export import export
from hwaware.export.deploy import Int4Linear
from hwaware.ops.packing import dequantize_int4_weight, is_24
from tests.helpers import TinyCTR, loaders, make_trainer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """TinyCTR(dim=8): mlp.0 is 12 -> 32 (K=12: no int4 group of 32; QAT skips it) and left dense by the
    pruner; mlp.2 is 32 -> 1, 2:4-pruned and int4 g32; the table is skipped by a pattern."""
    pl.seed_everything(0, verbose=False)
    model = TinyCTR(dim=8, hidden=32)
    sparse = SemiStructuredSparsity(start_epoch=1, skip=["mlp.0"])
    qat = ProgressiveQuantization(start_epoch=2, calibration_batches=2, skip=["emb"],
                                  weight_spec=QuantSpec(bits=4, granularity="per_group", group_size=32))
    make_trainer(tmp_path_factory.mktemp("fit"), [sparse, qat], max_epochs=3).fit(model, *loaders())
    assert sparse.report["layers"]["mlp.2"]["verified_24"]
    assert set(qat.report["skipped"]) == {"emb", "mlp.0"}
    return model, qat


def _export(model, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art = export(model, path, val_dataloader=loaders()[1], max_drop=1.0)
    return art, [str(w.message) for w in caught]


def test_a_2_4_layer_quantized_int4_is_packed_int4_and_the_manifest_inspect_and_a_warning_say_so(tmp_path, fitted, capsys):
    model, _ = fitted
    art, caught = _export(model, tmp_path / "art")
    meta = art.manifest["layers"]["mlp.2"]
    assert meta["scheme"] == "int4" and isinstance(art.model.mlp[2], Int4Linear)
    assert meta["sparse24_unpacked"] is True
    assert "2:4 pattern is kept in the int4 values" in meta["note"] and "no int4 2:4 format" in meta["note"]
    # the values do keep it: the packed int4 weight dequantizes to a 2:4 matrix
    m = art.model.mlp[2]
    assert is_24(dequantize_int4_weight(m.packed, m.scales, m.zeros, m.group_size))
    warned = [w for w in caught if "2:4-pruned layer(s) quantized int4" in w]
    assert len(warned) == 1 and "mlp.2" in warned[0] and "no int4 2:4 format" in warned[0]
    assert main(["inspect", art.path]) == 0
    out = capsys.readouterr().out
    assert "notes:\n  mlp.2: 2:4-sparse weight: its 2:4 pattern is kept in the int4 values" in out
    # sparse24=False asks for no 2:4 packing at all: nothing to note or warn about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art = export(model, tmp_path / "nosparse", val_dataloader=loaders()[1], max_drop=1.0, sparse24=False)
    assert "note" not in art.manifest["layers"]["mlp.2"] and not any("2:4" in str(w.message) for w in caught)


def test_layers_qat_skipped_are_listed_dense_with_the_callback_s_reason(tmp_path, fitted, capsys):
    model, qat = fitted
    art, _ = _export(model, tmp_path / "art")
    dense = art.manifest["dense_layers"]
    for name, why in qat.report["skipped"].items():
        assert dense[name] == f"skipped by QAT: {why}"
    assert dense["mlp.0"] == "skipped by QAT: in_features=12 is not a multiple of group_size=32"
    assert dense["emb"] == "skipped by QAT: matches skip pattern 'emb'"
    assert main(["inspect", art.path]) == 0
    out = capsys.readouterr().out
    assert "left dense (2):" in out
    assert "  mlp.0: skipped by QAT: in_features=12 is not a multiple of group_size=32" in out
    assert "  emb: skipped by QAT: matches skip pattern 'emb'" in out


def test_without_the_trainer_the_unquantized_layers_are_still_listed(tmp_path, fitted):
    model, _ = fitted
    trainer = model._trainer
    model.trainer = None  # e.g. a model handed on without its trainer: no callback report to read
    try:
        art, _ = _export(model, tmp_path / "art")
    finally:
        model.trainer = trainer
    dense = art.manifest["dense_layers"]
    assert set(dense) == {"emb", "mlp.0"} and all("not quantized by QAT" in why for why in dense.values())


def test_post_training_export_lists_the_layers_it_could_not_quantize(tmp_path):
    import torch
    from torch import nn

    class Scaled(nn.Linear):  # a custom forward: hwaware leaves such layers untouched
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Scaled(16, 1))
    art = export(model, tmp_path / "art")
    assert art.manifest["post_training"] and set(art.manifest["layers"]) == {"0"}
    assert art.manifest["dense_layers"] == {
        "2": "skipped by post-training quantization: Scaled overrides forward(); hwaware leaves custom layers untouched"}


def test_the_int4_kernel_label_claims_no_instruction_set(tmp_path, fitted):
    model, _ = fitted
    art, _ = _export(model, tmp_path / "art")
    label = art.manifest["layers"]["mlp.2"]["kernel"]["cpu"]
    assert "no fast CPU int4 kernel" in label and "AVX" not in label.upper()


def test_post_training_layers_record_no_qat_activation_and_dense_reasons_name_the_layer_once(tmp_path):
    import torch
    from torch import nn

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.EmbeddingBag(20, 8, mode="max", padding_idx=0)
            self.lin = nn.Linear(8, 1)

        def forward(self, ids):
            return self.lin(self.emb(ids))

    torch.manual_seed(0)
    art = export(Bags(), tmp_path / "art")
    assert art.manifest["post_training"] and not any("qat_activation" in m for m in art.manifest["layers"].values())
    assert art.manifest["layers"]["lin"]["activation"]  # what is served is still recorded
    assert art.manifest["dense_layers"]["emb"] == ("skipped by post-training quantization: mode='max' with padding_idx: "
                                                   "no row-wise deploy op serves it, stays FP32")


def test_qat_layers_record_what_qat_trained_with(tmp_path):
    from tests.helpers import train_with_quant

    _, model, _ = train_with_quant(tmp_path, max_epochs=2, start_epoch=1, calibration_batches=2)
    art = export(model, tmp_path / "art", val_dataloader=loaders()[1], max_drop=1.0)
    assert art.manifest["layers"]["mlp.0"]["qat_activation"] == "int8/per_row/sym/dyn"


def test_a_2_4_layer_with_int8_values_says_which_int8_kernel_runs(tmp_path, capsys):
    import torch
    from torch import nn

    from hwaware.export.selection import SPARSE24_INT8_KERNEL
    from hwaware.sparsity import magnitude_mask_24

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        model[0].weight.mul_(magnitude_mask_24(model[0].weight))
    art = export(model, tmp_path / "art", example_inputs=(torch.randn(64, 32),))
    meta = art.manifest["layers"]["0"]
    assert meta["scheme"] == "sparse24_int8"
    op_kernel = meta["kernels"]["cpu"]
    impl = {v: k for k, v in SPARSE24_INT8_KERNEL.items()}[op_kernel]
    if "chain" in meta:  # the run 0 .. 2 was timed faster as one int8_mlp24 call (int_mm): timing decides
        assert impl == "int_mm" and meta["kernel"]["cpu"].startswith("hwaware::int8_mlp24 [cpu: int_mm, 0 .. 2")
    else:
        assert f"{op_kernel} = int8_linear {impl} on the int8 codes" in meta["kernel"]["cpu"]
    assert main(["inspect", art.path, "--wide"]) == 0  # the kernels column
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("0 "))
    assert f"cpu={op_kernel} (int8 {impl})" in row


def test_program_batch_range_says_1_when_a_batch_of_1_runs_through_the_saved_program(tmp_path, capsys):
    import os

    import torch

    torch.manual_seed(0)
    art = export(TinyCTR(), tmp_path / "art", example_inputs=(torch.randn(16, 4), torch.randint(0, 50, (16,))))
    assert art.manifest["program"]["batch_range"] == [[1, None], [1, None]]
    assert "a batch of 1 was run through the program" in art.manifest["program"]["note"]
    program = torch.export.load(os.path.join(art.path, "program.pt2")).module()
    dense, ids = torch.randn(1, 4), torch.randint(0, 50, (1,))
    with torch.no_grad():
        torch.testing.assert_close(program(dense, ids), art.model(dense, ids), atol=0, rtol=0)
    assert main(["inspect", art.path]) == 0
    assert "program.pt2: batch per input 1..any, 1..any" in capsys.readouterr().out


def test_program_batch_range_stays_at_2_when_a_batch_of_1_gives_another_result(tmp_path):
    import torch
    from torch import nn

    class Odd(nn.Module):  # batch 1 takes another branch: the program (traced at 16) would not follow it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 1)

        def forward(self, x):
            return self.lin(x) * (2.0 if x.shape[0] == 1 else 1.0)

    torch.manual_seed(0)
    art = export(Odd(), tmp_path / "art", example_inputs=(torch.randn(16, 8),))
    assert art.manifest["program"]["batch_range"] == [[2, None]]
    assert "a batch of 1 failed or differed" in art.manifest["program"]["note"]


def test_batch_of_one_check_allows_rounding_relative_to_the_outputs_magnitude():
    """A transformer whose traced attention differs from eager's fused one by 7.6e-6 on logits of
    about 10 was held to atol=1e-6 on its near-zero logits: the manifest said the program needs
    batch >= 2 though it ran batch 1 fine (a trial). A real difference still fails."""
    import torch
    from torch import nn

    from hwaware.export.exporter import _serves_batch_of_one

    torch.manual_seed(0)
    deploy = nn.Linear(8, 64)
    with torch.no_grad():
        deploy.weight.mul_(10)

    class Program:
        def __init__(self, noise):
            self.noise = noise

        def module(self):
            return lambda x: deploy(x) + self.noise * torch.linspace(-1, 1, 64)

    x = torch.randn(4, 8)
    assert float(deploy(x[:1]).abs().max()) > 5
    assert _serves_batch_of_one(Program(0.0), deploy, (x,), [True])
    assert _serves_batch_of_one(Program(8e-6), deploy, (x,), [True])
    assert not _serves_batch_of_one(Program(1e-2), deploy, (x,), [True])


def test_a_layer_the_sizing_batch_does_not_reach_says_so_not_that_no_inputs_were_given(tmp_path):
    # its record said "export got neither val_dataloader nor example_inputs" though both were given
    import torch

    from hwaware.export import export
    from tests.callbacks.test_progressive_quantization import AuxHead

    torch.manual_seed(0)
    art = export(AuxHead(), tmp_path / "a", example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    why = art.manifest["layers"]["aux"]["selection"]["cpu"]["why"]
    assert "did not call this one" in why and "neither" not in why
    assert "is nominal" not in art.manifest["layers"]["mlp.2"]["selection"]["cpu"]["why"]
