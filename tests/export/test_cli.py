"""``hwaware inspect``: verified table output, --json, and exit status 2 on a refused artifact."""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from hwaware.cli import main
from hwaware.export import artifact_size_bytes, read_manifest, write_artifact
from tests.helpers import TinyCTR

MANIFEST = {
    "layers": {
        "bot_mlp.0": {"scheme": "w8a8", "shape": [64, 13], "bytes": 896, "kernel": {"cpu": "int8_mm", "cuda": "w8_triton"}},
        "emb.0": {"scheme": "w4g32", "shape": [1000, 16], "group_size": 32, "bytes": 9000, "speedup_cpu": 1.8},
        "top_mlp.1": {"scheme": "fp32"},  # missing keys are tolerated
    },
    "fp32_bytes": 80000,
    "program": {"batch_range": [[2, None], [5, 5], None]},
    "regression": {"metric": "auroc", "reference": 0.8012, "exported": 0.7998, "drop": 0.0014,
                   "max_drop": 0.003, "passed": True},
}


@pytest.fixture
def art(tmp_path):
    path = tmp_path / "ctr-int8"
    write_artifact(path, MANIFEST, {"w": torch.zeros(8, dtype=torch.int8)})
    return path


def test_inspect_prints_layers_totals_and_regression(art, capsys):
    assert main(["inspect", str(art)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for name in MANIFEST["layers"]:
        assert name in out
    assert "w8a8" in out and "64x13" in out and "cpu=int8_mm,cuda=w8_triton" in out
    assert "group_size" in out and "1.8" not in out  # the main columns; other fields named below the table
    assert "more per-layer fields (--wide shows them, --json gives the manifest): speedup_cpu" in out
    assert f"({artifact_size_bytes(art)} bytes)" in out and "fp32" in out and "(80000 bytes)" in out
    assert "program.pt2: batch per input 2..any, 5..5, -" in out
    reg = [line for line in out.splitlines() if line.startswith("regression:")]
    assert reg == ["regression: auroc reference 0.8012 exported 0.7998 drop 0.0014 (max_drop 0.003): PASSED"]


def test_inspect_wide_shows_every_layer_field_and_the_default_fits_a_terminal(art, capsys, tmp_path):
    assert main(["inspect", str(art), "--wide"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    assert header.split() == ["layer", "scheme", "shape", "group_size", "bytes", "kernel", "speedup_cpu"]
    assert "1.8" in out and "more per-layer fields" not in out
    # a real export's manifest (kernel descriptions, activation sentences, kernel selection): every line
    # of the default view within 120 columns
    from hwaware.export import export
    from tests.helpers import TinyCTR

    torch.manual_seed(0)
    art = export(TinyCTR(), tmp_path / "real", example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    assert main(["inspect", art.path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)


def test_inspect_names_files_that_are_not_part_of_the_artifact(art, capsys):
    (art / "README.txt").write_text("ours")
    assert main(["inspect", str(art)]) == 0
    out = capsys.readouterr().out
    assert "not part of the artifact (unlisted in the manifest; never read, not counted): README.txt" in out
    assert f"({artifact_size_bytes(art)} bytes)" in out and artifact_size_bytes(art) == sum(
        os.path.getsize(art / n) for n in ("manifest.json", "weights.safetensors"))


def test_inspect_tolerates_a_bare_manifest(tmp_path, capsys):
    path = tmp_path / "bare"
    write_artifact(path, {}, {"w": torch.ones(2)})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "regression: not measured" in out and "total:" in out and "fp32" not in out


def test_inspect_lists_layers_with_numbers_read_as_numbers(tmp_path, capsys):
    """The manifest's keys are sorted as strings: emb.1, emb.10, emb.11, ..., emb.2 in the table."""
    path = tmp_path / "many"
    layers = {f"emb.{i}": {"scheme": "rowwise_int8", "bytes": 8} for i in (10, 2, 1, 11)}
    write_artifact(path, {"layers": layers, "dense_layers": {"mlp.10": "kept", "mlp.9": "kept"}}, {"w": torch.ones(2)})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    at = [out.index(f"emb.{i} ") for i in (1, 2, 10, 11)]
    assert at == sorted(at) and out.index("mlp.9:") < out.index("mlp.10:")


def test_inspect_json_prints_the_verified_manifest(art, capsys):
    assert main(["inspect", str(art), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_manifest(art)


def test_inspect_refuses_tampered_artifact_with_exit_2(art, capsys):
    w = art / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    assert main(["inspect", str(art)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("hwaware: error: ") and "weights.safetensors: corrupted or tampered" in err


def test_inspect_refuses_missing_path(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "nope: no such artifact" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--batch-size", "0", "argument --batch-size: 0 is invalid; expected an integer >= 1"),
    ("--batches", "-1", "argument --batches: -1 is invalid; expected an integer >= 1"),
    ("--rounds", "0", "argument --rounds: 0 is invalid; expected an integer >= 1"),
    ("--rounds", "x", "argument --rounds: 'x' is not an integer; expected an integer >= 1"),
])
def test_bench_bad_numbers_are_usage_errors(art, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(art), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"hwaware bench: error: {message}" and "Traceback" not in err


def test_inspect_shortens_long_table_cells_and_gives_them_once_below(tmp_path, capsys):
    long = "cpu=hwaware::embedding_bags_rowwise [cpu: " + "a long description of the kernel " * 8 + "]"
    manifest = {"layers": {f"emb.{i}": {"scheme": "rowwise_int8", "kernel": long} for i in range(3)}}
    path = tmp_path / "a"
    write_artifact(path, manifest, {"w": torch.zeros(8, dtype=torch.int8)})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("layer"):out.index("[1] ") ]
    assert max(len(line) for line in table.splitlines()) < 120
    assert "cpu=hwaware::embedding_bags_rowwise [1]" in table  # shortened at its " [" (else cut with "...")
    assert out.count("[1] cpu=hwaware::embedding_bags_rowwise") == 1  # the full text once, wrapped
    assert " ".join(out[out.index("[1] cpu="):].split()).startswith(" ".join(f"[1] {long}".split()))
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"]["emb.0"]["kernel"] == long


def test_bench_times_artifact_against_fp32(tmp_path, capsys):
    import json as _json

    import torch

    from hwaware.export import export
    from tests.helpers import TinyCTR

    torch.manual_seed(0)
    art = export(TinyCTR(), tmp_path / "tiny", example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    assert art.manifest["inputs"][1] == {"shape": [8], "dtype": "int64", "max": [int(art.manifest["inputs"][1]["max"][0])]}
    out = tmp_path / "bench.json"
    assert main(["bench", art.path, "--model", "tests.helpers:TinyCTR", "--batch-size", "16", "--batches", "2", "--rounds", "1", "--json", str(out)]) == 0
    r = _json.loads(out.read_text())
    assert set(r["models"]) == {"fp32", "artifact"} and r["models"]["fp32"]["ratio"] == 1.0
    assert r["models"]["artifact"]["samples_per_s"] > 0 and r["batch_size"] == 16
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "batch size 16: 2 batches x 1 rounds per model" in printed
    assert "warning: one round: the ratio is one measurement" in printed
    if os.path.exists("/proc/self/clear_refs"):
        for name in ("fp32", "artifact"):
            m = r["memory"][name]
            assert 0 <= m["model_resident_mib"] <= m["peak_mib"] <= m["process_peak_mib"]
            assert f"{name:10s} peak memory" in printed
    assert main(["bench", art.path, "--model", "tests.helpers:TinyCTR", "--batch-size", "4", "--batches", "1", "--rounds", "1", "--no-memory", "--json", str(out)]) == 0
    assert "memory" not in _json.loads(out.read_text())
    capsys.readouterr()
    for flag in (["--json"], ["--json", "-"]):  # JSON alone on stdout, the readable lines on stderr (no file named -)
        assert main(["bench", art.path, "--model", "tests.helpers:TinyCTR", "--batch-size", "4", "--batches", "1", "--rounds", "1", "--no-memory", *flag]) == 0
        captured = capsys.readouterr()
        assert _json.loads(captured.out)["batch_size"] == 4 and "samples/s" in captured.err
    assert not os.path.exists("-")


class ChattyCTR(TinyCTR):
    """Prints on every call, without a newline (progress dots): the memory probe's stdout is shared."""

    def forward(self, dense, ids):
        print(".", end="", flush=True)
        return super().forward(dense, ids)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read from Linux /proc")
def test_the_memory_probe_reads_its_result_whatever_the_model_prints(tmp_path):
    import torch

    from hwaware.export import export
    from hwaware.export.memory import peak_memory

    torch.manual_seed(0)
    art = export(TinyCTR(), tmp_path / "a", example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    for which in ("fp32", "artifact"):  # the last dot and the result shared a line, which did not parse
        assert peak_memory(art.path, which, 8, 2, model="tests.export.test_cli:ChattyCTR")["peak_mib"] >= 0


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read from Linux /proc")
def test_bench_memory_shows_the_artifact_serving_in_less_memory_than_fp32(tmp_path):
    """A 64 MB FP32 table is 24 MB of int8 rows: serving the artifact must peak lower than FP32, each
    measured in its own process (hwaware.export.memory)."""
    import torch

    from hwaware.export import export
    from hwaware.export.memory import peak_memory
    from tests.helpers import TinyCTR

    torch.manual_seed(0)
    art = export(TinyCTR(vocab=1_000_000, dim=16), tmp_path / "big", example_inputs=(torch.randn(8, 4), torch.randint(0, 1000, (8,))))
    fp32, served = (peak_memory(art.path, which, 64, 2, model="tests.helpers:TinyCTR") for which in ("fp32", "artifact"))
    weights_mib = os.path.getsize(os.path.join(art.path, "weights.safetensors")) / 2**20  # 22.9: 1M rows of 16 + 8 bytes
    assert fp32["model_resident_mib"] > 55 and 20 < served["model_resident_mib"] < 40
    assert served["model_resident_mib"] < fp32["model_resident_mib"] - 20
    # loading holds at most one extra copy of the weights (the file's bytes while they become the
    # model's tensors): its peak, ~46 MiB, sat right at the "20 MiB under FP32's peak" this test
    # once asserted, and failed it now and then
    assert served["load_peak_mib"] <= 2 * weights_mib + 4
    assert served["peak_mib"] < fp32["peak_mib"] - 10
    with pytest.raises(ValueError, match=r"which='gpu'; expected 'artifact' or 'fp32'"):
        peak_memory(art.path, "gpu", 4, 1)


def test_bench_needs_recorded_inputs(tmp_path, capsys):
    from hwaware.export import export
    from tests.helpers import TinyCTR

    art = export(TinyCTR(), tmp_path / "noinputs")
    assert main(["bench", art.path, "--model", "tests.helpers:TinyCTR"]) == 2
    assert "records no example inputs" in capsys.readouterr().err


def test_inspect_lists_the_layers_left_dense_with_their_reasons(tmp_path, capsys):
    manifest = {**MANIFEST, "dense_layers": {"c1": "no hwaware conv op yet: runs dense"}}
    write_artifact(tmp_path / "a", manifest, {"w": torch.zeros(8, dtype=torch.int8)})
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "left dense (1):" in out and "  c1: no hwaware conv op yet: runs dense" in out


def test_inspect_shows_what_the_export_cost_against_the_final_weights(tmp_path, capsys):
    reg = {**MANIFEST["regression"], "final_weights_fp32": 0.8021, "quantization_drop": 0.0023}
    write_artifact(tmp_path / "a", {**MANIFEST, "regression": reg}, {"w": torch.zeros(8, dtype=torch.int8)})
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert "final weights with quantization off 0.8021: the export costs 0.0023 of them (not gated)" in capsys.readouterr().out


def test_bench_of_a_model_class_not_hwawares_asks_for_it_by_name(tmp_path, capsys):
    """bench builds the FP32 reference from the recorded class: only hwaware's own unless named, since
    building a class runs its constructor with the manifest's (editable) hparams."""
    from hwaware.export import export
    from tests.helpers import TinyCTR

    art = export(TinyCTR(), tmp_path / "a", example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    assert main(["bench", art.path, "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert "model class 'tests.helpers.TinyCTR' is not one of hwaware's" in err
    assert f"hwaware bench {art.path} --model module:Class" in err
    assert main(["bench", art.path, "--model", "no_such_mod:TinyCTR", "--no-memory"]) == 2
    assert "module 'no_such_mod' is not importable here" in capsys.readouterr().err


def test_bench_reports_a_failed_memory_probe_and_keeps_the_timing(tmp_path, capsys, monkeypatch):
    import json as _json

    import hwaware.export.memory as memory
    from hwaware.export import export
    from tests.helpers import TinyCTR

    art = export(TinyCTR(), tmp_path / "tiny", example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))

    def fail(*a, **k):
        raise RuntimeError("memory probe of fp32 failed (exit 1): ModuleNotFoundError: No module named 'mymodels'")
    monkeypatch.setattr(memory, "peak_memory", fail)
    out = tmp_path / "bench.json"
    assert main(["bench", art.path, "--model", "tests.helpers:TinyCTR", "--batch-size", "4", "--batches", "1", "--rounds", "1", "--json", str(out)]) == 0
    r = _json.loads(out.read_text())
    assert r["models"]["artifact"]["samples_per_s"] > 0 and "No module named 'mymodels'" in r["memory"]["fp32"]["error"]
    assert "peak memory: n/a (the probe process failed: " in capsys.readouterr().out


def test_inspect_shows_the_gate_per_implementation_and_where_kernels_were_timed(tmp_path, capsys, monkeypatch):
    from hwaware.export import selection

    manifest = {**MANIFEST, "regression": {**MANIFEST["regression"], "by_impl": {
        "int_mm": {"exported": 0.7998, "drop": 0.0014, "passed": True},
        "fbgemm": {"exported": 0.7971, "drop": 0.0041, "passed": False}}},
        "selection_cpu": {"model": "Export Xeon", "isa": ["avx2", "amx_int8"], "amx_in_use": True}}
    write_artifact(tmp_path / "a", manifest, {"w": torch.zeros(8, dtype=torch.int8)})
    monkeypatch.setattr(selection, "cpu_profile", lambda: {"model": "here", "isa": ["avx2"], "amx_in_use": False})
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # long lines are wrapped at 110 columns
    assert ("every int8 layer on one implementation: fbgemm 0.7971 (drop 0.0041, FAILED), "
            "int_mm 0.7998 (drop 0.0014, passed)") in out  # the manifest's key order
    assert "kernels timed on: Export Xeon (avx2 amx_int8; hwaware int8 pass: AMX tiles)" in out  # older: amx_in_use only
    assert "this CPU lacks amx_int8, hwaware AMX pass" in out and "--kernels measure" in out
    monkeypatch.setattr(selection, "cpu_profile", lambda: {"model": "same", "isa": ["avx2", "amx_int8"], "amx_in_use": True,
                                                          "int8_engine": "amx"})
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert "this CPU lacks" not in capsys.readouterr().out
    manifest["selection_cpu"] = {"model": "Zen 4", "isa": ["avx2", "avx512_vnni"], "amx_in_use": False, "int8_engine": "vnni"}
    write_artifact(tmp_path / "b", manifest, {"w": torch.zeros(8, dtype=torch.int8)})
    monkeypatch.setattr(selection, "cpu_profile", lambda: {"model": "old", "isa": ["avx2"], "amx_in_use": False,
                                                          "int8_engine": None})
    assert main(["inspect", str(tmp_path / "b")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "kernels timed on: Zen 4 (avx2 avx512_vnni; hwaware int8 pass: VNNI)" in out
    assert "this CPU lacks avx512_vnni, hwaware VNNI pass" in out


def test_bench_can_re_time_the_kernels_on_this_cpu(tmp_path, capsys):
    from hwaware.export import export
    from tests.helpers import TinyCTR, loaders

    torch.manual_seed(0)
    _, val = loaders()
    art = export(TinyCTR(), tmp_path / "tiny", val_dataloader=val, max_drop=0.05,
                 example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    out = tmp_path / "bench.json"
    assert main(["bench", art.path, "--model", "tests.helpers:TinyCTR", "--batch-size", "8", "--batches", "1", "--rounds", "1", "--no-memory",
                 "--kernels", "measure", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["kernels"] == "measure" and set(r["selection"]) == {"mlp.0", "mlp.2"}
    assert all(rec["chosen"] in art.manifest["regression"]["by_impl"] for rec in r["selection"].values())
    assert "kernels re-timed on this CPU: mlp.0 " in capsys.readouterr().out


def test_inspect_gives_the_share_of_fp32_without_the_program_s_copy_of_the_weights(tmp_path, capsys):
    from hwaware.export import export
    from tests.helpers import TinyCTR

    torch.manual_seed(0)
    art = export(TinyCTR(), tmp_path / "tiny", example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    assert main(["inspect", art.path]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("  without program.pt2"))
    assert f"{art.size_bytes / art.manifest['fp32_bytes']:.1%} of fp32" in line


class OffsetsBag(torch.nn.Module):
    """A model whose inputs are not one row per sample: flat ids plus bag offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(50, 8, mode="sum")
        self.head = torch.nn.Linear(8, 1)

    def forward(self, ids, offsets):
        return self.head(self.emb(ids, offsets)).squeeze(-1)


def test_bench_says_what_to_do_for_inputs_it_cannot_generate_and_refuses_a_bad_json_path_first(tmp_path, capsys):
    from hwaware.export import export

    torch.manual_seed(0)
    ids, offsets = torch.randint(0, 50, (12,)), torch.tensor([0, 3, 5, 9])
    art = export(OffsetsBag(), tmp_path / "bag", example_inputs=(ids, offsets))
    assert main(["bench", art.path, "--model", "tests.export.test_cli:OffsetsBag", "--batch-size", "8", "--batches", "1", "--rounds", "1", "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert "hwaware bench: error: the fp32 model refused the inputs bench generated from the recorded example shapes (12, 4" in err
    assert "pass --inputs FILE.safetensors (tensors '0', '1', ... in forward's order)" in err and "Traceback" not in err
    missing = tmp_path / "no" / "such" / "dir" / "b.json"
    assert main(["bench", art.path, "--model", "tests.export.test_cli:OffsetsBag", "--json", str(missing)]) == 2  # before any timing
    assert f"--json {missing}: {missing.parent} is not a directory (create it first)" in capsys.readouterr().err


def test_bench_times_a_batch_of_the_users_own_with_inputs(tmp_path, capsys):
    """ids + offsets cannot be generated from the recorded shapes: --inputs gives bench the batch."""
    from safetensors.torch import save_file

    from hwaware.export import export

    torch.manual_seed(0)
    ids, offsets = torch.randint(0, 50, (12,)), torch.tensor([0, 3, 5, 9])
    art = export(OffsetsBag(), tmp_path / "bag", example_inputs=(ids, offsets))
    batch = tmp_path / "batch.safetensors"
    save_file({"0": torch.randint(0, 50, (300,)), "1": torch.arange(0, 300, 3)}, str(batch))  # 100 bags
    out_json = tmp_path / "b.json"
    assert main(["bench", art.path, "--model", "tests.export.test_cli:OffsetsBag", "--inputs", str(batch), "--batches", "2", "--rounds", "1",
                 "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    # the samples: 100 bags, the rows of the model's output (it counted the 300 ids, so samples/s came
    # out 3x too high), unless --batch-size says otherwise
    assert result["batch_size"] == 100
    assert "batch size 100 (the rows of the FP32 model's output on the batch; --batch-size N says otherwise)" in capsys.readouterr().out
    assert set(result["models"]) == {"fp32", "artifact"} and all("peak_mib" in result["memory"][m] for m in ("fp32", "artifact")), result["memory"]
    assert main(["bench", art.path, "--model", "tests.export.test_cli:OffsetsBag", "--inputs", str(batch), "--batch-size", "50", "--batches", "1", "--rounds", "1",
                 "--no-memory", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["batch_size"] == 50
    capsys.readouterr()
    save_file({"ids": torch.zeros(3, dtype=torch.long)}, str(batch))
    assert main(["bench", art.path, "--model", "tests.export.test_cli:OffsetsBag", "--inputs", str(batch), "--no-memory"]) == 2
    assert "holds tensors named ['ids']; expected '0', '1', ..." in capsys.readouterr().err
    batch.write_bytes(b"not safetensors")
    assert main(["bench", art.path, "--model", "tests.export.test_cli:OffsetsBag", "--inputs", str(batch), "--no-memory"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_bench_refuses_a_batch_whose_inputs_cannot_fit_in_memory(tmp_path, capsys):
    """--batch-size 100000000 was killed by the OOM killer with no message (exit 137)."""
    import torch

    from hwaware.export import export
    from tests.helpers import TinyCTR

    art = export(TinyCTR(), tmp_path / "tiny", example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("available memory is read from Linux /proc/meminfo")
    assert main(["bench", art.path, "--model", "tests.helpers:TinyCTR", "--batch-size", str(10**11), "--no-memory"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the generated inputs alone would take" in err[0] and "pass a smaller --batch-size" in err[0]


@pytest.mark.parametrize("edit", [
    lambda m: m["layers"]["bot_mlp.0"].update(selection={"cpu": {"measured": {"int_mm": {"available": True, "us": None}}}}),
    lambda m: m.update(selection_cpu={"int8_engine": []}),
    # JSON integers have no bound: each raised OverflowError as a float, a deep value RecursionError
    lambda m: m.update(fp32_bytes=10**400),
    lambda m: m["layers"]["bot_mlp.0"].update(bytes=10**400),
    lambda m: m["regression"].update(reference=10**400),
    lambda m: m["layers"]["bot_mlp.0"].update(kernel=functools.reduce(lambda v, _: {"cpu": v}, range(400), "x")),
])
def test_inspect_of_a_field_this_hwaware_does_not_write_is_one_error_line(tmp_path, capsys, edit):
    manifest = json.loads(json.dumps(MANIFEST))
    edit(manifest)  # written (and hashed) so: another hwaware version, or edited and re-hashed
    write_artifact(tmp_path / "a", manifest, {"w": torch.zeros(8, dtype=torch.int8)})
    assert main(["inspect", str(tmp_path / "a")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"hwaware inspect: error: {tmp_path / 'a' / 'manifest.json'}: a field holds "
                                         "what this hwaware does not write (")
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0


def test_inspect_says_program_dimensions_other_than_the_batch_are_the_examples(tmp_path, capsys):
    manifest = {**MANIFEST, "inputs": [{"dtype": "int64", "shape": [8, 16]}, {"dtype": "int64", "shape": [8, 16]},
                                       {"dtype": "float32", "shape": [7]}]}
    write_artifact(tmp_path / "a", manifest, {"w": torch.zeros(8, dtype=torch.int8)})
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert ("program.pt2: batch per input 2..any, 5..5, -\n  every other dimension as in example_inputs: 16, 16, - "
            "(export with the shapes you serve; hwaware.load serves any)") in capsys.readouterr().out


def test_a_reader_that_closes_the_pipe_is_no_traceback(art):
    # hwaware inspect PATH | head: a BrokenPipeError traceback and exit 1
    import subprocess
    import sys

    script = f"import sys; from hwaware.cli import main; sys.exit(main(['inspect', {str(art)!r}, '--wide']))"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # nothing reads: the first write breaks the pipe
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_bytes_path_is_a_path(art):
    # TypeError: Can't mix strings and bytes in path components
    from hwaware.export import verify_artifact

    assert verify_artifact(os.fsencode(str(art)))["format_version"] == verify_artifact(str(art))["format_version"]


class TiedHeads(torch.nn.Module):
    """Two heads sharing one weight, each with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)
        self.b.weight = self.a.weight

    def forward(self, x):
        return (self.a(x) - self.b(x)).sum(-1) + self.a(x).mean(-1)


def test_inspect_shows_the_bias_a_layer_stored_as_another_still_stores(tmp_path, capsys):
    """'0 B (as a)' for a layer whose own bias is stored."""
    from hwaware.export import export

    torch.manual_seed(0)
    art = export(TiedHeads(), tmp_path / "t", example_inputs=(torch.randn(4, 32),))
    meta = art.manifest["layers"]["b"]
    assert meta["stored_as"] == "a" and meta["stored_bytes"] == 16 * 4  # its float32 bias
    assert main(["inspect", art.path]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("b "))
    assert "64 B (as a)" in row


def test_bench_refuses_to_write_its_json_inside_an_artifact(art, capsys):
    """A deployment trial: a report written over an artifact's manifest.json left nothing loadable."""
    before = sorted(os.listdir(art))
    assert main(["bench", str(art), "--json", str(art / "manifest.json")]) == 2
    assert f"--json {art / 'manifest.json'}: is inside the hwaware artifact {art}" in capsys.readouterr().err
    assert sorted(os.listdir(art)) == before and read_manifest(str(art))["format"] == "hwaware-artifact"


@pytest.mark.parametrize("output, samples", [
    (torch.zeros(100), 100),
    (torch.zeros(100, 3), 100),  # [B, C] logits
    ({"ctr": torch.zeros(100, 1), "cvr": torch.zeros(100)}, 100),  # a multi-task model's heads
    ((torch.tensor(0.5), torch.zeros(100, 2)), 100),  # (loss, logits): past the 0-d loss
    ([[], (torch.zeros(100),)], 100),
    (torch.tensor(0.5), 300),  # no batched tensor: the first input's rows
    ("text", 300),
])
def test_bench_counts_a_given_batch_by_its_output_rows(output, samples):
    from hwaware.cli import _samples_in

    ids, offsets = torch.zeros(300, dtype=torch.long), torch.arange(0, 300, 3)
    assert _samples_in(output, [ids, offsets])[0] == samples
