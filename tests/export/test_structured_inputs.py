"""A forward that takes a dict (or list) of tensors, as recsys models take their features: export
writes program.pt2 for it, records how the tensors nest, and bench rebuilds the inputs from that."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from hwaware.cli import main
from hwaware.export import ArtifactError, export, load
from hwaware.export.exporter import build_inputs, input_leaves, make_inputs
from tests.export.test_recorded_hparams import _rehashed


class FeatureDictCTR(nn.Module):
    """``forward(features, extra)``: ``features`` a dict of dense rows and ids, ``extra`` a list of
    one tensor added to the hidden rows."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(100, 32, mode="sum")
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(32, 1)

    def forward(self, features, extra):
        h = self.mlp(features["dense"]) + self.emb(features["ids"]) + extra[0]
        return self.head(h).squeeze(1)

    def predict_step(self, batch, batch_idx=0):
        return self(*batch[:2])


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return ({"dense": torch.randn(n, 16, generator=g), "ids": torch.randint(0, 100, (n, 3), generator=g)},
            [torch.randn(n, 32, generator=g)])


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    torch.manual_seed(0)
    model = FeatureDictCTR().eval()
    val = []
    for i in range(3):
        features, extra = _batch(32, seed=10 + i)
        with torch.no_grad():
            val.append((features, extra, (model(features, extra) > 0).float()))
    return export(model, tmp_path_factory.mktemp("s") / "art", val_dataloader=val, max_drop=0.05,
                  example_inputs=_batch(64))


def test_the_manifest_records_each_tensor_and_how_they_nest(art):
    m = art.manifest
    assert [d["shape"] for d in m["inputs"]] == [[64, 16], [64, 3], [64, 32]]
    assert m["input_structure"] == [{"dict": [["dense", 0], ["ids", 1]]}, {"list": [2]}]
    assert m["program"]["batch_range"] == [[1, None]] * 3
    assert m["regression"]["drop"] <= 0.05


@pytest.mark.parametrize("n", [1, 7, 200])
def test_program_and_load_serve_the_deploy_model_bit_for_bit_at_any_batch(art, n):
    program = torch.export.load(os.path.join(art.path, "program.pt2")).module()
    loaded = load(art.path, model=FeatureDictCTR())
    x = _batch(n, seed=n)
    with torch.no_grad():
        want = art.model(*x)
        assert torch.equal(program(*x), want) and torch.equal(loaded(*x), want)


def test_generated_inputs_take_the_recorded_structure(art):
    x = make_inputs(art.manifest["inputs"], 5, structure=art.manifest["input_structure"])
    assert set(x[0]) == {"dense", "ids"} and isinstance(x[1], list) and x[0]["ids"].shape == (5, 3)
    assert int(x[0]["ids"].max()) < 100
    assert [t.shape[0] for t in input_leaves(x)] == [5, 5, 5]


def test_bench_rebuilds_the_inputs_generated_or_given(art, tmp_path, capsys):
    from safetensors.torch import save_file

    cli = ["bench", art.path, "--model", "tests.export.test_structured_inputs:FeatureDictCTR", "--no-memory",
           "--batches", "1", "--rounds", "1"]
    assert main(cli + ["--batch-size", "16"]) == 0
    x = _batch(9)
    save_file({"0": x[0]["dense"], "1": x[0]["ids"], "2": x[1][0]}, tmp_path / "batch.safetensors")
    assert main(cli + ["--inputs", str(tmp_path / "batch.safetensors")]) == 0
    assert "batch size 9" in capsys.readouterr().out
    save_file({"0": x[0]["dense"]}, tmp_path / "short.safetensors")
    assert main(cli + ["--inputs", str(tmp_path / "short.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "the batch holds 1 tensor(s), and the model's inputs hold 3" in err
    assert "'0': inputs[0]['dense'], '1': inputs[0]['ids'], '2': inputs[1][0]" in err


def test_inspect_names_where_each_input_goes(art, capsys):
    assert main(["inspect", art.path]) == 0
    assert "program.pt2 inputs: 0=[0]['dense'], 1=[0]['ids'], 2=[1][0]" in capsys.readouterr().out


@pytest.mark.parametrize("structure, why", [
    ([{"dict": [["dense", 1], ["ids", 0]]}, {"list": [2]}], r"names input 1 where input 0 of 3 comes next"),
    ([{"dict": [["dense", 0]]}], r"uses 1 of the 3 recorded inputs"),
    ([{"set": [0, 1, 2]}], r"has kind 'set'"),
    ([{"dict": [[0, 0], ["ids", 1]]}, {"list": [2]}], r"has a dict entry that is not \[str key, node\]"),
    ("x", r"is str"),
    ([{"dict": [["dense", 0], ["dense", 1]]}, {"list": [2]}], r"repeats a key of a dict"),
])
def test_an_edited_structure_is_refused_by_name(tmp_path, art, structure, why, capsys):
    import shutil

    path = str(tmp_path / "edited")
    shutil.copytree(art.path, path)
    _rehashed(path, lambda m: m.update(input_structure=structure))
    with pytest.raises(ArtifactError, match=r"manifest.json: 'input_structure' " + why):
        build_inputs(structure, [torch.zeros(1)] * 3, f"{path}/manifest.json")
    assert main(["bench", path, "--model", "tests.export.test_structured_inputs:FeatureDictCTR", "--no-memory",
                 "--batches", "1", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "'input_structure'" in err and "Traceback" not in err


def test_a_structure_nested_past_the_bound_is_refused():
    deep = 0
    for _ in range(40):
        deep = {"list": [deep]}
    with pytest.raises(ArtifactError, match=r"'input_structure' has"):
        build_inputs([deep], [torch.zeros(1)], "m.json")


@pytest.mark.parametrize("given, match", [
    (lambda d: ({1: d}, [d]), r"example_inputs\[0\] has key 1; a dict input needs str keys"),
    (lambda d: ({"dense": d, "n": 3}, [d]), r"example_inputs\[0\]\['n'\] is int; expected tensors, or dicts"),
    (lambda d: (__import__("collections").OrderedDict(dense=d), [d]),
     r"example_inputs\[0\] is OrderedDict; .*exactly those types.*pass an OrderedDict or a namedtuple as a dict"),
])
def test_example_inputs_leaves_must_be_tensors_and_keys_str(tmp_path, given, match):
    with pytest.raises(TypeError, match=match):
        export(FeatureDictCTR(), tmp_path / "art", example_inputs=given(torch.randn(4, 16)))
    assert not (tmp_path / "art").exists()


def test_a_manifest_of_plain_tensor_inputs_records_no_structure(tmp_path):
    torch.manual_seed(0)
    a = export(nn.Sequential(nn.Linear(8, 4)), tmp_path / "a", example_inputs=(torch.randn(4, 8),))
    assert "input_structure" not in json.load(open(os.path.join(a.path, "manifest.json")))
