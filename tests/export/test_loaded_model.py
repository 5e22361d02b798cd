"""What ``hwaware.load`` gives a server beyond the packed layers: a model built as at export (or a
refusal saying how to build it), on the device it says, usable with ``.to()`` and a Trainer. Found by
a deployment trial."""
from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from hwaware.cli import main
from hwaware.export import ArtifactError, export, load


class Plain(nn.Module):
    """No ``hparams``: nothing records its constructor's arguments."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        self.scale = scale

    def forward(self, x):
        return self.net(x).squeeze(-1) * self.scale


def make_plain() -> Plain:
    """The model as exported below, for ``hwaware bench --model module:function``."""
    return Plain(scale=3.0)


class Unsaved(pl.LightningModule):
    """A LightningModule that never calls save_hyperparameters."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.scale = scale

    def forward(self, x):
        return self.net(x).squeeze(-1) * self.scale


class WithState(pl.LightningModule):
    """torchmetrics states and a plain tensor attribute: neither parameters nor buffers."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, width)
        self.head = nn.Linear(width, 1)
        self.val_auroc = BinaryAUROC()  # list states: nothing lost
        self.val_acc = BinaryAccuracy()  # tensor states (zeros), built on meta with the rest
        self.temperature = torch.tensor(2.0)

    def forward(self, x):
        return self.head(torch.relu(self.net(x))).squeeze(-1)


@pytest.mark.parametrize("cls, what", [(Plain, r"has no `hparams` \(not a LightningModule\)"),
                                       (Unsaved, r"recorded none of its arguments \(save_hyperparameters\(\) not "
                                                 r"called, or every argument ignored\)")])
def test_a_class_whose_arguments_were_not_recorded_is_not_built_with_its_defaults(tmp_path, cls, what):
    # load(model=Plain) built Plain() (scale 1.0): every output a third of the exported model's
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    art = export(cls(scale=3.0), tmp_path / "a", example_inputs=(x,))
    with pytest.raises(ArtifactError, match=r"the exported " + cls.__name__ + " " + what + r", and its constructor takes "
                                            r"arguments \(scale\), so hwaware cannot tell how it was built; pass an instance"):
        load(art.path, model=cls)
    with torch.no_grad():
        assert torch.equal(load(art.path, model=cls(scale=3.0))(x), art.model(x))


def test_bench_takes_a_function_that_builds_such_a_model(tmp_path, capsys):
    torch.manual_seed(0)
    art = export(make_plain(), tmp_path / "a", example_inputs=(torch.randn(8, 4),))
    args = ["bench", art.path, "--batch-size", "8", "--batches", "1", "--rounds", "1", "--no-memory"]
    assert main(args + ["--model", f"{__name__}:Plain"]) == 2
    assert "bench: --model module:function" in capsys.readouterr().err
    assert main(args + ["--model", f"{__name__}:make_plain", "--json"]) == 0
    import json

    assert set(json.loads(capsys.readouterr().out)["models"]) == {"fp32", "artifact"}


def test_a_loaded_dlrm_is_on_the_cpu_and_moves(tmp_path):
    # its torchmetrics were built on the meta device with the skeleton: .device said meta, and .cpu(),
    # .to() and a Trainer failed ("Cannot copy out of meta tensor")
    from hwaware.recsys import DLRM

    torch.manual_seed(0)
    kw = dict(table_sizes=(7, 9), embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8,))
    dense, sparse = torch.randn(6, 13), torch.stack([torch.randint(0, 7, (6,)), torch.randint(0, 9, (6,))], 1)
    art = export(DLRM(**kw).eval(), tmp_path / "a", example_inputs=(dense, sparse))
    served = load(art.path)
    assert served.device == torch.device("cpu") and not served.val_auroc.preds  # (a list state: empty)
    with torch.no_grad():
        assert torch.equal(served.cpu()(dense, sparse), art.model(dense, sparse))
    with warnings.catch_warnings():  # the same hparams, a tuple where the manifest holds a list: no warning
        warnings.simplefilter("error")
        load(art.path, model=DLRM(**kw))


def test_tensors_no_artifact_restores_are_named_at_load(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    art = export(WithState(), tmp_path / "a", example_inputs=(x,))
    with pytest.warns(UserWarning, match=r"WithState was built on the meta device .* neither parameters nor buffers, so "
                                         r"the artifact holds no values for them: temperature, val_acc\.fn, .*pass an "
                                         r"instance built as at export \(model=WithState\(\.\.\.\)\)"):
        served = load(art.path, model=WithState)
    with torch.no_grad():
        assert torch.equal(served(x), art.model(x))  # forward does not read them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(art.path, model=WithState()).temperature == 2.0


def test_a_process_whose_default_dtype_is_float64_loads_float32_artifacts(tmp_path):
    # the deploy layers' empty biases took the default dtype, and load blamed the artifact
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    art = export(make_plain(), tmp_path / "a", example_inputs=(x,))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        served = load(art.path, model=make_plain())
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        assert torch.equal(served(x), art.model(x))


@pytest.mark.parametrize("cast, dtype", [("half", torch.float16), ("bfloat16", torch.bfloat16)])
def test_a_loaded_model_cast_to_half_serves_in_half_and_keeps_its_format(tmp_path, cast, dtype):
    # model.half() cast the packed layers' float32 scales too: "w_scale must be float32" at the first call
    from hwaware.quant import sqnr_db
    from tests.helpers import TinyCTR, loaders

    torch.manual_seed(0)
    _, val = loaders()
    art = export(TinyCTR(), tmp_path / "a", val_dataloader=val, max_drop=1.0)
    dense, ids, _ = next(iter(val))
    with torch.no_grad():
        want = load(art.path, model=TinyCTR)(dense, ids)
        served = getattr(load(art.path, model=TinyCTR), cast)()
        got = served(dense.to(dtype), ids)
        assert got.dtype == dtype and sqnr_db(want, got.float()) > 30
        assert served.emb.weight.dtype == torch.uint8 and served.mlp[0].w_scale.dtype == torch.float32
        assert torch.equal(served.float()(dense, ids), want)  # the scales were never cast (and back: lossy)


class Partial(pl.LightningModule):
    def __init__(self, width: int = 16, scale: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["scale"])
        self.net = nn.Linear(4, width)
        self.scale = scale

    def forward(self, x):
        return self.net(x).sum(-1) * self.scale


def test_arguments_left_out_of_the_hparams_are_named_at_load(tmp_path):
    # save_hyperparameters(ignore=["scale"]): load(model=Partial) built scale=1.0 without a word
    torch.manual_seed(0)
    art = export(Partial(scale=3.0), tmp_path / "a", example_inputs=(torch.randn(8, 4),))
    with pytest.warns(UserWarning, match=r"the exported Partial did not record its arguments scale \(save_hyperparameters"
                                         r"\(ignore=\.\.\.\)\?\), so they are built with their defaults"):
        load(art.path, model=Partial)


class Lazy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def test_a_lazy_layer_in_the_model_to_build_is_not_a_shape_mismatch(tmp_path):
    # the shape check read an uninitialized parameter's shape: RuntimeError
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    model = Lazy()
    model(x)
    art = export(model, tmp_path / "a", example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(load(art.path, model=Lazy())(x), art.model(x))


def test_an_instance_built_on_meta_loads_and_its_leftovers_are_named(tmp_path):
    # what bench's memory probe passes for --model module:function; the final .to("cpu") failed on the
    # metric's meta states
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    art = export(WithState(), tmp_path / "a", example_inputs=(x,))
    with torch.device("meta"):
        skeleton = WithState()
    with pytest.warns(UserWarning, match=r"WithState was built on the meta device, and these tensors .*temperature"):
        served = load(art.path, model=skeleton)
    with torch.no_grad():
        assert torch.equal(served(x), art.model(x))


def test_another_class_with_a_long_list_hparam_is_asked_for_not_called_another_model(tmp_path):
    # the size check for hwaware's own classes ran first and called it "not the model this artifact was exported from"
    class Tagger(pl.LightningModule):
        def __init__(self, labels=tuple(f"l{i}" for i in range(40))):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Linear(4, len(labels))

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (defined inside a function: export says so)
        art = export(Tagger(), tmp_path / "a", example_inputs=(torch.randn(8, 4),))
    with pytest.raises(ArtifactError, match=r"was defined inside a function .*Pass the class"):
        load(art.path)


def test_bench_takes_a_partial_as_the_builder():
    import functools

    from hwaware.export.exporter import import_model_class

    globals()["make_plain_partial"] = functools.partial(Plain, scale=3.0)
    try:
        assert import_model_class(f"{__name__}:make_plain_partial")().scale == 3.0
    finally:
        del globals()["make_plain_partial"]


class Indexed(nn.Module):
    """A non-persistent buffer (an index built in __init__): the artifact carries it under a prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        self.register_buffer("order", torch.tensor([3, 2, 1, 0]), persistent=False)

    def forward(self, x):
        return self.net(x[:, self.order]).squeeze(-1)


def _exported_indexed(tmp_path):
    torch.manual_seed(0)
    model = Indexed()
    return model, export(model, tmp_path / "a", int8_impls=("dequant",)).path


@pytest.mark.parametrize("entry, value, why", [
    # a deploy layer's own tensor, checked (dtype, shape, finite scales) before this entry replaced it
    ("net.0.w_scale", torch.full((16,), float("nan")), r"'__nonpersistent__.net.0.w_scale' is not a non-persistent buffer"),
    ("net.0.qweight", torch.zeros(3, 5, dtype=torch.float64), r"'__nonpersistent__.net.0.qweight' is not a non-persistent"),
])
def test_a_non_persistent_entry_can_only_restore_a_non_persistent_buffer_of_its_shape(tmp_path, entry, value, why):
    from tests.export.test_edited_manifest import _rewrite_weights

    model, path = _exported_indexed(tmp_path)
    x = torch.randn(5, 4)
    torch.testing.assert_close(load(path, model=Indexed())(x), load(path, model=Indexed())(x))
    _rewrite_weights(path, lambda t: t.update({"__nonpersistent__." + entry: value}))
    with pytest.raises(ArtifactError, match=why):
        load(path, model=Indexed())


class Cached(nn.Module):
    """A non-persistent cache sized on first use (rotary tables and the like): saved grown."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.register_buffer("cache", torch.zeros(0), persistent=False)

    def forward(self, x):
        if self.cache.numel() != x.shape[1]:
            self.cache = torch.arange(x.shape[1], dtype=torch.float32)
        return self.net(x + self.cache).squeeze(-1)


def test_a_non_persistent_buffer_grown_after_init_loads_as_saved(tmp_path):
    torch.manual_seed(0)
    model = Cached()
    x = torch.randn(5, 4)
    art = export(model, tmp_path / "a", example_inputs=(x,), int8_impls=("dequant",))
    for target in (Cached, Cached()):
        loaded = load(art.path, model=target)
        assert torch.equal(loaded.cache, torch.arange(4.0)) and torch.equal(loaded(x), art.model(x))


def test_a_refused_load_leaves_the_instance_passed_in_as_it_was(tmp_path):
    from tests.export.test_recorded_hparams import _rehashed

    _, path = _exported_indexed(tmp_path)
    before = Indexed()
    snapshot = {k: v.clone() for k, v in before.state_dict().items()}
    for edit, kernels in ((lambda m: m["selection_cpu"].update(int8_engine="avx10"), "recorded"),
                          (lambda m: m["layers"]["net.0"]["selection"]["cpu"].update(input_shape=[2**40, 4]), "measure")):
        _rehashed(path, edit)
        with pytest.raises(ArtifactError):
            load(path, model=before, kernels=kernels)
        assert [type(c) for c in before.net] == [nn.Linear, nn.ReLU, nn.Linear]
        assert all(torch.equal(v, snapshot[k]) for k, v in before.state_dict().items())


def test_the_qat_trained_instance_loads_with_its_dense_layers_as_export_ran_them(tmp_path):
    # load(model=the trained model) kept fake-quantizing a layer the artifact left dense (a conv): the
    # served model was not the one the gate measured
    from hwaware import QuantSpec
    from hwaware.quant import quant_states
    from hwaware.quant.attach import attach_quantization, find_quantizable

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3)
            self.fc = nn.Linear(8, 1)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1)).squeeze(-1)

    torch.manual_seed(0)
    model = ConvNet()
    plan, _ = find_quantizable(model, weight_spec=QuantSpec(bits=8, granularity="per_channel"),
                               layer_specs={"conv": QuantSpec(bits=4, granularity="per_channel")})
    for st in attach_quantization(model, plan).values():
        st.weight.quantize = True
    x = torch.randn(6, 2, 4)
    model(x)
    art = export(model, tmp_path / "a", int8_impls=("dequant",))
    assert "conv" in art.manifest["dense_layers"] and set(quant_states(model)) == {"conv", "fc"}
    loaded = load(art.path, model=model)
    assert type(loaded.conv) is nn.Conv1d
    assert torch.equal(loaded(x), art.model(x))
