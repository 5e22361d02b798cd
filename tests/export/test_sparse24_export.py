"""2:4 layers through export: compressed packing (FP32 or int8 values), measured kernel choice,
the loader's 2:4 verification, and exact agreement with the dense deploy paths."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from hwaware.callbacks import ProgressiveQuantization, SemiStructuredSparsity
from hwaware.export import export, load
from hwaware.export.artifact import _ADDED_FIELDS, ArtifactError, read_manifest, read_tensors, write_artifact
from hwaware.export.deploy import Int8Chain, Int8Linear, Sparse24Linear
from hwaware.ops.packing import pack_int4
from tests.helpers import TinyCTR, loaders, make_trainer


def _train(tmp_path, quant: bool):
    pl.seed_everything(0, verbose=False)
    model = TinyCTR()
    cbs = [SemiStructuredSparsity(start_epoch=1)]
    if quant:
        cbs.append(ProgressiveQuantization(start_epoch=2, calibration_batches=2))
    trainer = make_trainer(tmp_path, cbs, max_epochs=3)
    train, val = loaders()
    trainer.fit(model, train, val)
    return model


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("pruned"), quant=False)


@pytest.fixture(scope="module")
def pruned_qat(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("pruned_qat"), quant=True)


def _outputs(module, loader):
    with torch.no_grad():
        return torch.cat([module.predict_step(b, 0) for b in loader])


def test_post_training_export_of_a_pruned_model_packs_int8_2_4(tmp_path, pruned):
    # a plain FP32 model pruned by the callback: PTQ quantizes every Linear to int8, and the 2:4
    # ones pack as int8 values in the compressed form
    _, val = loaders()
    art = export(pruned, tmp_path / "art", val_dataloader=val, max_drop=0.05)
    layers = art.manifest["layers"]
    assert layers["mlp.0"]["scheme"] == "sparse24_int8" and layers["mlp.2"]["scheme"] == "sparse24_int8"
    assert art.manifest["post_training"]


def test_post_training_gate_of_a_pruned_model_measures_the_model_as_given_too(tmp_path, pruned):
    """The dense model kept at pruning start may not have learned yet: a post-training export of the
    pruned model is gated against the better of it and the FP32 model being quantized (a trial's
    dense reference scored at chance, and a drop of 0.016 against the model as given passed
    max_drop=0.01)."""
    from hwaware.quant.attach import fp32_reference, set_fp32_reference

    _, val = loaders()
    kept = fp32_reference(pruned)
    try:
        chance = {k: v.clone() for k, v in pruned.state_dict().items()}
        chance["mlp.2.weight"].zero_()  # a constant output: AUROC 0.5, a model that had learned nothing
        chance["mlp.2.bias"].zero_()
        set_fp32_reference(pruned, chance)
        art = export(pruned, tmp_path / "art", val_dataloader=val, max_drop=0.05)
    finally:
        set_fp32_reference(pruned, kept)
    reg = art.report
    refs = reg["references"]
    assert set(refs) == {"dense at 2:4 pruning start", "the model as given (post-training)"}
    assert refs["dense at 2:4 pruning start"] == 0.5 < refs["the model as given (post-training)"]
    assert reg["reference"] == refs["the model as given (post-training)"] == reg["final_weights_fp32"]
    assert reg["drop"] == reg["reference"] - reg["exported"]


def test_sparse_fp32_layers_left_out_of_quantization_pack_with_fp32_values(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = TinyCTR()
    cbs = [SemiStructuredSparsity(start_epoch=1), ProgressiveQuantization(start_epoch=2, calibration_batches=2, skip=["mlp.*"])]
    make_trainer(tmp_path, cbs, max_epochs=3).fit(model, *loaders())
    _, val = loaders()
    art = export(model, tmp_path / "art", val_dataloader=val, max_drop=0.01)
    meta = art.manifest["layers"]["mlp.0"]
    assert meta["scheme"] == "sparse24" and isinstance(art.model.mlp[0], Sparse24Linear)
    assert art.manifest["dense_layers"] == {}
    # FP32 values: the dense kernel is the layer it replaced; csr sums in another order (MKL's AVX2
    # kernels differ from F.linear by ~1e-6 relative). Each pinned: export timed one of them.
    x = torch.randn(33, 12)
    want = nn.functional.linear(x, model.mlp[0].weight, model.mlp[0].bias)
    chosen = art.model.mlp[0].kernels["cpu"]
    for kernel, atol, rtol in (("dense", 0, 1e-6), ("csr", 1e-5, 1e-5)):
        art.model.mlp[0].kernels["cpu"] = kernel
        torch.testing.assert_close(art.model.mlp[0](x), want, atol=atol, rtol=rtol)
    art.model.mlp[0].kernels["cpu"] = chosen
    # half the bytes, plus 1/16 for the 2-bit positions (K=12: 3 groups -> 2 bytes per row)
    assert meta["bytes"] == 32 * 6 * 4 + 32 * 2 + 32 * 4
    sel = meta["selection"]["cpu"]
    assert sel["input_shape"] == [32, 12]
    assert set(sel["measured"]) == {"dense", "int8", "int8_fbgemm", "int8_dequant", "2:4", "2:4+int8"}
    assert sel["chosen"] in ("dense", "2:4") and sel["measured"][sel["chosen"]]["keeps_math"]
    eligible = {c: e["us"] for c, e in sel["measured"].items() if e["available"] and e["keeps_math"]}
    assert sel["chosen"] == min(eligible, key=eligible.get)
    assert meta["kernels"] == {"cpu": sel["op_kernel"]} and "why" in sel


def test_int8_2_4_matches_the_int8_path_exactly_and_loads(tmp_path, pruned_qat):
    _, val = loaders()
    art = export(pruned_qat, tmp_path / "sparse", val_dataloader=val, max_drop=0.05)
    dense = export(pruned_qat, tmp_path / "dense", val_dataloader=val, max_drop=0.05, sparse24=False)
    assert isinstance(art.model.mlp[0], Sparse24Linear) and isinstance(dense.model.mlp[0], Int8Linear)
    # the same int8 codes and scales through the same implementation: identical outputs. Every
    # layer is pinned, not only mlp.0: each export times its own kernel per layer, and mlp.2 (2:4 in
    # one, dense int8 in the other) may come out differently in the two runs on a loaded machine
    same = {"int_mm": "dense", "fbgemm": "fbgemm", "dequant": "dequant"}  # int8_linear impl -> sparse24 kernel
    layers = [(dense.model.mlp[i], art.model.mlp[i]) for i in (0, 2)]
    chosen = [(d.kernels["cpu"], s.kernels["cpu"]) for d, s in layers]
    for impl, kernel in same.items():
        for d, s in layers:
            d.kernels["cpu"] = impl
            s.kernels["cpu"] = kernel if isinstance(s, Sparse24Linear) else impl
        torch.testing.assert_close(_outputs(art.model, val), _outputs(dense.model, val), atol=0, rtol=0)
    for (d, s), (dk, sk) in zip(layers, chosen):
        d.kernels["cpu"], s.kernels["cpu"] = dk, sk
    if all(same[dk] == sk for dk, sk in chosen):  # both exports timed the same implementations fastest
        assert art.report["exported"] == dense.report["exported"]
    sel = art.manifest["layers"]["mlp.0"]["selection"]["cpu"]
    assert sel["chosen"] in ("int8", "int8_fbgemm", "int8_dequant") and sel["measured"]["2:4+int8"]["available"] is False
    assert "no CPU kernel" in sel["why"] and "compressed form" in sel["why"]
    assert art.manifest["layers"]["mlp.0"]["bytes"] < dense.manifest["layers"]["mlp.0"]["bytes"]
    loaded = load(art.path, model=TinyCTR)
    assert isinstance(loaded.mlp[0], Sparse24Linear) and loaded.mlp[0].kernels == {"cpu": sel["op_kernel"]}
    torch.testing.assert_close(_outputs(loaded, val), _outputs(art.model, val), atol=0, rtol=0)


def test_program_pt2_round_trip_with_sparse_layers(tmp_path, pruned_qat):
    _, val = loaders()
    dense, ids, _ = next(iter(val))
    art = export(pruned_qat, tmp_path / "art", val_dataloader=val, max_drop=0.05, example_inputs=(dense, ids))
    assert art.manifest["layers"]["mlp.0"]["selection"]["cpu"]["input_shape"][0] == dense.shape[0]
    program = torch.export.load(str(tmp_path / "art" / "program.pt2"))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    # mlp.0 alone, or (both timed fastest on int_mm) chained with mlp.2 into one int8_mlp24 call
    chained = "chain" in art.manifest["layers"]["mlp.0"]
    assert ("hwaware.int8_mlp24.default" if chained else "hwaware.sparse24_linear.default") in targets
    torch.testing.assert_close(program.module()(dense, ids), art.model(dense, ids), atol=0, rtol=0)


def test_int8_2_4_layers_in_a_row_run_as_one_int8_mlp24_call(tmp_path, pruned_qat):
    """Pinned to int_mm, the two int8 2:4 layers (Linear, ReLU, Linear) chain as the int8 layers do:
    one int8_mlp24 call over the compressed weights, the ReLU in the first epilogue; the same bits
    as the layers in turn, in the export, the loaded model and program.pt2."""
    _, val = loaders()
    dense, ids, _ = next(iter(val))
    art = export(pruned_qat, tmp_path / "art", val_dataloader=val, max_drop=0.05, example_inputs=(dense, ids),
                 int8_impls=["int_mm"])
    layers = art.manifest["layers"]
    for name in ("mlp.0", "mlp.2"):
        assert layers[name]["scheme"] == "sparse24_int8" and layers[name]["chain"] == ["mlp.0", "mlp.2"]
        assert layers[name]["kernel"]["cpu"].startswith("hwaware::int8_mlp24 [cpu: int_mm, mlp.0 .. mlp.2")
    assert layers["mlp.0"]["selection"]["cpu"]["chain"]["op"] == "hwaware::int8_mlp24"
    loaded = load(art.path, model=TinyCTR)
    assert type(loaded.mlp) is Int8Chain and isinstance(loaded.mlp[0], Sparse24Linear)
    unchained = load(art.path, model=TinyCTR)
    unchained.mlp.__class__ = nn.Sequential
    torch.testing.assert_close(_outputs(loaded, val), _outputs(unchained, val), atol=0, rtol=0)
    torch.testing.assert_close(_outputs(loaded, val), _outputs(art.model, val), atol=0, rtol=0)
    program = torch.export.load(str(tmp_path / "art" / "program.pt2"))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "hwaware.int8_mlp24.default" in targets and "hwaware.sparse24_linear.default" not in targets
    torch.testing.assert_close(program.module()(dense, ids), loaded(dense, ids), atol=0, rtol=0)


def _rewrite(src, dst, edit_tensors=None, edit_manifest=None):
    """A consistent artifact (fresh hashes) with edited contents: only the 2:4 check can catch it."""
    manifest = read_manifest(src)
    tensors = read_tensors(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        edit_manifest(manifest)
    write_artifact(dst, {k: v for k, v in manifest.items() if k not in _ADDED_FIELDS}, tensors)


def test_loader_refuses_metadata_breaking_the_2_4_rule(tmp_path, pruned_qat):
    _, val = loaders()
    art = export(pruned_qat, tmp_path / "art", val_dataloader=val, max_drop=0.05)
    load(art.path, model=TinyCTR)  # the untouched artifact loads

    def break_meta(t):
        codes = torch.full((32, 3), 4, dtype=torch.uint8)
        codes[5, 1] = 5  # positions (1, 1): a repeated position
        t["mlp.0.metadata"] = pack_int4(codes)

    _rewrite(art.path, tmp_path / "bad", edit_tensors=break_meta)
    with pytest.raises(ArtifactError, match=r"layer 'mlp\.0'.*breaks the 2:4 rule: row 5, columns 4\.\.7"):
        load(tmp_path / "bad", model=TinyCTR)

    def bad_kernel(m):
        m["layers"]["mlp.0"]["kernels"] = {"cpu": "magic"}

    _rewrite(art.path, tmp_path / "bad2", edit_manifest=bad_kernel)
    with pytest.raises(ArtifactError, match=r"layer 'mlp\.0' names CPU kernel 'magic'"):
        load(tmp_path / "bad2", model=TinyCTR)

    def float_kernel(m):  # csr runs float values only: loaded, it failed at the first call
        m["layers"]["mlp.0"]["kernels"] = {"cpu": "csr"}

    _rewrite(art.path, tmp_path / "bad3", edit_manifest=float_kernel)
    with pytest.raises(ArtifactError, match=r"layer 'mlp\.0' names CPU kernel 'csr'; expected for int8 values one of "
                                            r"\['dense', 'fbgemm', 'dequant'\]"):
        load(tmp_path / "bad3", model=TinyCTR)


def test_cli_inspect_shows_the_kernel_selection(tmp_path, pruned_qat, capsys):
    from hwaware.cli import main

    _, val = loaders()
    art = export(pruned_qat, tmp_path / "art", val_dataloader=val, max_drop=0.05)
    assert main(["inspect", art.path]) == 0
    out = capsys.readouterr().out
    assert "sparse24_int8" in out and "kernel selection" in out
    assert "mlp.0 [cpu, input 32x12]:" in out and "int8 " in out and "2:4+int8 n/a" in out
    chosen = art.manifest["layers"]["mlp.0"]["selection"]["cpu"]["chosen"]
    assert chosen in ("int8", "int8_fbgemm", "int8_dequant") and f"-> {chosen}: 2:4+int8: no CPU kernel" in out


class _Attn(nn.Module):
    """nn.MultiheadAttention reads out_proj.weight itself (with ``add_zero_attn`` hwaware does not
    route it into layers); a 2:4 Linear called by keyword beside it."""

    def __init__(self, routable: bool = False):
        super().__init__()
        self.att = nn.MultiheadAttention(16, 2, batch_first=True, add_zero_attn=not routable)
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(input=self.att(x, x, x, need_weights=False)[0])


def test_layers_read_by_their_parent_stay_dense_and_keyword_calls_are_sized(tmp_path):
    from hwaware.sparsity import magnitude_mask_24

    torch.manual_seed(0)
    model = _Attn()
    with torch.no_grad():
        for lin in (model.att.out_proj, model.proj):
            lin.weight.mul_(magnitude_mask_24(lin.weight))
    x = torch.randn(3, 5, 16)
    art = export(model, tmp_path / "art", example_inputs=(x,))
    assert "att.out_proj" not in art.manifest["layers"]
    assert "never calls the layer" in art.manifest["dense_layers"]["att.out_proj"]
    assert "bare Parameter" in art.manifest["dense_layers"]["att.in_proj_weight"]
    assert art.manifest["layers"]["proj"]["selection"]["cpu"]["input_shape"] == [15, 16]  # [3, 5] rows of K=16
    torch.testing.assert_close(art.model(x), model(x), atol=0.05, rtol=0.05)  # int8 PTQ of proj
    # routable attention calls its projections: the 2:4 out_proj is packed compressed
    torch.manual_seed(0)
    model = _Attn(routable=True)
    with torch.no_grad():
        model.att.out_proj.weight.mul_(magnitude_mask_24(model.att.out_proj.weight))
    art = export(model, tmp_path / "routed", example_inputs=(x,))
    assert art.manifest["layers"]["att.out_proj"]["scheme"] == "sparse24_int8"
    assert art.manifest["layers"]["att.in_proj"]["scheme"] == "int8"
    torch.testing.assert_close(art.model(x), model(x), atol=0.05, rtol=0.05)


def test_time_us_gives_up_on_a_hopeless_candidate():
    from hwaware.export.selection import time_us

    calls = []

    def slow():
        calls.append(1)
        import time
        time.sleep(0.01)

    us = time_us(slow, give_up_us=1000.0)
    assert us > 1000.0 and len(calls) == 3  # one untimed (cache-building) call, two timed, then stop
    calls.clear()
    time_us(slow, budget_s=0.0, min_runs=3, give_up_us=1e9)
    assert len(calls) == 4  # the untimed call + 3 timed runs (the first also the give-up check)


def test_time_us_does_not_give_up_on_one_run_delayed_by_the_scheduler():
    # a fast kernel whose first timed run was descheduled (a busy machine): timed in full, and the
    # result is its own cost, not the delay
    import time

    from hwaware.export.selection import time_us

    calls = []

    def kernel():
        calls.append(1)
        time.sleep(0.02 if len(calls) == 2 else 0.0005)

    us = time_us(kernel, give_up_us=5000.0, budget_s=0.0, min_runs=5)
    assert len(calls) == 1 + 5 and us < 5000.0


def test_a_candidate_delayed_in_both_first_runs_is_still_timed_in_full():
    # ~100 us kernels on a busy machine: the candidate's first two runs each wait ~20 ms at an OpenMP
    # barrier (20x the fastest so far, 2 ms, is not enough to give up): timed in full, its own cost wins
    import time

    from hwaware.export.selection import GIVE_UP_FLOOR_US, _timed

    calls = []

    def kernel():
        calls.append(1)
        time.sleep(0.02 if len(calls) in (2, 3) else 0.0001)

    rec = _timed(kernel, "int_mm", {"dequant": {"available": True, "us": 100.0}})
    assert rec["us"] < 2000 and "timed twice" not in rec["note"] and len(calls) > 3
    calls.clear()
    # a hopeless one (each run over the floor too) still gives up after two runs
    rec = _timed(lambda: (calls.append(1), time.sleep(GIVE_UP_FLOOR_US * 1.2e-6)), "dequant",
                 {"int_mm": {"available": True, "us": 100.0}})
    assert len(calls) == 3 and "timed twice" in rec["note"]
