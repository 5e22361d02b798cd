"""A weight tied between a row-wise int8 table and an int8 layer (a language model's token table and
its output head) is stored once, as the layer's codes; load derives the table's rows from them
(manifest ``derived_rows``, format 3)."""
from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from hwaware import ArtifactError, export, load
from hwaware.export.artifact import read_tensors
from hwaware.ops import packing
from tests.helpers import make_trainer

VOCAB, DIM = 64, 16


class TiedHeadLM(pl.LightningModule):
    """Next-token classifier over a bag of context tokens: token table and output head share one weight."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.tok(ids).mean(1)))

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def validation_step(self, batch, batch_idx):
        ids, y = batch
        self.log("val_loss", F.cross_entropy(self(ids), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def lm_data(n: int, seed: int) -> TensorDataset:
    """The token three of four context tokens repeat (one is noise): read out through the tied weight."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, VOCAB, (n,), generator=g)
    ids = torch.stack([y, y, y, torch.randint(0, VOCAB, (n,), generator=g)], 1)
    return TensorDataset(ids, y)


def lm_loaders():
    return DataLoader(lm_data(512, 0), batch_size=32), DataLoader(lm_data(128, 1), batch_size=32)


def qat_trained(tmp_path) -> TiedHeadLM:
    from hwaware.callbacks import ProgressiveQuantization

    pl.seed_everything(0, verbose=False)
    model = TiedHeadLM()
    cb = ProgressiveQuantization(start_epoch=2, calibration_batches=2)
    train, val = lm_loaders()
    make_trainer(tmp_path, [cb], max_epochs=4, limit_train_batches=16).fit(model, train, val)
    return model


@pytest.fixture(scope="module")
def qat_artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tied")
    model = qat_trained(tmp)
    _, val = lm_loaders()
    ids = next(iter(val))[0]
    art = export(model, tmp / "a", val_dataloader=val, metric="accuracy", max_drop=0.02, example_inputs=(ids,))
    return model, art, val, ids


def test_the_table_is_stored_once_as_the_heads_codes_and_load_derives_it(qat_artifact):
    model, art, _, ids = qat_artifact
    m = art.manifest
    assert m["format_version"] == 3 and m["derived_rows"] == {"tok.weight": "head"} and "tied_tensors" not in m
    assert m["layers"]["tok"]["stored_as"] == "head" and m["layers"]["tok"]["stored_bytes"] == 0
    assert "derived at load (manifest derived_rows)" in m["layers"]["tok"]["note"]
    assert "whose rows load derives from this layer's codes: stored once, here" in m["layers"]["head"]["note"]
    stored = read_tensors(art.path)
    assert "tok.weight" not in stored and not any("tok" in k for k in stored)
    head = art.model.head
    # the served table is the head's symmetric codes, shifted into the row-wise layout
    assert torch.equal(art.model.tok.weight, packing.rowwise_from_int8(head.qweight, head.w_scale))
    codes, scale, offset = packing.unpack_rowwise(art.model.tok.weight, 8)
    assert torch.equal(codes.to(torch.int16) - 128, head.qweight.to(torch.int16))
    assert torch.equal(scale, head.w_scale) and torch.equal(offset, -128 * head.w_scale)
    table = packing.dequantize_rowwise(art.model.tok.weight, 8)
    rows = packing.dequantize_int8_weight(head.qweight, head.w_scale)
    assert ((table - rows).abs() <= head.w_scale[:, None] * 2**-16).all()  # one product's rounding
    # stored once: the head's codes and scales, the body; FP32 counted the tied weight once too
    want = VOCAB * DIM + 4 * VOCAB + (DIM * DIM + 4 * DIM + 4 * DIM)
    assert m["packed_bytes"] == want == sum(t.numel() * t.element_size() for t in stored.values())
    assert m["fp32_bytes"] == 4 * (VOCAB * DIM + DIM * DIM + DIM)
    served = load(art.path, model=TiedHeadLM)
    assert type(served) is TiedHeadLM
    assert torch.equal(served.tok.weight, art.model.tok.weight)
    with torch.no_grad():
        assert torch.equal(served(ids), art.model(ids))
    assert m["program"]["checked"]["exact"] is True


def test_the_gate_measured_the_derived_rows_the_artifact_serves(qat_artifact):
    _, art, val, _ = qat_artifact
    served = load(art.path, model=TiedHeadLM)
    acc = MulticlassAccuracy(num_classes=VOCAB, average="micro")  # as the gate computes it
    with torch.no_grad():
        for ids, y in val:
            acc.update(served(ids), y)
    assert float(acc.compute()) == art.report["exported"]
    assert art.report["passed"] and art.report["reference"] > 0.5  # the tied weight learned the task


def test_a_tied_lm_stores_its_weight_once(tmp_path):
    """512x64 tied table and head: stored in two int8 formats the artifact took 76,288 bytes, 52% of
    FP32's 147,712 (hwaware before derived_rows); once, 39,424 bytes (26.7%)."""
    torch.manual_seed(0)
    art = export(TiedHeadLM(512, 64), tmp_path / "a", example_inputs=(torch.randint(0, 512, (4, 6)),))
    m = art.manifest
    assert m["fp32_bytes"] == 147_712 and m["packed_bytes"] == 512 * 64 + 4 * 512 + (64 * 64 + 2 * 4 * 64) == 39_424
    assert m["derived_rows"] == {"tok.weight": "head"}


class OffsetRows(nn.Module):
    """A table tied to a head whose rows sit on a common +10 with the information in small per-row
    offsets: affine 8-bit rows keep it, symmetric rows (the head's codes) round it away."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.tok.weight
        self.cls = nn.Linear(32, 2)
        with torch.no_grad():
            self.tok.weight.copy_(10 + 0.01 * torch.randn(64, 32, generator=g))
            u = torch.randn(32, generator=g)
            self.cls.weight.copy_(torch.stack([u, -u]))
            self.cls.bias.zero_()

    def forward(self, ids):
        e = self.tok(ids).mean(1)
        return self.cls((e - 10) * 100) + 1e-6 * self.head(e)[:, :2]


def offset_rows_val():
    ids = torch.randint(0, 64, (512, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = OffsetRows()(ids).argmax(1)  # what the FP32 model answers
    return [(ids[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]


def served_accuracy(model, val) -> float:
    acc = MulticlassAccuracy(num_classes=2, average="micro")
    with torch.no_grad():
        for ids, y in val:
            acc.update(model(ids), y)
    return float(acc.compute())


def test_the_gate_measures_the_derived_rows_and_a_table_they_fail_keeps_its_own(tmp_path):
    val = offset_rows_val()
    # a loose gate: the derived rows pass and are what was measured and what load serves
    loose = export(OffsetRows(), tmp_path / "loose", val_dataloader=val, metric="accuracy", max_drop=1.0)
    assert loose.manifest["derived_rows"] == {"tok.weight": "head"}
    served = load(loose.path, model=OffsetRows)
    assert served_accuracy(served, val) == loose.report["exported"] < 0.8  # the symmetric rows cost accuracy
    # a strict one: the derived rows fail it, so the table keeps its own (affine) rows, stored apart
    strict = export(OffsetRows(), tmp_path / "strict", val_dataloader=val, metric="accuracy", max_drop=0.02)
    m = strict.manifest
    assert "derived_rows" not in m and m["format_version"] == 1 and strict.report["passed"]
    assert strict.report["exported"] > 0.95
    note = m["layers"]["tok"]["note"]
    assert f"its rows as the int8 codes of 'head' (symmetric, stored once) scored accuracy {loose.report['exported']:.5f}" in note
    assert "> max_drop: it keeps its own rows" in note and "packed in 2 formats" in note
    assert "tok.weight" in read_tensors(strict.path)
    assert served_accuracy(load(strict.path, model=OffsetRows), val) == strict.report["exported"]


def test_int4_rows_are_not_derived_from_an_int8_head(tmp_path):
    torch.manual_seed(0)
    model = TiedHeadLM()
    art = export(model, tmp_path / "a", example_inputs=(torch.randint(0, VOCAB, (4, 3)),), embedding_bits=4)
    m = art.manifest
    assert "derived_rows" not in m and m["format_version"] == 1
    assert "packed in 2 formats, so the artifact stores that weight 2 times" in m["layers"]["tok"]["note"]
    assert "tok.weight" in read_tensors(art.path)


def _edit(path, fn) -> None:
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    fn(m)
    from hwaware.export.artifact import _manifest_hash

    m["manifest_sha256"] = _manifest_hash(m)
    mpath.write_text(json.dumps(m))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(derived_rows=["tok.weight"]), r"'derived_rows' is \['tok.weight'\]; expected"),
    (lambda m: m.update(derived_rows={"tok.weight": "body.0"}),
     r"derives 'tok.weight' from 'body.0', which is not an Int8Linear layer of the artifact of shape \[64, 16\]"),
    (lambda m: m.update(derived_rows={"tok.weight": "nope"}), r"from 'nope', which is not an Int8Linear layer"),
    (lambda m: m.update(derived_rows={"body.0.qweight": "head"}),
     r"derives 'body.0.qweight', which is not the weight of an 8-bit row-wise table"),
    (lambda m: m.pop("derived_rows"), r"does not match the model: missing \['tok.weight'\]"),
    (lambda m: m.update(tied_tensors={"tok.weight": "head.qweight"}),
     r"derives 'tok.weight', but 'tied_tensors' names it the tensor of 'head.qweight'"),
])
def test_an_edited_derived_rows_entry_is_refused_naming_it(qat_artifact, tmp_path, edit, match):
    import shutil

    _, art, _, _ = qat_artifact
    shutil.copytree(art.path, tmp_path / "a")
    _edit(tmp_path / "a", edit)
    with pytest.raises(ArtifactError, match=match):
        load(tmp_path / "a", model=TiedHeadLM)


@pytest.mark.parametrize("dtype, match", [
    (torch.complex64, r"'head.w_scale' is torch.complex64 \(64,\); .*manifest.json \(its layer entry\) expects torch.float32"),
    (torch.float16, r"'head.w_scale' is torch.float16 \(64,\)"),
    (None, r"layer 'head': w_scale: scale must be finite and > 0 everywhere, got nan at index 3"),
])
def test_a_tampered_head_scale_is_refused_before_rows_are_derived_from_it(qat_artifact, tmp_path, dtype, match):
    """A complex w_scale reached the positivity check first: NotImplementedError "gt_cpu" instead of a refusal."""
    import hashlib
    import shutil

    from safetensors.torch import save_file

    _, art, _, _ = qat_artifact
    shutil.copytree(art.path, tmp_path / "a")
    tensors = {k: v.clone() for k, v in read_tensors(tmp_path / "a").items()}
    if dtype is None:
        tensors["head.w_scale"][3] = float("nan")
    else:
        tensors["head.w_scale"] = tensors["head.w_scale"].to(dtype)
    wpath = tmp_path / "a" / "weights.safetensors"
    wpath.chmod(0o644)
    save_file(tensors, str(wpath))
    data = wpath.read_bytes()
    _edit(tmp_path / "a", lambda m: m["files"].update({"weights.safetensors": {"sha256": hashlib.sha256(data).hexdigest(),
                                                                               "bytes": len(data)}}))
    with pytest.raises(ArtifactError, match=match):
        load(tmp_path / "a", model=TiedHeadLM)


def test_the_notes_count_every_copy_when_another_layer_stores_the_weight_again(tmp_path):
    """Table + int8 head + a second head packed int4: the int8 head's note said "stored once"."""
    from hwaware import QuantSpec

    class TwoHeads(TiedHeadLM):
        def __init__(self) -> None:
            super().__init__(VOCAB, 32)  # (int4 groups of 32)
            self.head2 = nn.Linear(32, VOCAB, bias=False)
            self.head2.weight = self.tok.weight

        def forward(self, ids):
            h = self.body(self.tok(ids).mean(1))
            return self.head(h) + self.head2(h)

    torch.manual_seed(0)
    art = export(TwoHeads(), tmp_path / "a", example_inputs=(torch.randint(0, VOCAB, (4, 3)),),
                 layer_specs={"head2": QuantSpec(bits=4, granularity="per_group", group_size=32)})
    layers = art.manifest["layers"]
    assert art.manifest["derived_rows"] == {"tok.weight": "head"} and layers["head2"]["scheme"] == "int4"
    assert ("packed in 2 formats, so the artifact stores that weight 2 times (FP32 stored it once); 'tok' derive their "
            "rows from this layer's codes") in layers["head"]["note"]
    assert "packed in 2 formats" in layers["head2"]["note"] and "not stored but derived at load" in layers["tok"]["note"]
