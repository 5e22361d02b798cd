"""What load builds the model from: the hparams recorded at export, each one that JSON holds; the
rest named at export and at load (never silently the class's defaults), and a class whose
arguments changed, or a manifest whose hparams build another architecture, refused with the fix."""
from __future__ import annotations

import json
import math
import os
import pathlib

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from hwaware.cli import main
from hwaware.export import ArtifactError, export, load
from hwaware.export import artifact as A


class Scaled(pl.LightningModule):
    def __init__(self, width: int = 8, out_scale: float = 1.0, log_dir=None, max_norm: float = math.inf) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x) * self.hparams.out_scale


def _rehashed(path, edit) -> None:
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    edit(m)
    m["manifest_sha256"] = A._manifest_hash(m)
    with open(mpath, "w") as f:
        json.dump(m, f)


def test_hparams_json_cannot_hold_are_named_and_load_refuses_to_guess_them(tmp_path):
    torch.manual_seed(0)
    model = Scaled(width=16, out_scale=3.0, log_dir=pathlib.Path("/runs/a"))
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match=r"cannot record the model's hparams log_dir \(pathlib\.PosixPath\), max_norm "
                                         r"\(builtins\.float inf\) \(not JSON\): load will need the model built by you"):
        art = export(model, tmp_path / "a", example_inputs=(x,))  # inf made the manifest unwritable, after all the work
    info = art.manifest["model"]
    assert info["hparams"] == {"width": 16, "out_scale": 3.0}  # one Path dropped every hparam, out_scale back to 1.0
    assert set(info["hparams_unrecorded"]) == {"log_dir", "max_norm"}
    with pytest.raises(ArtifactError, match=r"hparams log_dir \(pathlib\.PosixPath\), max_norm \(builtins\.float inf\) "
                                            r"could not be recorded .*pass it: hwaware\.load\(.*, model=Scaled\(\.\.\.\)\)"):
        load(art.path, model=Scaled)
    served = load(art.path, model=Scaled(width=16, out_scale=3.0, log_dir=pathlib.Path("/runs/a")))
    with torch.no_grad():
        assert torch.equal(served(x), art.model(x))


def test_a_changed_class_or_another_architecture_is_refused_naming_the_fix(tmp_path, capsys):
    torch.manual_seed(0)
    art = export(Scaled(width=16, max_norm=1.0), tmp_path / "a", example_inputs=(torch.randn(5, 4),))
    _rehashed(art.path, lambda m: m["model"]["hparams"].update(dropout=0.1))  # an argument the class no longer takes
    with pytest.raises(ArtifactError, match=r"Scaled\(\*\*\{.*'dropout': 0\.1.*\}\) failed \(TypeError: .*unexpected keyword "
                                            r"argument 'dropout'\): the class takes other arguments than when the "
                                            r"artifact was exported"):
        load(art.path, model=Scaled)
    assert main(["bench", art.path, "--model", f"{__name__}:Scaled", "--batch-size", "4", "--batches", "1", "--rounds", "1",
                 "--no-memory"]) == 2
    assert "unexpected keyword argument 'dropout'" in capsys.readouterr().err
    # hparams that build another (here: huge) model: bench compares the size before allocating it
    _rehashed(art.path, lambda m: (m["model"]["hparams"].pop("dropout"), m["model"]["hparams"].update(width=10**9)))
    assert main(["bench", art.path, "--model", f"{__name__}:Scaled", "--batch-size", "4", "--batches", "1", "--rounds", "1",
                 "--no-memory"]) == 2
    err = capsys.readouterr().err
    # (refused at load, before bench builds the FP32 model: the artifact's first layer is 16 wide)
    assert ("layer 'net.0' holds a 16 x 4 weight in the artifact, but Scaled(**hparams recorded at export) has Linear "
            "weight [1000000000, 4]: not the model this artifact was exported from") in err


class TupleWidths(pl.LightningModule):
    """A constructor that needs its tuples to be tuples: ``(in_dim,) + hidden``."""

    def __init__(self, hidden=(8, 4), blocks=((2, 3), (4,)), table_dims=None) -> None:
        super().__init__()
        self.save_hyperparameters()
        widths = (4,) + hidden
        assert isinstance(blocks[0], tuple)
        self.net = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])

    def forward(self, x):
        return self.net(x)


def test_tuple_hparams_are_rebuilt_as_tuples(tmp_path):
    # JSON wrote them as lists: TypeError "can only concatenate tuple (not list)", reported as a changed class
    torch.manual_seed(0)
    model = TupleWidths(hidden=(16, 8), blocks=((1, 2), (3,)), table_dims={"a": (2, 3)})
    x = torch.randn(3, 4)
    art = export(model, tmp_path / "a", example_inputs=(x,))
    info = art.manifest["model"]
    assert info["hparams"]["hidden"] == [16, 8]
    assert sorted(info["hparams_tuples"]) == [["blocks"], ["blocks", 0], ["blocks", 1], ["hidden"], ["table_dims", "a"]]
    served = load(art.path, model=TupleWidths)
    assert served.hparams.hidden == (16, 8) and served.hparams.blocks == ((1, 2), (3,))
    assert served.hparams.table_dims == {"a": (2, 3)}
    with torch.no_grad():
        assert torch.equal(served(x), art.model(x))


@pytest.mark.parametrize("paths, why", [
    ("hidden", r"'model.hparams_tuples' is 'hidden'; expected a list of key paths"),
    ([["nope"]], r"'model.hparams_tuples' names \['nope'\], which 'model.hparams' does not hold"),
    ([["hidden", 0]], r"names \['hidden', 0\], which is int in 'model.hparams'; expected a list"),
    ([["hidden"], ["hidden"]], r"names \['hidden'\] twice"),
])
def test_edited_tuple_paths_are_named(tmp_path, paths, why):
    torch.manual_seed(0)
    art = export(TupleWidths(), tmp_path / "a", example_inputs=(torch.randn(3, 4),))
    _rehashed(art.path, lambda m: m["model"].update(hparams_tuples=paths))
    with pytest.raises(ArtifactError, match=why):
        load(art.path, model=TupleWidths)


class IntKeyed(pl.LightningModule):
    def __init__(self, dims=None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, (dims or {0: 2})[0])

    def forward(self, x):
        return self.net(x)


def test_a_dict_hparam_with_int_keys_is_named_unrecorded(tmp_path):
    # JSON wrote {0: 8} as {"0": 8}: load built the class's default width and said "not the model"
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"cannot record the model's hparams dims \(builtins\.dict with non-str keys\)"):
        art = export(IntKeyed(dims={0: 8}), tmp_path / "a", example_inputs=(torch.randn(3, 4),))
    with pytest.raises(ArtifactError, match=r"hparams dims \(builtins\.dict with non-str keys\) could not be recorded"):
        load(art.path, model=IntKeyed)
    x = torch.randn(2, 4)
    assert torch.equal(load(art.path, model=IntKeyed(dims={0: 8}))(x), art.model(x))
