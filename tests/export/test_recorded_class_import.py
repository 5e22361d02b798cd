"""Which class ``load`` builds from a manifest: only one of hwaware's own, unasked. Building a class
runs its constructor with the manifest's hparams, and the manifest can be edited (and re-hashed) by
whoever can write the artifact's directory; any other class is the caller's to name (``model=``)."""
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


def _renamed(path, cls: str, **hparams) -> None:
    """Name another class (and hparams) in the manifest and re-hash it, as a tamperer who can write the
    directory would."""
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    m["model"]["class"] = cls
    m["model"]["hparams"].update(hparams)
    m["manifest_sha256"] = A._manifest_hash(m)
    with open(mpath, "w") as f:
        json.dump(m, f)


def _prefixes(name: str):
    """The module names a dotted class name could import: 'a.b.C' -> ['a', 'a.b']."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


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
    with pytest.raises(ArtifactError, match=r"model class 'hw_shipped_mod\.Model' is not one of hwaware's\. "
                                            r"hwaware builds only its own classes from a manifest.*Pass the class hw_shipped_mod.Model .*model=\.\.\.\)"):
        load(artifact)
    assert not marker.exists() and "hw_shipped_mod" not in sys.modules
    # the class the caller names is built; the manifest's name is not looked at
    x, ids = torch.randn(4, 4), torch.randint(0, 50, (4,))
    assert load(artifact, model=TinyCTR)(x, ids).shape == (4,)
    assert not marker.exists() and "hw_shipped_mod" not in sys.modules


def test_the_trials_clipscore_is_refused_before_anything_is_imported_or_built(artifact, tmp_path):
    """The trial: an installed nn.Module defined at the top of its module, whose constructor imports
    the 'model' it is given by path: here, code shipped inside the artifact's directory."""
    marker = tmp_path / "ran"
    with open(os.path.join(artifact, "__init__.py"), "w") as f:
        f.write(f"open({str(marker)!r}, 'w').write('x')\n")
    cls = "torchmetrics.multimodal.clip_score.CLIPScore"
    before = {m for m in _prefixes(cls) if m in sys.modules}
    _renamed(artifact, cls, model_name_or_path=artifact)
    with pytest.raises(ArtifactError, match=rf"model class '{cls}' is not one of hwaware's.*"
                                            r"Pass the class torchmetrics.multimodal.clip_score.CLIPScore .*hwaware\.load\(.*, model=\.\.\.\); "
                                            r"from the shell: hwaware bench .* --model module:Class"):
        load(artifact)
    assert {m for m in _prefixes(cls) if m in sys.modules} == before  # nothing imported
    assert not marker.exists()


@pytest.mark.parametrize("cls, where", [
    ("os.system", "is not one of hwaware's"),  # os is imported already: refused by name all the same
    ("venv.__main__.Model", "is not one of hwaware's"),  # would run venv's command line
    ("antigravity.Model", "is not one of hwaware's"),  # opens a web browser on import
    ("hwaware_evil.Model", "is not one of hwaware's"),  # 'hwaware' is the whole first part, not a prefix
    ("hwaware.__main__.Model", "is not one of hwaware's"),  # no __dunder__ part, even under hwaware
    ("not a name.X", "is not one of hwaware's"),
    ("__main__.Model", "was defined in the script that exported it"),
    ("mymod.build.<locals>.Model", r"was defined inside a function \(no process can import it\)"),
])
def test_a_class_not_hwawares_is_refused_before_any_import(artifact, cls, where):
    before = {m for m in _prefixes(cls) if m in sys.modules}
    _renamed(artifact, cls)
    with pytest.raises(ArtifactError, match=rf"model class '{cls}' {where}\. .*Pass the class"):
        load(artifact)
    assert {m for m in _prefixes(cls) if m in sys.modules} == before  # nothing was imported


@pytest.mark.parametrize("cls", ["hwaware.recsys.dlrm.Nope", "hwaware.recsys.dlrm.evaluate_auroc",
                                 # other libraries' classes reached through an hwaware module's attributes
                                 "hwaware.recsys.dlrm.torch.nn.Transformer", "hwaware.recsys.dlrm.BinaryAUROC",
                                 "hwaware.no_such_module.Model"])
def test_an_hwaware_name_that_is_no_module_class_here_is_refused(artifact, cls):
    _renamed(artifact, cls)
    with pytest.raises(ArtifactError, match=rf"model class '{cls}' is not an nn.Module class of this hwaware; "
                                            r"pass model="):
        load(artifact)


def test_an_hwaware_class_loads_without_being_named(tmp_path):
    from hwaware.recsys.dlrm import DLRM
    from tests.recsys.test_dlrm import TINY, _inputs

    torch.manual_seed(0)
    dense, sparse = _inputs(8)
    art = export(DLRM(**TINY).eval(), tmp_path / "art", example_inputs=(dense, sparse))
    assert art.manifest["model"]["class"] == "hwaware.recsys.dlrm.DLRM"
    served = load(art.path)  # built from the recorded hparams
    assert type(served) is DLRM and served.hparams["embedding_dim"] == TINY["embedding_dim"]
    with torch.no_grad():
        assert torch.equal(served(dense, sparse), art.model(dense, sparse))


def test_a_users_class_not_yet_imported_is_not_imported_and_loads_when_passed(tmp_path, monkeypatch):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "hw_user_models.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    import hw_user_models

    torch.manual_seed(0)
    x = torch.randn(6, 4)
    art = export(hw_user_models.Scorer(width=12), tmp_path / "art", example_inputs=(x,))
    assert art.manifest["model"]["class"] == "hw_user_models.Scorer"
    monkeypatch.delitem(sys.modules, "hw_user_models")  # a fresh serving process
    with pytest.raises(ArtifactError, match=r"model class 'hw_user_models\.Scorer' is not one of hwaware's"
                                            r".*Pass the class hw_user_models.Scorer .*model=\.\.\.\)"):
        load(art.path)
    assert "hw_user_models" not in sys.modules  # importable here, and not imported
    import hw_user_models as fresh

    # the class the caller names, built with the recorded hparams: a plain nn.Module has none, and its
    # defaults (width 8) took the artifact's 12-wide layers without a word
    with pytest.raises(ArtifactError, match=r"the exported Scorer has no `hparams` \(not a LightningModule\), and its "
                                            r"constructor takes arguments \(width\), so hwaware cannot tell how it was "
                                            r"built; pass an instance built as at export: .*model=Scorer\(\.\.\.\)\)"):
        load(art.path, model=fresh.Scorer)
    with pytest.raises(ArtifactError, match=r"layer 'net.0' holds a 12 x 4 weight in the artifact, but the model passed "
                                            r"as model= has Linear weight \[8, 4\]"):
        load(art.path, model=fresh.Scorer())
    served = load(art.path, model=fresh.Scorer(width=12))
    assert type(served) is fresh.Scorer and served.net[0].out_features == 12
    with torch.no_grad():
        assert torch.equal(served(x), art.model(x))


def test_the_exporting_script_loads_its_own_class_when_it_passes_it(tmp_path):
    import subprocess

    script = tmp_path / "train.py"
    script.write_text(_MODULE + textwrap.dedent('''
        import sys, warnings
        import hwaware
        from hwaware.export import ArtifactError
        warnings.simplefilter("ignore")
        x = torch.randn(3, 4)
        art = hwaware.export(Scorer(), sys.argv[1], example_inputs=(x,))
        try:
            hwaware.load(sys.argv[1])
        except ArtifactError as e:
            print("refused", "'__main__.Scorer' was defined in the script that exported it" in str(e))
        print("ok", torch.equal(hwaware.load(sys.argv[1], model=Scorer())(x), art.model(x)))
    '''))
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "art")], capture_output=True, text=True,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.stdout.split("\n")[:2] == ["refused True", "ok True"], run.stderr[-2000:]
