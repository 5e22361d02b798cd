"""The class a manifest names is imported only where that runs no code an artifact brings: the
manifest can be edited (and re-hashed) by whoever can write the artifact's directory."""
from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch

from hwaware.export import ArtifactError, export, load
from hwaware.export import artifact as A
from tests.helpers import TinyCTR

_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class Scorer(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))

        def forward(self, x):
            return self.net(x)
''')


def _renamed(path, cls: str) -> None:
    """Name another class in the manifest and re-hash it, as a tamperer who can write the directory would."""
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    m["model"]["class"] = cls
    m["manifest_sha256"] = A._manifest_hash(m)
    with open(mpath, "w") as f:
        json.dump(m, f)


@pytest.fixture
def artifact(tmp_path):
    torch.manual_seed(0)
    return export(TinyCTR(), tmp_path / "art", example_inputs=(torch.randn(4, 4), torch.randint(0, 50, (4,)))).path


def test_a_module_shipped_inside_the_artifact_is_never_imported(artifact, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    with open(os.path.join(artifact, "hw_shipped_mod.py"), "w") as f:
        f.write(f"open({str(marker)!r}, 'w').write('x')\nimport torch\nclass Model(torch.nn.Module):\n    pass\n")
    _renamed(artifact, "hw_shipped_mod.Model")
    monkeypatch.syspath_prepend(artifact)  # `cd art && python -c ...` puts it on sys.path
    with pytest.raises(ArtifactError, match=r"names module 'hw_shipped_mod', which is found inside the artifact's "
                                            r"directory .*hwaware never runs code that ships with an artifact"):
        load(artifact)
    assert not marker.exists() and "hw_shipped_mod" not in sys.modules


@pytest.mark.parametrize("cls, match", [
    ("venv.__main__.Model", r"has a __dunder__ part, and hwaware does not import such a name"),
    ("antigravity.Model", r"module 'antigravity' .* has no Python source defining class 'Model' at its top level"),
    ("os.system", r"model class 'os.system' is not an nn.Module"),  # os is imported already: nothing new runs
    ("not a name.X", r"model class 'not a name.X' is not importable here"),
])
def test_a_module_that_would_run_on_import_is_refused_before_it_runs(artifact, cls, match):
    top = cls.split(".")[0]
    before = top in sys.modules
    _renamed(artifact, cls)
    with pytest.raises(ArtifactError, match=match):
        load(artifact)
    assert (top in sys.modules) == before  # nothing was imported (antigravity opens a web browser)


def test_a_module_not_yet_imported_that_defines_the_class_is_imported(tmp_path, monkeypatch):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "hw_user_models.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    import hw_user_models

    torch.manual_seed(0)
    x = torch.randn(6, 4)
    art = export(hw_user_models.Scorer(), tmp_path / "art", example_inputs=(x,))
    monkeypatch.delitem(sys.modules, "hw_user_models")  # a fresh serving process
    served = load(art.path)
    assert type(served).__module__ == "hw_user_models" and "hw_user_models" in sys.modules
    with torch.no_grad():
        assert torch.equal(served(x), art.model(x))


def test_the_exporting_script_loads_its_own_class_and_namespace_and_latin1_modules_load(tmp_path, monkeypatch):
    import subprocess

    script = tmp_path / "train.py"
    script.write_text(_MODULE + textwrap.dedent('''
        import sys, warnings
        import hwaware
        warnings.simplefilter("ignore")
        x = torch.randn(3, 4)
        art = hwaware.export(Scorer(), sys.argv[1], example_inputs=(x,))
        print("ok", torch.equal(hwaware.load(sys.argv[1])(x), art.model(x)))  # __main__ has no __spec__ here
    '''))
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "art")], capture_output=True, text=True,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.stdout.strip() == "ok True", run.stderr[-2000:]

    # a class in a namespace package (no __init__.py) and one in a latin-1 module with a coding cookie
    (tmp_path / "mods" / "hw_ns_pkg" / "inner").mkdir(parents=True)
    (tmp_path / "mods" / "hw_ns_pkg" / "inner" / "ctr.py").write_text(_MODULE)
    (tmp_path / "mods" / "hw_latin1.py").write_bytes(
        b"# -*- coding: latin-1 -*-\n# caf\xe9\n" + _MODULE.encode())
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    import hw_latin1
    import hw_ns_pkg.inner.ctr

    x = torch.randn(3, 4)
    for i, cls in enumerate((hw_ns_pkg.inner.ctr.Scorer, hw_latin1.Scorer)):
        art = export(cls(), tmp_path / f"a{i}", example_inputs=(x,))
        for mod in [m for m in sys.modules if m.startswith(("hw_ns_pkg", "hw_latin1"))]:
            monkeypatch.delitem(sys.modules, mod)  # a fresh serving process
        served = load(art.path)
        assert type(served).__module__ == cls.__module__
        with torch.no_grad():
            assert torch.equal(served(x), art.model(x))
