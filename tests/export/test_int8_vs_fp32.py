"""Export records what each int8 layer served one call at a time cost against its FP32 F.linear at
the same rows, and says when the packed layers are slower: a transformer trial's artifact served at
0.45x FP32 at batch 1 (each small layer's op overhead) and nothing said so."""
import torch
from torch import nn

from hwaware import export
from hwaware.cli import main
from hwaware.export.exporter import _int8_vs_fp32


def test_the_manifest_records_the_int8_layers_against_fp32_and_inspect_prints_it(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    art = export(model, tmp_path / "a", example_inputs=(torch.randn(16, 64),))
    summary = art.manifest["int8_vs_fp32"]
    records = [art.manifest["layers"][n]["selection"]["cpu"] for n in ("0", "2")]
    assert summary["layers"] == 2 and all(r["fp32_us"] > 0 for r in records)
    assert summary["fp32_us"] == round(sum(r["fp32_us"] for r in records), 2)
    assert summary["int8_us"] == round(sum(r["measured"][r["chosen"]]["us"] for r in records), 2)
    assert main(["inspect", art.path]) == 0
    out = capsys.readouterr().out
    assert "(FP32 F.linear " in out and "int8 layers outside chains, as timed at export: " in out


def test_layers_in_an_int8_mlp_chain_are_left_out():
    rec = {"measured": {"int_mm": {"us": 5.0}}, "chosen": "int_mm", "fp32_us": 2.0}
    layers = {"a": {"selection": {"cpu": rec}}, "b": {"selection": {"cpu": dict(rec)}, "chain": ["b", "c"]},
              "t": {"scheme": "rowwise_int8"}}
    assert _int8_vs_fp32(layers) == {"layers": 1, "int8_us": 5.0, "fp32_us": 2.0}
    assert _int8_vs_fp32({"t": {"scheme": "rowwise_int8"}}) is None
