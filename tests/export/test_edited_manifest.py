"""A manifest edited (and re-hashed) by whoever can write the artifact: what it may make load and
bench do. Found by an adversarial trial: each of these allocated gigabytes, or failed with a raw
exception naming no file."""
from __future__ import annotations

import json
import os

import pytest
import torch

from hwaware.cli import main
from hwaware.export import ArtifactError, export, load
from tests.export.test_recorded_hparams import _rehashed
from tests.helpers import TinyCTR, loaders


@pytest.fixture
def art(tmp_path):
    torch.manual_seed(0)
    _, val = loaders()
    return export(TinyCTR(), tmp_path / "art", val_dataloader=val, max_drop=1.0,
                  example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,)))).path


def test_re_timing_refuses_a_recorded_input_shape_no_export_would_time(art):
    # load(kernels="measure") allocated the recorded rows: 3e7 rows took 7 GB and 171 s, 1e9 a raw RuntimeError
    def huge(m):
        m["layers"]["mlp.0"]["selection"]["cpu"]["input_shape"][0] = 10**9

    _rehashed(art, huge)
    load(art, model=TinyCTR)  # the recorded kernels: nothing is timed
    with pytest.raises(ArtifactError, match=r"manifest.json: layer 'mlp.0' records kernel timing input_shape \[1000000000, 12\]: "
                                            r"re-timing it would allocate a 1000000000 x 12 float input \(44.7 GiB\)"):
        load(art, model=TinyCTR, kernels="measure")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"]["mlp.0"].update(module=["Int8Linear"]), r"layer 'mlp.0' has unknown module \['Int8Linear'\]"),
    (lambda m: m["model"].update(hparams_unrecorded=["x"]), r"'model.hparams_unrecorded' is \['x'\]; expected an object"),
])
def test_malformed_entries_are_named_not_raw_python_errors(art, edit, match):
    _rehashed(art, edit)
    with pytest.raises(ArtifactError, match=match):
        load(art, model=TinyCTR)


def test_an_int4_entry_with_group_size_zero_is_named(tmp_path):
    from hwaware.export.deploy import Int4Linear

    with pytest.raises(ValueError, match=r"group_size=0 must be a positive int dividing the even K = 8"):
        Int4Linear.empty({"shape": [4, 8], "group_size": 0, "symmetric": True})
    from hwaware import QuantSpec
    from hwaware.quant.attach import attach_quantization, find_quantizable

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    plan, _ = find_quantizable(model, weight_spec=QuantSpec(bits=4, granularity="per_group", group_size=32))
    for st in attach_quantization(model, plan).values():
        st.weight.quantize = True
    model(torch.randn(2, 64))  # the weight's group scales
    path = export(model, tmp_path / "a").path
    assert json.load(open(os.path.join(path, "manifest.json")))["layers"]["0"]["module"] == "Int4Linear"
    _rehashed(path, lambda m: m["layers"]["0"].update(group_size=0))
    with pytest.raises(ArtifactError, match=r"layer '0' \(Int4Linear\): its entry is malformed \(ValueError: group_size=0"):
        load(path, model=torch.nn.Sequential(torch.nn.Linear(64, 8)))
    # a group size that does not divide K (its scales cut to match) loaded, and failed at the first call
    _rehashed(path, lambda m: m["layers"]["0"].update(group_size=48))
    _rewrite_weights(path, lambda t: t.update({"0.scales": t["0.scales"][:, :1].contiguous()}))
    with pytest.raises(ArtifactError, match=r"layer '0' \(Int4Linear\): its entry is malformed \(ValueError: "
                                            r"group_size=48 must be a positive int dividing the even K = 64\)"):
        load(path, model=torch.nn.Sequential(torch.nn.Linear(64, 8)))


def _int4_artifact(tmp_path, symmetric: bool) -> str:
    from hwaware import QuantSpec
    from hwaware.quant.attach import attach_quantization, find_quantizable

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    spec = QuantSpec(bits=4, granularity="per_group", group_size=32, symmetric=symmetric)
    plan, _ = find_quantizable(model, weight_spec=spec)
    for st in attach_quantization(model, plan).values():
        st.weight.quantize = True
    model(torch.randn(2, 64))
    return export(model, tmp_path / "a").path


@pytest.mark.parametrize("symmetric, key, value, why", [
    (True, "0.scales", float("nan"), r"scales must be finite and > 0, got nan at \[1, 1\]"),
    (True, "0.scales", 0.0, r"scales must be finite and > 0, got 0.0 at \[1, 1\]"),
    (True, "0.scales", -1.0, r"scales must be finite and > 0, got -1.0 at \[1, 1\]"),
    (False, "0.zeros", 20, r"zeros must lie in \[0, 15\] \(4-bit zero points\), got values in \[\d+, 20\]"),
])
def test_int4_scales_and_zero_points_are_checked_at_load(tmp_path, symmetric, key, value, why):
    # each loaded, and failed at the first call naming no file (an int8 scale was refused at load)
    path = _int4_artifact(tmp_path, symmetric)
    fresh = lambda: torch.nn.Sequential(torch.nn.Linear(64, 8))  # noqa: E731
    load(path, model=fresh())

    def poison(t):
        t[key][1, 1] = value

    _rewrite_weights(path, poison)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: layer '0': " + why):
        load(path, model=fresh())


@pytest.mark.parametrize("field, value", [("mode", "mean"), ("mode", "max"), ("padding_idx", 3),
                                          ("include_last_offset", True)])
def test_a_table_computing_other_bags_than_the_models_is_refused(art, field, value):
    # each loaded into TinyCTR's sum table: other bags served without a word (include_last_offset: the
    # model's own offsets refused at the first call)
    _rehashed(art, lambda m: m["layers"]["emb"].update({field: value}))
    with pytest.raises(ArtifactError, match=rf"manifest.json: layer 'emb' has {field}={value!r} in the artifact, but "
                                            rf"the model passed as model= has a EmbeddingBag with {field}="):
        load(art, model=TinyCTR())
    with pytest.raises(ArtifactError, match=rf"layer 'emb' has {field}={value!r} in the artifact, but "
                                            r"TinyCTR\(\*\*hparams recorded at export\)"):
        load(art, model=TinyCTR)


def test_a_packed_layer_without_the_models_bias_is_refused(art):
    # the bias dropped from the entry and the file loaded: every output lost the bias
    _rehashed(art, lambda m: m["layers"]["mlp.2"].update(bias=False))
    _rewrite_weights(art, lambda t: t.pop("mlp.2.bias"))
    with pytest.raises(ArtifactError, match=r"layer 'mlp.2' has bias=False in the artifact, but the model passed as "
                                            r"model= has a Linear with bias=True there"):
        load(art, model=TinyCTR())


def test_a_model_loaded_before_is_checked_the_same_way(art, tmp_path):
    import shutil

    other = str(tmp_path / "other")
    shutil.copytree(art, other)
    _rehashed(other, lambda m: m["layers"]["emb"].update(mode="mean"))
    served = load(art, model=TinyCTR())  # its layers are deploy layers now
    with pytest.raises(ArtifactError, match=r"layer 'emb' has mode='mean' in the artifact, but the model passed as "
                                            r"model= has a RowwiseEmbeddingBag with mode='sum' there"):
        load(other, model=served)
    load(art, model=served)


@pytest.mark.parametrize("inputs, why", [
    ([{"shape": [8, -4], "dtype": "float32"}], r"'inputs'\[0\] has shape \[8, -4\]"),
    ([{"shape": [8], "dtype": "_dynamo"}], r"'inputs'\[0\] has dtype '_dynamo'"),  # getattr(torch, ...) imported it
    ([{"shape": [8], "dtype": "int64", "max": [10**30]}], r"'inputs'\[0\] has max \[1000000000000000000000000000000\]"),
    ([{"shape": [8], "dtype": "int64"}], r"'inputs'\[0\] has max None"),
    ("x", r"'inputs' is str; expected a list"),
])
def test_bench_refuses_recorded_inputs_it_cannot_generate_by_name(art, inputs, why, capsys):
    _rehashed(art, lambda m: m.update(inputs=inputs))
    assert main(["bench", art, "--model", "tests.helpers:TinyCTR", "--no-memory", "--batches", "1", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "hwaware bench: error: " in err and "manifest.json: " in err
    import re

    assert re.search(why, err), err


def test_verify_reads_the_weights_as_load_does(art):
    # verify_artifact parsed the header with the safetensors library, which accepts what load refuses
    # (here: a BOOL tensor holding a byte other than 0 or 1)
    from hwaware.export import verify_artifact

    wpath = os.path.join(art, "weights.safetensors")
    with open(wpath, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header = {"__metadata__": header.get("__metadata__", {}), name: {"dtype": "BOOL", "shape": [end - begin],
                                                                      "data_offsets": [begin, end]},
              **{k: v for k, v in header.items() if k not in (name, "__metadata__")}}
    body = bytearray(raw[8 + n:])
    body[begin] = 7
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(wpath, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb + bytes(body))
    import hashlib

    data = open(wpath, "rb").read()
    _rehashed(art, lambda m: m["files"]["weights.safetensors"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
    with pytest.raises(ArtifactError) as by_load:
        load(art, model=TinyCTR)
    with pytest.raises(ArtifactError) as by_verify:
        verify_artifact(art)
    assert str(by_verify.value) == str(by_load.value)


def _set_weight(art, key: str, index: int, value: float) -> None:
    """One element of ``key`` in weights.safetensors set to ``value``, the file re-hashed in the
    manifest (as a buggy re-packing tool would leave it)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    wpath = os.path.join(art, "weights.safetensors")
    tensors = load_file(wpath)
    tensors[key][index] = value
    save_file(tensors, wpath, metadata={"format": "pt"})
    data = open(wpath, "rb").read()
    _rehashed(art, lambda m: m["files"]["weights.safetensors"].update(sha256=hashlib.sha256(data).hexdigest(),
                                                                       bytes=len(data)))


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), 0.0])
def test_an_int8_weight_scale_that_is_not_finite_and_positive_is_refused_at_load(art, value):
    # a NaN or -inf scale loaded and served NaN outputs without a word
    _set_weight(art, "mlp.0.w_scale", 3, value)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: layer 'mlp.0': w_scale: scale must be finite and > 0 "
                                            r"everywhere, got .* at index 3"):
        load(art, model=TinyCTR)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_packed_layer_bias_that_is_not_finite_is_refused_at_load(art, value):
    """A deployment trial: a NaN bias (a re-packing tool's bug, the file re-hashed) loaded and served
    NaN for every output, where the same edit to the scale was refused."""
    _set_weight(art, "mlp.0.bias", 5, value)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: layer 'mlp.0': bias must be finite everywhere, "
                                            r"got (nan|inf) at flat index 5"):
        load(art, model=TinyCTR)


def test_a_symlinked_manifest_is_refused(art, tmp_path):
    # the weights file may not be a link; the manifest was followed wherever it pointed
    from hwaware.export import verify_artifact

    mpath = os.path.join(art, "manifest.json")
    elsewhere = tmp_path / "elsewhere.json"
    os.replace(mpath, elsewhere)
    os.symlink(elsewhere, mpath)
    with pytest.raises(ArtifactError, match=r"manifest.json: a symbolic link \(.*elsewhere.json\), not a regular file"):
        verify_artifact(art)


def test_a_symlinked_weights_file_is_refused_with_how_to_serve_it(art, tmp_path):
    """A hub snapshot lays files out as links: refused with torch's 'Too many levels of symbolic
    links', which says neither that a link is the reason nor what to do (a deployment trial)."""
    import shutil

    wpath = os.path.join(art, "weights.safetensors")
    blob = tmp_path / "blob"
    os.replace(wpath, blob)
    os.symlink(blob, wpath)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: a symbolic link \(.*blob\), not a regular file; export "
                                            r"writes none\. Serve a dereferenced copy of the directory \(cp -rL "):
        load(art, model=TinyCTR)
    shutil.copytree(art, tmp_path / "copy", symlinks=False)  # what cp -rL makes: loads
    load(str(tmp_path / "copy"), model=TinyCTR)


def _rewrite_weights(path, edit) -> None:
    import hashlib

    from safetensors.torch import load_file, save_file

    wpath = os.path.join(path, "weights.safetensors")
    tensors = load_file(wpath)
    edit(tensors)
    save_file(tensors, wpath, metadata={"format": "pt"})
    data = open(wpath, "rb").read()
    _rehashed(path, lambda m: m["files"]["weights.safetensors"].update(sha256=hashlib.sha256(data).hexdigest(),
                                                                       bytes=len(data)))


@pytest.mark.parametrize("field, value", [("scale", float("nan")), ("offset", float("inf")), ("scale", -1.0)])
def test_a_table_row_whose_scale_or_offset_is_not_finite_is_refused_at_load(art, field, value):
    # the qparams sit inside the packed uint8 rows (FBGEMM layout): a NaN one loaded and served NaN
    # for every bag that read the row
    def poison(t):
        w = t["emb.weight"]  # uint8 [50, 8 + 8]: codes, then float32 scale and offset
        q = w[:, 8:].contiguous().view(torch.float32)
        q[7, 0 if field == "scale" else 1] = value
        w[:, 8:] = q.view(torch.uint8)

    load(art, model=TinyCTR)
    _rewrite_weights(art, poison)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: table 'emb': row 7 has scale .* and offset .*; "
                                            r"expected a finite scale >= 0 and a finite offset"):
        load(art, model=TinyCTR)


def test_int4_table_rows_are_checked_too():
    from hwaware.ops import packing

    fused = packing.quantize_rowwise(torch.randn(10, 5), 4)  # [10, 3 + 4]: codes, then float16 scale and offset
    packing.check_rowwise_qparams(fused, 4)
    q = fused[:, 3:].contiguous().view(torch.float16)
    q[9, 1] = float("nan")
    fused[:, 3:] = q.view(torch.uint8)
    with pytest.raises(ValueError, match=r"row 9 has scale .* and offset nan"):
        packing.check_rowwise_qparams(fused, 4, rows_per_chunk=4)  # the last chunk, not the first


def test_include_last_offset_must_be_a_bool(art):
    # "yes" loaded and failed at the first call, inside the op
    _rehashed(art, lambda m: m["layers"]["emb"].update(include_last_offset="yes"))
    with pytest.raises(ArtifactError, match=r"layer 'emb' \(RowwiseEmbeddingBag\): its entry is malformed "
                                            r"\(ValueError: RowwiseEmbeddingBag include_last_offset='yes'"):
        load(art, model=TinyCTR)


def test_a_model_built_with_other_table_sizes_is_not_the_exported_one(art):
    # a 60-row model took the artifact's 50-row table with only an hparams warning
    with pytest.raises(ArtifactError, match=r"layer 'emb' holds a 50 x 8 weight in the artifact, but the model passed "
                                            r"as model= has EmbeddingBag weight \[60, 8\]"), \
            pytest.warns(UserWarning, match=r"other hparams than the exported one \(vocab: given 60, exported 50\)"):
        load(art, model=TinyCTR(vocab=60))
    with pytest.raises(ArtifactError, match=r"layer 'mlp.0' holds a 32 x 12 weight in the artifact, but the model "
                                            r"passed as model= has Linear weight \[16, 12\]"), pytest.warns(UserWarning):
        load(art, model=TinyCTR(hidden=16))
    load(art, model=TinyCTR(vocab=50))


def _tiny_dlrm(tmp_path):
    from hwaware.recsys import DLRM

    torch.manual_seed(0)
    model = DLRM(table_sizes=(7, 9, 11), embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8,)).eval()
    dense, sparse = torch.randn(6, 13), torch.stack([torch.randint(0, n, (6,)) for n in (7, 9, 11)], 1)
    return export(model, tmp_path / "dlrm", example_inputs=(dense, sparse)).path


def test_dlrm_hparams_edited_to_other_table_sizes_are_refused_at_load(tmp_path):
    path = _tiny_dlrm(tmp_path)
    load(path)
    _rehashed(path, lambda m: m["model"]["hparams"].update(table_sizes=[7, 10, 11]))
    with pytest.raises(ArtifactError, match=r"layer 'embeddings.1' holds a 9 x 4 weight in the artifact, but "
                                            r"DLRM\(\*\*hparams recorded at export\) has EmbeddingBag weight \[10, 4\]"):
        load(path)


def test_dlrm_hparams_listing_more_tables_than_the_file_holds_are_refused_before_building(tmp_path, monkeypatch):
    # 300k table sizes took 171 s and 1.6 GB to build before the weights check refused them
    from hwaware.export import exporter

    path = _tiny_dlrm(tmp_path)
    _rehashed(path, lambda m: m["model"]["hparams"].update(table_sizes=[3] * 300_000))

    def never(*args, **kwargs):
        raise AssertionError("built the model")

    monkeypatch.setattr(exporter, "build_recorded", never)
    with pytest.raises(ArtifactError, match=r"the recorded hparams list 300003 tables / layers, but weights.safetensors "
                                            r"holds \d+ tensors"):
        load(path)


class _PaddedTokens(torch.nn.Module):
    """Mean of the non-padding token rows: forward reads the table's padding_idx."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8, padding_idx=0)
        self.out = torch.nn.Linear(8, 2)

    def forward(self, ids):
        keep = (ids != self.emb.padding_idx).unsqueeze(-1).float()
        return self.out((self.emb(ids) * keep).sum(1) / keep.sum(1).clamp_min(1))


def test_an_embeddings_padding_idx_is_kept_and_checked(tmp_path):
    # the packed nn.Embedding said padding_idx None: a forward masking with it computed something else
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (6, 5))
    ids[:, 3:] = 0
    art = export(_PaddedTokens(), tmp_path / "a", example_inputs=(ids,))
    assert art.model.emb.padding_idx == 0 and art.manifest["layers"]["emb"]["padding_idx"] == 0
    served = load(art.path, model=_PaddedTokens())
    assert served.emb.padding_idx == 0 and torch.equal(served(ids), art.model(ids))
    # an artifact that does not record it (as earlier ones): the model's is taken
    _rehashed(art.path, lambda m: m["layers"]["emb"].pop("padding_idx"))
    assert load(art.path, model=_PaddedTokens()).emb.padding_idx == 0
    _rehashed(art.path, lambda m: m["layers"]["emb"].update(padding_idx=2))
    with pytest.raises(ArtifactError, match=r"layer 'emb' has padding_idx=2 in the artifact, but the model passed as "
                                            r"model= has a Embedding with padding_idx=0 there"):
        load(art.path, model=_PaddedTokens())
