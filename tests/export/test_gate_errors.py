"""The regression gate's errors: what the model returned when it is not a tensor, a dtype no deploy op
serves (refused before any pass over the data), and the "predict_step / output_fn" advice only
where the batch did not fit the call."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hwaware.export.exporter as exporter
from hwaware.export import export


def _class_batches(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g, dtype=dtype)
    return [(x[i:i + 32], x[i:i + 32, :4].argmax(1)) for i in (0, 32)]


class _Net(nn.Module):
    """Class scores [B, 4], returned as a tensor, a dict or a tuple (with a feature map)."""

    def __init__(self, out: str = "tensor") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.out = out
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.body(x)
        logits = self.head(h)
        return {"logits": logits, "feat": h} if self.out == "dict" else (logits, h) if self.out == "tuple" else logits


class _WithPredictStep(_Net):
    def predict_step(self, batch, batch_idx=0):
        return self(batch[0])


@pytest.mark.parametrize("out, what, pick", [("dict", r"a dict \(keys \['logits', 'feat'\]\)", r"out\['logits'\]"),
                                             ("tuple", r"a tuple \(len 2\)", r"out\[0\]")])
def test_a_dict_or_tuple_output_names_what_was_returned_and_the_fix(tmp_path, out, what, pick):
    with pytest.raises(TypeError, match=rf"export: the model returned {what} on a validation batch; the regression gate "
                                        rf"needs one tensor of predictions\. Pass output_fn=.*{pick}.*define predict_step"):
        export(_Net(out), tmp_path / "a", val_dataloader=_class_batches(), metric="accuracy", max_drop=1.0)
    with pytest.raises(TypeError, match=rf"export: its predict_step returned {what}"):
        export(_WithPredictStep(out), tmp_path / "a", val_dataloader=_class_batches(), metric="accuracy", max_drop=1.0)
    with pytest.raises(TypeError, match=rf"export: output_fn returned predictions as {what}; .* return the logits tensor"):
        export(_Net(out), tmp_path / "a", val_dataloader=_class_batches(), metric="accuracy", max_drop=1.0,
               output_fn=lambda model, batch: (model(batch[0]), batch[1]))
    with pytest.raises(TypeError, match=r"export: output_fn returned a Tensor; expected \(predictions, target\)"):
        export(_Net(out), tmp_path / "a", val_dataloader=_class_batches(), metric="accuracy", max_drop=1.0,
               output_fn=lambda model, batch: batch[1])
    assert not (tmp_path / "a").exists()
    # output_fn picking the logits: the same model exports
    take = (lambda o: o["logits"]) if out == "dict" else (lambda o: o[0])
    art = export(_Net(out), tmp_path / "ok", val_dataloader=_class_batches(), metric="accuracy", max_drop=1.0,
                 output_fn=lambda model, batch: (take(model(batch[0])), batch[1]))
    assert art.report["passed"]


@pytest.mark.parametrize("gated", [True, False])
def test_a_float64_model_is_refused_up_front_naming_the_dtypes(tmp_path, monkeypatch, gated):
    model = _WithPredictStep().double()
    monkeypatch.setattr(exporter, "_evaluate", lambda *a, **k: pytest.fail("a reference pass ran"))
    kwargs = dict(val_dataloader=_class_batches(torch.float64), metric="accuracy", max_drop=1.0) if gated else {}
    with pytest.raises(TypeError, match=r"export: _WithPredictStep has float64 linear layers \(\['body\.0', 'head'\]\), "
                                        r"and no deploy op serves float64: .* take float32, bfloat16, float16 inputs\. "
                                        r"Convert the model \(e\.g\. model\.float\(\)\)") as info:
        export(model, tmp_path / "a", **kwargs)
    assert "predict_step" not in str(info.value) and "output_fn" not in str(info.value)
    assert model.calls == 0 and not (tmp_path / "a").exists()


class _FailsInside(_Net):
    """Takes the batch, then fails inside (a TypeError of its own)."""

    def forward(self, x):
        h = self.body(x)
        raise TypeError(f"unsupported feature width {h.shape[1]}")


class _FailsInsideWithPredictStep(_FailsInside):
    def predict_step(self, batch, batch_idx=0):
        return self(batch[0])


@pytest.mark.parametrize("cls, how", [(_FailsInside, r"_FailsInside\(\*batch\[:-1\]\)"),
                                      (_FailsInsideWithPredictStep, r"its predict_step\(batch, 0\)")])
def test_an_error_inside_a_model_that_took_the_batch_propagates_without_the_advice(tmp_path, cls, how):
    with pytest.raises(TypeError) as info:
        export(cls(), tmp_path / "a", val_dataloader=_class_batches(), metric="accuracy", max_drop=1.0)
    assert str(info.value) == "unsupported feature width 16"  # the model's own error, as raised
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and "raised inside the model" in notes[0] and how.replace("\\", "") in notes[0]
    # how the batch was split is said, as a condition (the model took it; a bug of its own is likelier)
    split = "(inputs: the batch's first 1 elements; its last is read as the target). If the batch is laid out otherwise"
    assert (split in notes[0]) == (cls is _FailsInside)
    assert cls is _FailsInside or "output_fn" not in notes[0]


def test_a_label_first_batch_gets_the_split_in_the_models_own_error(tmp_path):
    # (y, x): the model is called on the label; torch's error says nothing of the batch's layout
    batches = [(y, x) for x, y in _class_batches()]
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 must have the same dtype") as info:
        export(_Net(), tmp_path / "a", val_dataloader=batches, metric="accuracy", max_drop=1.0)
    assert info.value.__notes__ == [
        "export: raised inside the model, run on a batch (tuple) as _Net(*batch[:-1]) (inputs: the batch's first 1 "
        "elements; its last is read as the target). If the batch is laid out otherwise, define "
        "predict_step(batch, batch_idx) or pass output_fn="]
    assert not (tmp_path / "a").exists()


class _TwoInputs(_Net):
    def forward(self, x, ids):
        return super().forward(x)


class _PredictStepWithExtra(_Net):
    def predict_step(self, batch, batch_idx, dataloader_idx, scale):  # (neither (batch) nor (batch, 0) binds)
        return self(batch[0]) * scale


class _PredictStepWithoutIndex(_Net):
    def predict_step(self, batch):  # Lightning calls it without batch_idx, and so does export
        return self(batch[0])


def test_a_predict_step_without_batch_idx_is_called_with_the_batch_alone(tmp_path):
    art = export(_PredictStepWithoutIndex(), tmp_path / "a", val_dataloader=_class_batches(), metric="accuracy",
                 max_drop=1.0)
    assert art.report["passed"]


@pytest.mark.parametrize("cls, match", [
    (_TwoInputs, r"as _TwoInputs\(\*batch\[:-1\]\), which raised TypeError: .*'ids'\. Define predict_step\(batch, "
                 r"batch_idx\) returning the predictions, or pass output_fn="),
    (_PredictStepWithExtra, r"as its predict_step\(batch, 0\), which raised TypeError: .*\. Make predict_step take "
                            r"\(batch, batch_idx\) and return the predictions, or pass output_fn="),
])
def test_a_batch_that_does_not_fit_the_call_keeps_the_advice(tmp_path, cls, match):
    with pytest.raises(ValueError, match=match):
        export(cls(), tmp_path / "a", val_dataloader=_class_batches(), metric="accuracy", max_drop=1.0)


def test_a_loader_that_draws_samples_at_random_is_gated_on_one_draw(tmp_path):
    """The gate reads the loader once per model it compares: with a sampler drawing at random, three
    exports of one model gave three verdicts (one refused at a drop of 0.047 that was sampling noise).
    Each read now starts from the same random state (hwaware.export.reads), so every model is measured
    on the same draw."""
    from torch.utils.data import DataLoader, RandomSampler

    from tests.helpers import TinyCTR, tiny_data

    data = tiny_data(256, seed=1)
    torch.manual_seed(0)
    model = TinyCTR()
    drops = []
    for i in range(3):
        drawn = DataLoader(data, batch_size=32, sampler=RandomSampler(data, replacement=True, num_samples=128))
        drops.append(export(model, tmp_path / str(i), val_dataloader=drawn, max_drop=0.005).report["drop"])
    assert max(abs(d) for d in drops) < 0.005
    # shuffled without replacement: the same samples each read, and the metric does not depend on order
    in_order = export(model, tmp_path / "b", val_dataloader=DataLoader(data, batch_size=32), max_drop=1.0)
    shuffled = export(model, tmp_path / "c", val_dataloader=DataLoader(data, batch_size=32, shuffle=True), max_drop=1.0)
    assert shuffled.manifest["regression"]["reference"] == pytest.approx(in_order.manifest["regression"]["reference"], abs=1e-6)


class _Stream(torch.utils.data.IterableDataset):
    """A streaming validation set (no __len__): the same samples on every read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, 8, generator=g)
        return iter([(x[i], x[i, :4].argmax()) for i in range(self.n)])


@pytest.mark.parametrize("module", [_Net, "lightning"])
def test_a_loader_over_a_streaming_dataset_is_gated(tmp_path, module):
    """A DataLoader is Sized whatever its dataset, and len() of one over an IterableDataset raises
    TypeError: export crashed on the emptiness check before reading a batch (a PTQ trial)."""
    import pytorch_lightning as pl

    if module == "lightning":
        class Net(pl.LightningModule):  # a batch hook: the gate reads the stream through HookedBatches
            def __init__(self):
                super().__init__()
                self.net = _Net()

            def forward(self, x):
                return self.net(x)

            def on_after_batch_transfer(self, batch, dataloader_idx):
                return [batch[0] * 1.0, batch[1]]
        model = Net()
    else:
        model = module()
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(_Stream(64), batch_size=16)
    with pytest.raises(TypeError):
        len(loader)
    art = export(model, tmp_path / "a", val_dataloader=loader, metric="accuracy", max_drop=1.0)
    listed = export(model, tmp_path / "b", val_dataloader=list(loader), metric="accuracy", max_drop=1.0)
    assert art.report["reference"] == listed.report["reference"] and art.report["exported"] == listed.report["exported"]
    with pytest.raises(ValueError, match=r"export: val_dataloader yielded no batches"):
        export(model, tmp_path / "c", val_dataloader=torch.utils.data.DataLoader(_Stream(0), batch_size=16), metric="accuracy")
    assert not (tmp_path / "c").exists()
