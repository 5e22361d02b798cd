"""A model class defined in the training script (``__main__``): export warns, load says how to pass the
class, and ``hwaware bench --model module:Class`` names it (the timing and the memory probes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hwaware
from hwaware.cli import main
from hwaware.export import ArtifactError, load

_SCRIPT = textwrap.dedent('''
    import sys
    import warnings
    import pytorch_lightning as pl
    import torch
    from torch import nn
    import hwaware

    class Tiny(pl.LightningModule):
        def __init__(self, hidden=16):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))

        def forward(self, x):
            return self.net(x).squeeze(-1)

    if __name__ == "__main__":
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hwaware.export(Tiny(hidden=24), sys.argv[1], example_inputs=(torch.randn(4, 8),))
        for w in caught:
            print("WARNING", w.filename, str(w.message))
''')


@pytest.fixture(scope="module")
def script_artifact(tmp_path_factory):
    """``python tiny_models.py ART``: Tiny is ``__main__.Tiny`` there, ``tiny_models:Tiny`` from its directory."""
    root = tmp_path_factory.mktemp("script")
    (root / "tiny_models.py").write_text(_SCRIPT)
    art = root / "art"
    proc = subprocess.run([sys.executable, "tiny_models.py", str(art)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root, str(art), proc.stdout


def test_export_warns_that_a_main_class_needs_to_be_passed_to_load(script_artifact):
    root, art, out = script_artifact
    warned = [line for line in out.splitlines() if line.startswith("WARNING") and "__main__" in line]
    assert len(warned) == 1
    assert warned[0].split()[1].endswith("tiny_models.py")  # points at the user's export call, not at hwaware
    assert "hwaware.load(path, model=Tiny)" in warned[0] and "--model module:Tiny" in warned[0]


def test_loading_a_main_class_elsewhere_says_to_pass_the_class_not_pythonpath(script_artifact):
    _, art, _ = script_artifact
    with pytest.raises(ArtifactError) as e:
        load(art)
    msg = str(e.value)
    assert "'__main__.Tiny' was defined in the script that exported it" in msg
    assert "Pass the class __main__.Tiny" in msg and f"hwaware.load({art!r}, model=...)" in msg
    assert "--model module:Class" in msg
    assert "PYTHONPATH" not in msg


def test_bench_builds_the_class_named_by_model(script_artifact, capsys, monkeypatch):
    root, art, _ = script_artifact
    assert main(["bench", art, "--batch-size", "4", "--batches", "1", "--rounds", "1", "--no-memory"]) == 2
    assert "hwaware bench" in capsys.readouterr().err  # the fix is named
    monkeypatch.chdir(root)  # the module is found from the current directory, as with python -m
    monkeypatch.delitem(sys.modules, "tiny_models", raising=False)
    out = root / "bench.json"
    try:
        assert main(["bench", art, "--model", "tiny_models:Tiny", "--batch-size", "4", "--batches", "1",
                     "--rounds", "1", "--json", str(out)]) == 0
    finally:
        sys.modules.pop("tiny_models", None)
    assert str(root) not in sys.path  # the directory was searched for the import only
    r = json.loads(out.read_text())
    assert r["models"]["artifact"]["samples_per_s"] > 0 and r["models"]["fp32"]["samples_per_s"] > 0
    if os.path.exists("/proc/self/clear_refs"):  # the memory probes build the class in their own processes
        for name in ("fp32", "artifact"):
            assert "error" not in r["memory"][name] and r["memory"][name]["peak_mib"] >= 0, r["memory"][name]


@pytest.mark.parametrize("spec, match", [
    ("tiny_models", r"--model: model class 'tiny_models'; expected 'module:Class'"),
    ("no_such_module_xyz:Tiny", r"--model: model class 'no_such_module_xyz:Tiny': module 'no_such_module_xyz' is not "
                                r"importable here"),
    ("tiny_models:Nope", r"--model: model class 'tiny_models:Nope': module 'tiny_models' has no 'Nope'"),
    ("json:dumps", r"--model: model class 'json:dumps' is <function dumps.*>; expected an nn.Module subclass"),
])
def test_bench_model_option_errors_name_the_value(script_artifact, capsys, monkeypatch, spec, match):
    import re

    root, art, _ = script_artifact
    monkeypatch.chdir(root)
    try:
        assert main(["bench", art, "--model", spec, "--no-memory"]) == 2
    finally:
        sys.modules.pop("tiny_models", None)
    err = capsys.readouterr().err
    assert err.startswith("hwaware: error: ") and re.search(match, err), err


class Outer:
    class Nested(torch.nn.Module):  # a class nested in a class: a dotted qualname
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 1)

        def forward(self, x):
            return self.lin(x)


def test_a_class_nested_in_a_class_loads_when_passed_and_the_cli_names_it_dotted(tmp_path):
    from hwaware.export.exporter import import_model_class

    torch.manual_seed(0)
    art = hwaware.export(Outer.Nested(), tmp_path / "art")
    assert art.manifest["model"]["class"] == f"{__name__}.Outer.Nested"
    with pytest.raises(ArtifactError, match=rf"model class '{__name__}\.Outer\.Nested' is not one of hwaware's"):
        load(tmp_path / "art")  # not hwaware's: the caller names it
    x = torch.randn(3, 8)
    assert torch.equal(load(tmp_path / "art", model=Outer.Nested)(x), art.model(x))
    assert import_model_class(f"{__name__}:Outer.Nested") is Outer.Nested  # --model module:Outer.Nested


def test_a_class_defined_inside_a_function_warns_at_export_and_load_says_to_pass_it(tmp_path):
    class Local(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 1)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"Local is defined inside a function .* hwaware.load\(path, model=Local\)"):
        hwaware.export(Local(), tmp_path / "art")
    with pytest.raises(ArtifactError, match=r"<locals>\.Local' was defined inside a function \(no process can import it\)\. "
                                            r".*Pass the class .*<locals>\.Local .*hwaware\.load\(.*, model=\.\.\.\)"):
        load(tmp_path / "art")
    x = torch.randn(2, 8)
    assert load(tmp_path / "art", model=Local)(x).shape == (2, 1)
