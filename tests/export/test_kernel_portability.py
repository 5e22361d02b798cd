"""An artifact served on another CPU: export records the CPU its kernels were timed on and gates every
int8 implementation on its own; load warns when this CPU lacks what that one had, and
``kernels="measure"`` re-times the layers here among the implementations that passed the gate."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from hwaware.export import KernelPortabilityWarning, export, load
from hwaware.export import exporter
from hwaware.export.deploy import Int8Linear
from hwaware.export.exporter import _evaluate
from hwaware.export.selection import cpu_profile, lost_features
from hwaware.ops import INT8_KERNELS
from tests.helpers import TinyCTR, loaders, train_with_quant

EXPORT_CPU = {"model": "Export Xeon", "isa": ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"], "amx_in_use": True}
AVX2_CPU = {"model": "Old box", "isa": ["avx2", "fma"], "amx_in_use": False}


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    _, model, _ = train_with_quant(tmp_path_factory.mktemp("qat"), max_epochs=3, start_epoch=1, calibration_batches=2)
    return model


@pytest.fixture(scope="module")
def art(qat, tmp_path_factory):
    _, val = loaders()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(exporter, "cpu_profile", lambda: dict(EXPORT_CPU))
        return export(qat, tmp_path_factory.mktemp("art") / "a", val_dataloader=val, max_drop=0.05)


def _outputs(module, loader):
    with torch.no_grad():
        return torch.cat([module.predict_step(b, 0) for b in loader])


def test_the_manifest_records_the_cpu_and_a_gate_per_implementation(art):
    _, val = loaders()
    m = art.manifest
    assert m["selection_cpu"] == EXPORT_CPU
    by_impl = m["regression"]["by_impl"]
    assert set(by_impl) == set(INT8_KERNELS["cpu"])
    int8 = [mod for mod in art.model.modules() if isinstance(mod, Int8Linear)]
    chosen = [dict(mod.kernels) for mod in int8]
    ref = m["regression"]["reference"]
    for impl, rec in by_impl.items():  # each is the metric with every int8 layer on that implementation
        for mod in int8:
            mod.kernels["cpu"] = impl
        value = _evaluate(art.model, val, "auroc", None)
        assert rec["exported"] == value and rec["drop"] == ref - value
        assert rec["passed"] == (ref - value <= m["regression"]["max_drop"])
    for mod, k in zip(int8, chosen):  # the gate restored export's choice
        mod.kernels.clear()
        mod.kernels.update(k)
    assert [dict(mod.kernels) for mod in int8] == [{"cpu": meta["kernels"]["cpu"]} for name, meta in m["layers"].items()
                                                  if meta["module"] == "Int8Linear"]
    # a uniform configuration that is export's own choice is the gated value itself
    for impl, rec in by_impl.items():
        if all(k["cpu"] == impl for k in chosen):
            assert rec["exported"] == m["regression"]["exported"]


def test_a_cpu_without_what_export_timed_on_gets_a_warning(art, monkeypatch):
    assert lost_features(EXPORT_CPU, AVX2_CPU) == ["avx512f", "avx512_vnni", "amx_tile", "amx_int8", "hwaware AMX pass"]
    monkeypatch.setattr(exporter, "cpu_profile", lambda: dict(AVX2_CPU))
    integer = [n for n, meta in art.manifest["layers"].items() if "selection" in meta and exporter._runs_integer_kernel(meta)]
    if integer:
        with pytest.warns(KernelPortabilityWarning, match=rf"Export Xeon.*avx512f.*amx_int8.*; this CPU lacks them: the "
                                                          rf"integer kernel recorded for {len(integer)} layer.*kernels='measure'"):
            load(art.path, model=TinyCTR)
    # which layers it names: those on integer kernels, not those whose choice was float math
    manifest = copy.deepcopy(art.manifest)
    timed = [n for n, meta in manifest["layers"].items() if "selection" in meta]
    assert len(timed) >= 2
    for i, name in enumerate(timed):
        manifest["layers"][name]["kernels"]["cpu"] = "dequant" if i == 0 else "int_mm"
    with pytest.warns(KernelPortabilityWarning) as caught:
        exporter._portability_warning(manifest, "p")
    text = str(caught[0].message)
    assert f"{len(timed) - 1} layer(s)" in text and timed[1] in text and f"({timed[0]}" not in text
    for name in timed:
        manifest["layers"][name]["kernels"]["cpu"] = "dequant"
    with warnings.catch_warnings():  # float math everywhere: nothing a lost instruction set slows
        warnings.simplefilter("error", KernelPortabilityWarning)
        exporter._portability_warning(manifest, "p")
    # 2:4 int8 layers: "dense" is int_mm's math on the codes, fbgemm too; float 2:4 is float math
    for scheme, kernel, integer_kernel in (("sparse24_int8", "dense", True), ("sparse24_int8", "fbgemm", True),
                                           ("sparse24_int8", "dequant", False), ("sparse24", "dense", False),
                                           ("int8", "auto", True), ("int8", "fbgemm", True), ("int4", "auto", False)):
        assert exporter._runs_integer_kernel({"scheme": scheme, "kernels": {"cpu": kernel}}) is integer_kernel
    # the same CPU, or one with more: nothing to warn about
    for here in (EXPORT_CPU, {**EXPORT_CPU, "isa": EXPORT_CPU["isa"] + ["avx512_bf16"]}):
        monkeypatch.setattr(exporter, "cpu_profile", lambda here=here: dict(here))
        with warnings.catch_warnings():
            warnings.simplefilter("error", KernelPortabilityWarning)
            load(art.path, model=TinyCTR)


def test_measure_re_times_on_this_cpu_and_serves_the_same_bits_as_that_choice(art):
    _, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelPortabilityWarning)  # measuring here: no portability warning
        model = load(art.path, model=TinyCTR, kernels="measure")
    sel = model.hwaware_selection
    timed = {n for n, meta in art.manifest["layers"].items() if "selection" in meta}
    assert set(sel) == timed and timed
    passed = [i for i, r in art.manifest["regression"]["by_impl"].items() if r["passed"]]
    for name, rec in sel.items():
        layer = model.get_submodule(name)
        assert layer.kernels["cpu"] == rec["chosen"] and rec["chosen"] in passed
        assert rec["input_shape"] == art.manifest["layers"][name]["selection"]["cpu"]["input_shape"]
        assert rec["recorded"] == art.manifest["layers"][name]["kernels"]["cpu"] and rec["measured_on"] == cpu_profile()
        assert set(rec["measured"]) == set(passed)
        art.model.get_submodule(name).kernels["cpu"] = rec["chosen"]
    try:  # the re-timed model is the in-memory deploy model on the same kernels, bit for bit
        torch.testing.assert_close(_outputs(model, val), _outputs(art.model, val), atol=0, rtol=0)
    finally:
        for name in sel:
            art.model.get_submodule(name).kernels["cpu"] = art.manifest["layers"][name]["kernels"]["cpu"]


def _manifest(art, by_impl):
    m = copy.deepcopy(art.manifest)
    if by_impl is None:
        m["regression"].pop("by_impl")
    else:
        for impl, ok in by_impl.items():
            m["regression"]["by_impl"][impl]["passed"] = ok
    return m


def test_measure_chooses_only_implementations_that_passed_the_gate(art):
    model = load(art.path, model=TinyCTR)
    m = _manifest(art, {"int_mm": False, "fbgemm": False, "dequant": True})
    sel = exporter._remeasure(model, m, art.path)
    for name, rec in sel.items():
        assert rec["chosen"] == "dequant" and model.get_submodule(name).kernels["cpu"] == "dequant"
        assert {c for c, e in rec["measured"].items() if e["available"]} == {"dequant"} and "['dequant']" in rec["allowed"]
        assert all("not allowed: its regression gate did not pass" in rec["measured"][c]["note"] for c in ("int_mm", "fbgemm"))


def test_measure_keeps_the_recorded_kernels_when_no_implementation_passed_alone(art):
    model = load(art.path, model=TinyCTR)
    with pytest.warns(KernelPortabilityWarning, match="keep their recorded kernels"):
        sel = exporter._remeasure(model, _manifest(art, {i: False for i in INT8_KERNELS["cpu"]}), art.path)
    assert sel == {}
    for name, meta in art.manifest["layers"].items():
        if meta["module"] == "Int8Linear":
            assert model.get_submodule(name).kernels["cpu"] == meta["kernels"]["cpu"]


def test_measure_on_an_artifact_without_a_gate_per_implementation_says_so(art):
    model = load(art.path, model=TinyCTR)
    sel = exporter._remeasure(model, _manifest(art, None), art.path)
    assert sel and all(set(r["measured"]) == set(INT8_KERNELS["cpu"]) for r in sel.values())
    assert all("no per-implementation gate" in r["allowed"] for r in sel.values())
    json.dumps(sel)  # records are plain JSON, as the manifest's


def test_bad_kernels_argument(art):
    with pytest.raises(ValueError, match="kernels='fastest'.*'recorded'.*'measure'"):
        load(art.path, kernels="fastest")


def test_unreadable_cpu_flags_are_not_lost_features(art, monkeypatch):
    # a CPU whose flags cannot be read (no /proc/cpuinfo): nothing to compare, no warning about ISAs
    import builtins

    real_open = builtins.open

    def no_cpuinfo(file, *a, **k):
        if str(file) == "/proc/cpuinfo":
            raise OSError("hidden")
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    here = cpu_profile()
    assert here["isa"] is None
    assert lost_features(EXPORT_CPU, {**here, "amx_in_use": True, "int8_engine": "amx"}) == []
    assert lost_features(EXPORT_CPU, here, amx_matters=False) == []


def test_the_amx_pass_matters_only_where_a_layer_runs_int_mm():
    assert lost_features(EXPORT_CPU, {**EXPORT_CPU, "amx_in_use": False}) == ["hwaware AMX pass"]
    assert lost_features(EXPORT_CPU, {**EXPORT_CPU, "amx_in_use": False}, amx_matters=False) == []


def test_an_int8_pass_on_a_slower_engine_is_lost_and_a_faster_one_is_not():
    amx, vnni = {**EXPORT_CPU, "int8_engine": "amx"}, {**EXPORT_CPU, "amx_in_use": False, "int8_engine": "vnni"}
    none = {**EXPORT_CPU, "amx_in_use": False, "int8_engine": None}
    madd = {**EXPORT_CPU, "amx_in_use": False, "int8_engine": "vpmaddwd"}
    assert lost_features(amx, vnni) == lost_features(amx, none) == lost_features(amx, madd) == ["hwaware AMX pass"]
    assert lost_features(vnni, none) == lost_features(vnni, madd) == ["hwaware VNNI pass"]
    assert lost_features(madd, none) == ["hwaware VPMADDWD pass"]
    assert lost_features(vnni, amx) == lost_features(vnni, vnni) == lost_features(none, none) == []
    assert lost_features(madd, vnni) == lost_features(madd, madd) == lost_features(none, madd) == []
    # an artifact from before the VNNI engine: amx_in_use False says nothing about VNNI
    old = {k: v for k, v in vnni.items() if k != "int8_engine"}
    assert lost_features(old, none) == []
    assert lost_features(EXPORT_CPU, vnni) == ["hwaware AMX pass"]


def test_a_malformed_selection_cpu_is_an_artifact_error(tmp_path):
    from hwaware.export import ArtifactError
    from hwaware.export.exporter import _portability_warning

    for bad in ({"isa": "avx2 fma"}, {"isa": [1, 2]}, "xeon", {"isa": ["avx2"], "int8_engine": "gpu"}):
        manifest = {"layers": {}, "selection_cpu": bad}
        with pytest.raises(ArtifactError, match="selection_cpu"):
            _portability_warning(manifest, "p")
    with pytest.raises(ArtifactError, match="selection"):
        _portability_warning({"layers": {"mlp.0": {"selection": "x"}}, "selection_cpu": EXPORT_CPU}, "p")


def test_measure_leaves_out_implementations_this_hwaware_does_not_know(art):
    model = load(art.path, model=TinyCTR)
    m = copy.deepcopy(art.manifest)
    m["regression"]["by_impl"] = {"onednn": {"passed": True}, "int_mm": {"passed": False}}
    with pytest.warns(KernelPortabilityWarning, match="keep their recorded kernels"):
        assert exporter._remeasure(model, m, art.path) == {}


def test_measure_keeps_no_derived_weights_of_the_candidates_it_timed(art):
    from hwaware.ops import _CACHE, clear_cache

    clear_cache()
    model = load(art.path, model=TinyCTR, kernels="measure")
    mine = {id(t) for t in model.buffers()}
    assert not any(any(r() is not None and id(r()) in mine for r in refs) for refs, *_ in _CACHE._entries.values())
    _, val = loaders()
    _outputs(model, val)  # the chosen kernels build what they use on their first call


def test_a_pass_this_process_does_not_run_on_the_same_cpu_names_the_cause(art, monkeypatch):
    # "this CPU lacks it" was said on the export machine itself, with the C library off or not loadable
    manifest = copy.deepcopy(art.manifest)
    manifest["selection_cpu"] = {**EXPORT_CPU, "int8_engine": "amx"}
    timed = [n for n, meta in manifest["layers"].items() if "selection" in meta]
    for name in timed:
        manifest["layers"][name]["kernels"]["cpu"] = "int_mm"
        manifest["layers"][name]["selection"]["cpu"]["chosen"] = "int_mm"
    here = {**EXPORT_CPU, "amx_in_use": False, "int8_engine": None}
    monkeypatch.setattr(exporter, "cpu_profile", lambda: dict(here))
    monkeypatch.setattr(exporter.native, "native_status", lambda: "disabled by HWAWARE_NO_NATIVE")
    with pytest.warns(KernelPortabilityWarning, match=r"timed with hwaware AMX pass \(on 'Export Xeon'\), which this process "
                                                      r"does not run: hwaware's C library is not in use \(disabled by "
                                                      r"HWAWARE_NO_NATIVE\)\. The integer kernel"):
        exporter._portability_warning(manifest, "p")
    monkeypatch.setattr(exporter.native, "native_status", lambda: "loaded /x/lib.so")
    monkeypatch.setenv("HWAWARE_NO_AMX", "1")
    with pytest.warns(KernelPortabilityWarning, match=r"which this process does not run: HWAWARE_NO_AMX is set"):
        exporter._portability_warning(manifest, "p")
    monkeypatch.delenv("HWAWARE_NO_AMX")
    with pytest.warns(KernelPortabilityWarning, match=r"this CPU lacks it"):  # loaded, not turned off: the CPU / OS
        exporter._portability_warning(manifest, "p")
