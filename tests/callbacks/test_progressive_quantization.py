"""ProgressiveQuantization on real Lightning Trainers with a tiny CTR model."""
from __future__ import annotations

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn

from hwaware import KLViolationError, ProgressiveQuantization, QuantSpec
from tests.helpers import TinyCTR, loaders, make_trainer, train_with_quant

STATIC_ACT = QuantSpec(granularity="per_tensor", observer="moving_average", averaging_constant=0.1)


class PhaseProbe(Callback):
    """Records (global_step, phase, quantize flags) at every training batch."""

    def __init__(self, cb: ProgressiveQuantization) -> None:
        self.cb = cb
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        flags = {n: (st.weight.quantize, st.weight.observe) for n, st in self.cb.quant_states.items()}
        self.rows.append((trainer.global_step, self.cb.phase, flags))


def _fit(tmp_path, cb, model=None, max_epochs=3, extra=(), **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = model or TinyCTR()
    trainer = make_trainer(tmp_path, [cb, *extra], max_epochs=max_epochs, **trainer_kwargs)
    train, val = loaders()
    trainer.fit(model, train, val)
    return trainer, model


def test_phase_transitions(tmp_path):
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=4, freeze_observers_after=2, activation_spec=STATIC_ACT)
    probe = PhaseProbe(cb)
    trainer, model = _fit(tmp_path, cb, extra=[probe])  # 8 batches per epoch
    phases = [(p["phase"], p["start_epoch"], p["start_step"]) for p in cb.report["phases"]]
    assert phases == [("fp32", 0, 0), ("calibrate", 1, 8), ("qat", 1, 12), ("validate", 3, 24), ("done", 3, 24)]
    by_step = {step: (phase, flags) for step, phase, flags in probe.rows}
    assert by_step[7] == ("fp32", {})
    assert by_step[8][0] == "calibrate" and all(q is False for q, _ in by_step[8][1].values())
    assert by_step[12][0] == "qat" and all(q is True for q, _ in by_step[12][1].values())
    # activation observers froze after 2 QAT batches; after fit every quantizer is frozen
    assert all(bool(st.activation.frozen) for st in cb.quant_states.values() if st.activation is not None)
    assert all(bool(st.weight.frozen) for st in cb.quant_states.values() if st.weight._tracks_weight)
    # layers keep their types and state_dict keys
    assert isinstance(model.mlp[0], nn.Linear) and isinstance(model.emb, nn.EmbeddingBag)
    assert list(model.state_dict()) == list(TinyCTR().state_dict())


def test_qat_forward_is_fake_quantized_and_final_scales_match_final_weights(tmp_path):
    trainer, model, cb = train_with_quant(tmp_path, max_epochs=2, start_epoch=1, calibration_batches=2, activation_spec=None)
    st = cb.quant_states["mlp.0"]
    w = model.mlp[0].weight.detach()
    from hwaware.quant.primitives import as_channels, channel_minmax, compute_qparams, fake_quantize

    scale, zp = compute_qparams(*channel_minmax(as_channels(w, st.weight.spec)), st.weight.spec)
    torch.testing.assert_close(st.weight.scale, scale, atol=0, rtol=0)
    x = torch.randn(5, 12)
    expected = torch.nn.functional.linear(x, fake_quantize(w, scale, zp, st.weight.spec), model.mlp[0].bias)
    torch.testing.assert_close(model.mlp[0](x), expected, atol=0, rtol=0)
    assert not torch.equal(model.mlp[0](x), torch.nn.functional.linear(x, w, model.mlp[0].bias))


def test_lr_scale_applies_at_qat_start(tmp_path):
    lrs = {}

    class Rec(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    _fit(tmp_path, ProgressiveQuantization(start_epoch=1, calibration_batches=2, lr_scale=0.1), extra=[Rec()], max_epochs=2)
    assert lrs[9] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.005) and lrs[15] == pytest.approx(0.005)


def test_calibration_does_not_move_weights(tmp_path):
    weights = {}

    class Rec(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    _fit(tmp_path, ProgressiveQuantization(start_epoch=1, calibration_batches=3), extra=[Rec()], max_epochs=2)
    for k in weights[8]:  # steps 8, 9, 10 calibrate; 11 is the first QAT step
        torch.testing.assert_close(weights[11][k], weights[8][k], atol=0, rtol=0)
    assert not torch.equal(weights[12]["mlp.0.weight"], weights[11]["mlp.0.weight"])
    assert not torch.equal(weights[8]["mlp.0.weight"], weights[7]["mlp.0.weight"])


def test_fp32_reference_is_the_model_at_qat_start(tmp_path):
    snap = {}

    class Snap(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 10:  # 8 fp32 + 2 calibration batches: QAT starts here
                snap.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    _fit(tmp_path, cb, extra=[Snap()], max_epochs=2)
    assert cb.fp32_reference is not None and set(cb.fp32_reference) == set(snap)
    for k, v in snap.items():
        assert cb.fp32_reference[k].device.type == "cpu"
        torch.testing.assert_close(cb.fp32_reference[k], v, atol=0, rtol=0)


def test_plateau_start(tmp_path):
    # min_delta so large that no validation after the first counts as an improvement
    cb = ProgressiveQuantization(start="plateau", monitor="val_loss", mode="min", patience=1, min_delta=10.0, calibration_batches=2)
    _fit(tmp_path, cb, max_epochs=4)
    phases = {p["phase"]: p["start_epoch"] for p in cb.report["phases"]}
    assert phases["calibrate"] == 2  # best set after epoch 0, no improvement after epoch 1
    assert cb.report["metrics_before"]["val_loss"] > 0


def test_plateau_metric_never_logged(tmp_path):
    cb = ProgressiveQuantization(start="plateau", monitor="val_auroc")
    with pytest.raises(ValueError, match="monitor='val_auroc'.*not logged.*val_loss"):
        _fit(tmp_path, cb, max_epochs=2)


def test_kl_logged_every_validation_epoch_during_qat(tmp_path):
    trainer, model, cb = train_with_quant(tmp_path, max_epochs=4, start_epoch=1, calibration_batches=2)
    assert sorted(cb.report["kl_history"]) == ["1", "2", "3"]
    assert {"kl/mlp.0", "kl/mlp.2", "kl/emb"} <= set(trainer.callback_metrics)
    for epoch_kl in cb.report["kl_history"].values():
        assert set(epoch_kl) == {"emb", "mlp.0", "mlp.2"} and all(v >= 0 for v in epoch_kl.values())


def test_validate_reports_kl_and_output_kl(tmp_path):
    trainer, model, cb = train_with_quant(tmp_path, max_epochs=2, start_epoch=1, calibration_batches=2)
    r = cb.report
    assert set(r["kl"]) == {"emb", "mlp.0", "mlp.2"}
    assert all(0 <= v < cb.kl_threshold for v in r["kl"].values())  # int8 passes
    assert all(v > 35 for v in r["sqnr_db"].values())  # int8 layer outputs: >= 45 dB measured
    assert 0 <= r["output_kl"] < 1e-4
    assert r["fallback_layers"] == [] and r["phase"] == "done"


class ProbabilityCTR(TinyCTR):
    """TinyCTR whose forward returns the click probability (sigmoid applied), not the logit."""

    def forward(self, dense, ids):
        return torch.sigmoid(super().forward(dense, ids))

    def _loss(self, batch):
        dense, ids, y = batch
        return torch.nn.functional.binary_cross_entropy(self(dense, ids), y)


class DictPredictions(TinyCTR):
    def predict_step(self, batch, batch_idx=0):
        dense, ids, _ = batch
        return {"row": ids, "logit": self(dense, ids)}


def test_an_output_that_is_not_one_tensor_leaves_the_output_kl_unmeasured_and_says_so(tmp_path):
    """A trial's predict_step returned {"row": ids, "logit": logits}: the output KL compared the ids with
    themselves and reported 0.0. export's gate refuses that output; the output KL now says it cannot read it."""
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    with pytest.warns(UserWarning, match=r"its predict_step returned a dict \(keys \['row', 'logit'\]\) on a "
                                         r"batch, not one tensor.*output KL is not measured.*out\['logits'\]"):
        _fit(tmp_path, cb, model=DictPredictions(), max_epochs=2)
    assert cb.phase == "done" and cb.report["output_kl"] is None and cb.report["kl"]
    told = ProgressiveQuantization(start_epoch=1, calibration_batches=2, output_fn=lambda m, b: m.predict_step(b)["logit"])
    _fit(tmp_path / "b", told, model=DictPredictions(), max_epochs=2)
    assert told.report["output_kl"] > 0


def test_output_kl_of_a_probability_output_follows_output_kind(tmp_path):
    with pytest.warns(UserWarning, match=r"every model output over the KL batches lies in \[0, 1\].*pass "
                                         r"output_kind='probabilities'"):
        *_, as_logits = train_with_quant(tmp_path / "a", model=ProbabilityCTR(), max_epochs=2, start_epoch=1,
                                         calibration_batches=2)
    *_, told = train_with_quant(tmp_path / "b", model=ProbabilityCTR(), max_epochs=2, start_epoch=1,
                                calibration_batches=2, output_kind="probabilities")
    assert told.report["output_kind"] == "probabilities" and as_logits.report["output_kind"] == "logits"
    # same seed, same run: the probabilities read as logits understate the KL several times over
    assert 0 < as_logits.report["output_kl"] < 0.5 * told.report["output_kl"]
    with pytest.raises(ValueError, match=r"output_kind='logit' is invalid; expected one of \('logits', 'probabilities'"):
        ProgressiveQuantization(output_kind="logit")


def test_kl_fallback_raises_precision_and_revalidates(tmp_path):
    w2 = QuantSpec(bits=2, granularity="per_channel")
    trainer, model, cb = train_with_quant(tmp_path, max_epochs=2, start_epoch=1, calibration_batches=2,
                                          weight_spec=w2, kl_threshold=0.005)
    r = cb.report
    assert r["fallback_layers"], r
    for name, label in r["fallbacks"].items():
        assert label in ("int8", "fp32")
        if label == "int8":
            assert r["layers"][name]["weight"].startswith("int8")
        else:
            assert r["layers"][name]["enabled"] is False and r["kl"][name] == 0.0
        # the KL of each step down stays in the report (the current KL of an FP32 layer is 0)
        assert len(r["fallback_kl"][name]) == (1 if label == "int8" else 2)
        assert all(k > 0.005 for k in r["fallback_kl"][name])
    assert set(r["fallback_kl"]) == set(r["fallbacks"])
    assert all(r["kl"][n] <= 0.005 for n in r["kl"])  # re-validated after the fallback


def test_a_group_wise_int4_layer_falls_back_to_int8_per_channel_which_export_packs(tmp_path):
    # int4 g32 on both Linears (TinyCTR(dim=28): K = 32 and 32); mlp.0's KL is ~2e-3 and its int8
    # fallback ~2e-5. Raising only the bit width kept per_group: "int8/g32", which no deploy op
    # packs, so export left the layer FP32 while the report said int8.
    import hwaware

    w4 = QuantSpec(bits=4, granularity="per_group", group_size=32)
    _, model, cb = train_with_quant(tmp_path, model=TinyCTR(dim=28), max_epochs=2, start_epoch=1,
                                    calibration_batches=2, weight_spec=w4, kl_threshold=1e-4)
    r = cb.report
    assert r["fallbacks"] == {"mlp.0": "int8"}
    assert r["layers"]["mlp.0"]["weight"] == "int8/per_channel/sym" and r["layers"]["mlp.2"]["weight"] == "int4/g32/sym"
    art = hwaware.export(model, tmp_path / "art", val_dataloader=loaders()[1], max_drop=1.0)
    assert art.manifest["layers"]["mlp.0"]["scheme"] == "int8" and art.manifest["layers"]["mlp.2"]["scheme"] == "int4"


def test_kl_violation_raise_and_warn(tmp_path):
    w2 = QuantSpec(bits=2, granularity="per_channel")
    with pytest.raises(KLViolationError, match=r"over kl_threshold=1e-09.*mlp\.0"):
        train_with_quant(tmp_path, max_epochs=2, start_epoch=1, calibration_batches=2, weight_spec=w2,
                         kl_threshold=1e-9, on_kl_violation="raise")
    with pytest.warns(UserWarning, match="over kl_threshold"):
        _, _, cb = train_with_quant(tmp_path, max_epochs=2, start_epoch=1, calibration_batches=2, weight_spec=w2,
                                    kl_threshold=1e-9, on_kl_violation="warn")
    assert cb.report["fallback_layers"] == []


def test_skip_patterns(tmp_path):
    _, model, cb = train_with_quant(tmp_path, max_epochs=2, start_epoch=1, calibration_batches=2, skip=["mlp.2", "emb"])
    assert set(cb.quant_states) == {"mlp.0"}
    assert "skip pattern 'mlp.2'" in cb.report["skipped"]["mlp.2"]
    assert type(model.mlp[2]) is nn.Linear


def test_nan_weight_names_the_layer(tmp_path):
    class Poison(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 11:
                with torch.no_grad():
                    pl_module.mlp[0].weight[0, 0] = float("nan")

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    with pytest.raises(ValueError, match=r"mlp\.0\.weight.*NaN/inf"):
        _fit(tmp_path, cb, extra=[Poison()], max_epochs=2)


def test_nan_activation_seen_by_observer_names_the_layer(tmp_path):
    class Poison(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 9:
                batch[0][0, 0] = float("nan")

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=4, activation_spec=STATIC_ACT)
    with pytest.raises(ValueError, match=r"mlp\.0\.input"):
        _fit(tmp_path, cb, extra=[Poison()], max_epochs=2)


def test_freeze_bn_keeps_running_stats(tmp_path):
    stats = []

    class Rec(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stats.append((trainer.global_step, pl_module.mlp[1].running_mean.clone()))

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, freeze_bn=True)
    _fit(tmp_path, cb, model=TinyCTR(bn=True), extra=[Rec()], max_epochs=2)
    qat = [s for step, s in stats if step > 10]
    assert len(qat) >= 4 and all(torch.equal(qat[0], s) for s in qat)
    fp32 = [s for step, s in stats if step <= 8]
    assert not torch.equal(fp32[0], fp32[-1])


def test_lsq_learns_activation_scale(tmp_path):
    spec = QuantSpec(granularity="per_tensor", learnable=True)
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, activation_spec=spec)
    initial = {}

    class Rec(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 10:
                initial.update({n: st.activation.learned_log_scale.detach().clone() for n, st in cb.quant_states.items() if st.activation})

    trainer, _ = _fit(tmp_path, cb, extra=[Rec()], max_epochs=3)
    assert len(trainer.optimizers[0].param_groups) == 2
    changed = [not torch.equal(initial[n], cb.quant_states[n].activation.learned_log_scale.detach()) for n in initial]
    assert initial and all(changed)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(start_epoch=-1), "start_epoch=-1.*int >= 0"),
        (dict(start="loss"), r"start='loss'.*\('epoch', 'plateau'\)"),
        (dict(start="plateau"), "start='plateau' needs monitor"),
        (dict(mode="up"), r"mode='up'.*\('min', 'max'\)"),
        (dict(patience=0), "patience=0"),
        (dict(min_delta=-1.0), "min_delta=-1.0"),
        (dict(calibration_batches=-2), "calibration_batches=-2"),
        (dict(freeze_observers_after=1.5), "freeze_observers_after=1.5"),
        (dict(kl_threshold=0.0), "kl_threshold=0.0"),
        (dict(kl_threshold=float("nan")), "kl_threshold=nan"),
        (dict(on_kl_violation="ignore"), r"on_kl_violation='ignore'.*\('fallback', 'warn', 'raise'\)"),
        (dict(validation_batches=0), "validation_batches=0"),
        (dict(skip=[1]), "skip=.*fnmatch"),
        (dict(skip=3), r"skip=3 is invalid; expected a sequence of fnmatch patterns"),  # a raw TypeError before
        (dict(skip=None), r"skip=None is invalid"),
        (dict(embedding_spec=QuantSpec(granularity="per_channel")), "embedding_spec.granularity='per_channel'"),
        (dict(weight_spec=QuantSpec(granularity="per_row", dynamic=True)), "weight_spec.dynamic=True"),
        (dict(freeze_bn="yes"), "freeze_bn='yes'"),
        (dict(lr_scale=0.0), r"lr_scale=0.0.*\(0, 1\]"),
        (dict(lr_scale=2.0), "lr_scale=2.0"),
    ],
)
def test_progressive_quantization_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveQuantization(**kwargs)


def test_spec_type_error():
    with pytest.raises(TypeError, match="weight_spec must be a hwaware.QuantSpec"):
        ProgressiveQuantization(weight_spec={"bits": 8})


def test_start_epoch_beyond_max_epochs(tmp_path):
    with pytest.raises(ValueError, match=r"start_epoch=5 is invalid for Trainer\(max_epochs=3\)"):
        _fit(tmp_path, ProgressiveQuantization(start_epoch=5), max_epochs=3)


def test_model_without_quantizable_layer(tmp_path):
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class NoLayers(TinyCTR):
        def __init__(self):
            super().__init__()
            self.emb = nn.EmbeddingBag(50, 8, mode="sum")
            self.mlp = nn.Sequential(Custom(12, 1))

    with pytest.raises(ValueError, match=r"no quantizable layer.*overrides forward"):
        _fit(tmp_path, ProgressiveQuantization(start_epoch=1, skip=["emb"]), model=NoLayers())


def _ckpt_run(tmp_path, ckpt_path=None, extra=(), **cb_kwargs):
    pl.seed_everything(0, verbose=False)
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=4, freeze_observers_after=30, activation_spec=STATIC_ACT,
                                 **cb_kwargs)
    mc = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model = TinyCTR()
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=1e-2)
    # Lightning's default sanity check: its validation batches must not move the static observers,
    # or a resumed run (which runs it again) would not end where the uninterrupted one did
    trainer = make_trainer(tmp_path, [cb, mc, *extra], max_epochs=4, enable_checkpointing=True, num_sanity_val_steps=2)
    train, val = loaders()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model, cb


def _assert_state_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: {set(a) ^ set(b)}"
        for k in a:
            _assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_resume_mid_qat_restores_identical_state(tmp_path):
    model_a, cb_a = _ckpt_run(tmp_path / "a")
    ckpt = str(tmp_path / "a" / "ckpt" / "epoch=1.ckpt")  # epoch 1: calibration done, observers still live
    saved = torch.load(ckpt, weights_only=True)
    saved_cb = next(v for k, v in saved["callbacks"].items() if "ProgressiveQuantization" in k)
    assert saved_cb["phase"] == "qat" and not saved_cb["observers_frozen"]
    assert set(saved["state_dict"]) == set(TinyCTR().state_dict())  # plain keys: loads into a fresh model

    restored = {}

    class Capture(Callback):
        def on_train_start(self, trainer, pl_module):
            cb = next(c for c in trainer.callbacks if isinstance(c, ProgressiveQuantization))
            restored.update(copy.deepcopy(cb.state_dict()))
            restored["flags"] = {n: (st.weight.quantize, st.activation.observe) for n, st in cb.quant_states.items() if st.activation}

    model_b, cb_b = _ckpt_run(tmp_path / "b", ckpt_path=ckpt, extra=[Capture()])
    flags = restored.pop("flags")
    _assert_state_equal(saved_cb, restored)
    assert flags and all(q and o for q, o in flags.values())
    # continuing from the checkpoint ends exactly where the uninterrupted run ended
    _assert_state_equal(cb_a.state_dict(), cb_b.state_dict())
    _assert_state_equal(model_a.state_dict(), model_b.state_dict())
    assert cb_a.report == cb_b.report


def test_the_fp32_reference_is_taken_before_calibration_moves_batchnorm(tmp_path):
    """Calibration batches run in train mode and move BatchNorm's running statistics: the reference
    is the model as FP32 training left it, before them."""
    seen = {}

    class AtFp32End(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:  # the last FP32 epoch (QAT starts at epoch 1)
                seen.update({k: v.detach().clone() for k, v in pl_module.state_dict().items() if "mlp.1." in k})

    pl.seed_everything(0, verbose=False)
    model = TinyCTR(bn=True)
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=4)
    trainer = make_trainer(tmp_path / "b", [cb, AtFp32End()], max_epochs=2)
    train, val = loaders()
    trainer.fit(model, train, val)
    assert seen and int(seen["mlp.1.num_batches_tracked"]) > 0
    for k, v in seen.items():
        assert torch.equal(cb.fp32_reference[k], v), k
    assert int(model.state_dict()["mlp.1.num_batches_tracked"]) > int(seen["mlp.1.num_batches_tracked"])  # they moved


class _DictBatches(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        dense, ids, y = self.data[i]
        return {"dense": dense, "ids": ids, "y": y}


class DictCTR(TinyCTR):
    """Trains on dict batches but has no predict_step: the output KL's default call, ``model(batch)``,
    does not fit its ``forward(dense, ids)``."""

    predict_step = pl.LightningModule.predict_step

    def _loss(self, batch):
        return nn.functional.binary_cross_entropy_with_logits(self(batch["dense"], batch["ids"]), batch["y"])


def _dict_loaders():
    from tests.helpers import tiny_data

    return (torch.utils.data.DataLoader(_DictBatches(tiny_data(512)), batch_size=32),
            torch.utils.data.DataLoader(_DictBatches(tiny_data(256, seed=1)), batch_size=32))


_CANNOT_CALL = (r"ProgressiveQuantization \(output KL\): ran the model on a batch \(dict\) as DictCTR\(batch\), which "
                r"raised TypeError: .*missing 1 required positional argument: 'ids'\. Define predict_step\(batch, "
                r"batch_idx\) returning the predictions, or pass output_fn=")


class _Steps(Callback):
    """The phase and global step of every training batch: how far fit got before it raised."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(trainer.global_step)


@pytest.mark.parametrize(("sanity", "start_epoch", "with_val", "steps_before"), [
    (2, 2, True, 0),  # Lightning's default sanity check: its first validation batch, before any training
    (0, 2, True, 8),  # no sanity check: the first validation, after the first FP32 epoch (8 batches)
    (0, 0, True, 0),  # QAT from epoch 0, no validation yet: the first validation batch, read before calibrating
    (0, 2, False, 16),  # no validation loader: the output KL reads training batches; the first calibration one
])
def test_a_model_that_cannot_take_its_batches_fails_at_the_first_batch_not_after_fit(
        tmp_path, sanity, start_epoch, with_val, steps_before):
    pl.seed_everything(0, verbose=False)
    steps = _Steps()
    cb = ProgressiveQuantization(start_epoch=start_epoch, calibration_batches=2)
    trainer = make_trainer(tmp_path, [cb, steps], max_epochs=4, num_sanity_val_steps=sanity)
    train, val = _dict_loaders()
    with pytest.raises(ValueError, match=_CANNOT_CALL):
        trainer.fit(DictCTR(), train, val if with_val else None)
    assert len(steps.seen) == steps_before  # the fit would have run 32 batches
    assert cb.phase == ("fp32" if with_val and start_epoch else "calibrate") and cb.fp32_reference is None


@pytest.mark.parametrize("with_val", [True, False])
def test_the_call_check_has_no_side_effects(tmp_path, with_val):
    """With an output_fn the same model trains. The one-time check (on the sanity check's first
    batch, or without validation on the first calibration batch, mid-training) leaves every module's
    mode, BatchNorm statistics, observers and the RNG as they were: the fit matches one whose check
    is a no-op."""
    class Modes(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.append((pl_module.training, pl_module.mlp[0].training, pl_module.mlp[1].training))

    def fit(check):
        pl.seed_everything(0, verbose=False)
        model = DictCTR(bn=True)
        model.mlp[1].eval()  # a submodule the user keeps in eval mode (statistics frozen)
        calls, modes = [], Modes()
        cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, activation_spec=STATIC_ACT,
                                     output_fn=lambda m, b: calls.append(m.training) or m(b["dense"], b["ids"]))
        if not check:
            cb._check_model_call = lambda *a: setattr(cb, "_call_checked", True)
        trainer = make_trainer(tmp_path / str(check), [cb, modes], max_epochs=3, num_sanity_val_steps=2)
        train, val = _dict_loaders()
        trainer.fit(model, train, val if with_val else None)
        return model, cb, calls, modes.rows

    model_a, cb_a, calls_a, modes_a = fit(True)
    model_b, cb_b, calls_b, modes_b = fit(False)
    assert calls_a[0] is False and len(calls_a) == len(calls_b) + 1  # the check: one call, in eval mode
    assert modes_a == modes_b and set(modes_a) == {(True, True, False)}
    _assert_state_equal(model_a.state_dict(), model_b.state_dict())
    _assert_state_equal(cb_a.state_dict(), cb_b.state_dict())


# ------------------------------------------------------------------------------------------------
# layer_specs: per-layer overrides of the global specs
# ------------------------------------------------------------------------------------------------
INT4_G32 = QuantSpec(bits=4, granularity="per_group", group_size=32)
INT4_ROWS = QuantSpec(bits=4, granularity="per_row", symmetric=False)


def test_layer_specs_mix_int4_and_int8_through_qat_report_and_export(tmp_path):
    # TinyCTR(dim=28): mlp.0 and mlp.2 both have K = 32. int4 group-wise weight-only on mlp.0, an
    # int4 table on emb, the global int8 per-channel weights and per-token activations on mlp.2
    import hwaware

    _, model, cb = train_with_quant(
        tmp_path, model=TinyCTR(dim=28), max_epochs=2, start_epoch=1, calibration_batches=2,
        layer_specs={"mlp.0": {"weight": INT4_G32, "activation": None}, "emb": INT4_ROWS})
    r = cb.report
    assert r["phase"] == "done" and r["fallbacks"] == {}
    assert r["layers"]["mlp.0"]["weight"] == "int4/g32/sym" and r["layers"]["mlp.0"]["activation"] is None
    assert r["layers"]["mlp.2"]["weight"] == "int8/per_channel/sym" and r["layers"]["mlp.2"]["activation"] == "int8/per_row/sym/dyn"
    assert r["layers"]["emb"]["weight"] == "int4/per_row/asym/dyn"  # table scales follow the rows, as for embedding_spec
    assert cb.quant_states["mlp.0"].weight.spec == INT4_G32 and cb.quant_states["mlp.0"].activation is None
    assert set(r["kl"]) == {"emb", "mlp.0", "mlp.2"} and all(v <= cb.kl_threshold for v in r["kl"].values())
    art = hwaware.export(model, tmp_path / "art", val_dataloader=loaders()[1], max_drop=1.0)
    schemes = {n: m["scheme"] for n, m in art.manifest["layers"].items()}
    assert schemes == {"mlp.0": "int4", "mlp.2": "int8", "emb": "rowwise_int4"}


def test_layer_specs_the_first_matching_pattern_wins(tmp_path):
    per_tensor = QuantSpec(bits=8, granularity="per_tensor")
    _, _, cb = train_with_quant(
        tmp_path, model=TinyCTR(dim=28), max_epochs=2, start_epoch=1, calibration_batches=2,
        layer_specs={"mlp.0": INT4_G32, "mlp.*": per_tensor, "*": {"activation": None}})
    layers = cb.report["layers"]
    # mlp.0 matches all three patterns: the first gives its weight; "*"'s weight-only does not apply
    assert layers["mlp.0"]["weight"] == "int4/g32/sym" and layers["mlp.0"]["activation"] == "int8/per_row/sym/dyn"
    assert layers["mlp.2"]["weight"] == "int8/per_tensor/sym" and layers["mlp.2"]["activation"] == "int8/per_row/sym/dyn"
    assert layers["emb"]["weight"] == "int8/per_row/asym/dyn"  # "*" keeps the global table spec
    # a parent name matches every layer under it, as in skip
    _, _, cb = train_with_quant(tmp_path / "parent", model=TinyCTR(dim=28), max_epochs=2, start_epoch=1,
                                calibration_batches=2, layer_specs={"mlp": INT4_G32})
    assert {n: i["weight"] for n, i in cb.report["layers"].items()} == {
        "emb": "int8/per_row/asym/dyn", "mlp.0": "int4/g32/sym", "mlp.2": "int4/g32/sym"}


def test_skip_wins_over_layer_specs(tmp_path):
    _, model, cb = train_with_quant(tmp_path, model=TinyCTR(dim=28), max_epochs=2, start_epoch=1, calibration_batches=2,
                                    skip=["mlp.0"], layer_specs={"mlp.*": INT4_G32})
    assert set(cb.quant_states) == {"emb", "mlp.2"} and type(model.mlp[0]) is nn.Linear
    assert cb.report["skipped"]["mlp.0"] == "matches skip pattern 'mlp.0' (skip wins over layer_specs['mlp.*'])"
    assert cb.report["layers"]["mlp.2"]["weight"] == "int4/g32/sym"


def test_a_layer_specs_group_size_that_does_not_divide_in_features_skips_the_layer(tmp_path):
    # TinyCTR(dim=8): mlp.0 has K = 12, mlp.2 K = 32; as with a global per_group weight_spec
    _, _, cb = train_with_quant(tmp_path, max_epochs=2, start_epoch=1, calibration_batches=2, layer_specs={"mlp.*": INT4_G32})
    assert set(cb.quant_states) == {"emb", "mlp.2"}
    assert cb.report["skipped"]["mlp.0"] == "in_features=12 is not a multiple of group_size=32 (layer_specs['mlp.*'])"


def test_a_layer_specs_group_wise_int4_layer_falls_back_to_int8_per_channel(tmp_path):
    # as test_a_group_wise_int4_layer_falls_back_to_int8_per_channel_which_export_packs, per layer
    import hwaware

    _, model, cb = train_with_quant(tmp_path, model=TinyCTR(dim=28), max_epochs=2, start_epoch=1, calibration_batches=2,
                                    layer_specs={"mlp.*": INT4_G32}, embedding_spec=None, kl_threshold=1e-4)
    r = cb.report
    assert r["fallbacks"] == {"mlp.0": "int8"}
    assert r["layers"]["mlp.0"]["weight"] == "int8/per_channel/sym" and r["layers"]["mlp.2"]["weight"] == "int4/g32/sym"
    art = hwaware.export(model, tmp_path / "art", val_dataloader=loaders()[1], max_drop=1.0)
    assert art.manifest["layers"]["mlp.0"]["scheme"] == "int8" and art.manifest["layers"]["mlp.2"]["scheme"] == "int4"


@pytest.mark.parametrize(
    "layer_specs, error, match",
    [
        ([("mlp.0", INT4_G32)], TypeError, "layer_specs must be a mapping"),
        ({0: INT4_G32}, TypeError, "layer_specs key 0 is a int; expected an fnmatch pattern"),
        ({"": INT4_G32}, ValueError, "layer_specs key '' is invalid"),
        ({"mlp.0": {"bits": 4}}, ValueError, r"layer_specs\['mlp.0'\] has unknown keys \['bits'\].*\('weight', 'activation'\)"),
        ({"mlp.0": "int4"}, TypeError, r"layer_specs\['mlp.0'\] is a str; expected a hwaware.QuantSpec or a dict"),
        ({"mlp.0": {"weight": {"bits": 4}}}, TypeError, r"layer_specs\['mlp.0'\]\['weight'\] must be a hwaware.QuantSpec, got dict"),
        ({"mlp.0": {"weight": None}}, TypeError, r"\['weight'\] must be a hwaware.QuantSpec, got NoneType \(use skip="),
        ({"mlp.0": {"activation": 8}}, TypeError, r"\['activation'\] must be a hwaware.QuantSpec or None"),
    ],
)
def test_layer_specs_refused_at_construction(layer_specs, error, match):
    with pytest.raises(error, match=match):
        ProgressiveQuantization(layer_specs=layer_specs)


@pytest.mark.parametrize(
    "layer_specs, match",
    [
        ({"mlp.0": INT4_G32, "top_mlp.*": INT4_G32},
         r"layer_specs pattern 'top_mlp.\*' matches no quantizable layer of TinyCTR; quantizable layers are: emb, mlp.0, mlp.2"),
        ({"mlp.*": INT4_G32, "mlp.2": QuantSpec()},
         r"layer_specs pattern 'mlp.2' never applies: every layer it matches \(mlp.2\) is matched by an earlier pattern"),
        ({"emb": INT4_G32}, r"layer_specs\['emb'\] for embedding_bag layer 'emb': granularity='per_group' .*expected 'per_row'"),
        ({"emb": QuantSpec(bits=8)}, r"layer_specs\['emb'\] for embedding_bag layer 'emb': granularity='per_channel'"),
        ({"emb": QuantSpec(granularity="per_row", symmetric=True, learnable=True)}, r"layer_specs\['emb'\].*learnable=True is invalid"),
        ({"e*": {"activation": QuantSpec(granularity="per_row", dynamic=True)}},
         r"layer_specs\['e\*'\] for embedding_bag layer 'emb': an activation spec is invalid"),
        ({"mlp.0": QuantSpec(granularity="per_row", dynamic=True)}, r"layer_specs\['mlp.0'\] for linear layer 'mlp.0': weight dynamic=True"),
        ({"mlp.0": QuantSpec(granularity="per_row")}, r"layer_specs\['mlp.0'\] for linear layer 'mlp.0': weight granularity='per_row'"),
    ],
)
def test_layer_specs_refused_when_the_model_is_first_seen(tmp_path, layer_specs, match):
    steps = _Steps()
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, ProgressiveQuantization(start_epoch=1, layer_specs=layer_specs), extra=[steps], max_epochs=2)
    assert steps.seen == []  # at setup, before any training


_MIXED = {"mlp.2": {"weight": INT4_G32, "activation": None}, "emb": INT4_ROWS}


def test_resume_mid_qat_restores_identical_per_layer_specs(tmp_path):
    model_a, cb_a = _ckpt_run(tmp_path / "a", layer_specs=_MIXED)
    ckpt = str(tmp_path / "a" / "ckpt" / "epoch=1.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    saved_cb = next(v for k, v in saved["callbacks"].items() if "ProgressiveQuantization" in k)
    assert saved_cb["phase"] == "qat"
    assert saved_cb["layer_specs"] == [["mlp.2", {"weight": INT4_G32.to_dict(), "activation": None}],
                                       ["emb", {"weight": INT4_ROWS.to_dict()}]]
    assert saved_cb["layers"]["mlp.2"]["weight_spec"] == INT4_G32.to_dict() and saved_cb["layers"]["mlp.2"]["activation_spec"] is None

    restored = {}

    class Capture(Callback):
        def on_train_start(self, trainer, pl_module):
            cb = next(c for c in trainer.callbacks if isinstance(c, ProgressiveQuantization))
            restored.update(copy.deepcopy(cb.state_dict()))
            restored["specs"] = {n: (st.weight.spec, st.activation.spec if st.activation else None) for n, st in cb.quant_states.items()}

    model_b, cb_b = _ckpt_run(tmp_path / "b", ckpt_path=ckpt, extra=[Capture()], layer_specs=_MIXED)
    specs = restored.pop("specs")
    _assert_state_equal(saved_cb, restored)
    assert specs["mlp.2"] == (INT4_G32, None) and specs["emb"] == (INT4_ROWS.replace(dynamic=True, scale_dtype="float16"), None)
    assert specs["mlp.0"] == (QuantSpec(), STATIC_ACT)
    _assert_state_equal(cb_a.state_dict(), cb_b.state_dict())
    _assert_state_equal(model_a.state_dict(), model_b.state_dict())
    assert cb_a.report == cb_b.report


def test_resume_with_other_global_specs_is_refused(tmp_path):
    # the quantized layers' specs come from the checkpoint: resuming under another weight_spec
    # silently trained what the checkpoint planned, not what the callback said
    _ckpt_run(tmp_path / "a")
    ckpt = str(tmp_path / "a" / "ckpt" / "epoch=1.ckpt")
    w4 = QuantSpec(bits=4, granularity="per_group", group_size=32)
    with pytest.raises(ValueError, match=r"other specs \(weight_spec: checkpoint int8/per_channel/sym, this callback "
                                         r"int4/g32/sym\); resume with the specs the checkpoint was written with"):
        _ckpt_run(tmp_path / "b", ckpt_path=ckpt, weight_spec=w4)
    _, cb = _ckpt_run(tmp_path / "c", ckpt_path=str(tmp_path / "a" / "ckpt" / "epoch=0.ckpt"), weight_spec=w4)
    assert cb.report["layers"]["mlp.2"]["weight"] == "int4/g32/sym"  # from FP32: the new spec applies


def test_resume_with_another_skip_is_refused(tmp_path):
    # which layers are quantized comes from the checkpoint: a new skip= was ignored while the callback
    # said it held (the layer trained and exported int8)
    _ckpt_run(tmp_path / "a")
    ckpt = str(tmp_path / "a" / "ckpt" / "epoch=1.ckpt")
    with pytest.raises(ValueError, match=r"by a ProgressiveQuantization with skip=\[\], but this callback has "
                                         r"skip=\['mlp.2'\]; resume with the skip= the checkpoint was written with"):
        _ckpt_run(tmp_path / "b", ckpt_path=ckpt, skip=["mlp.2"])
    _, cb = _ckpt_run(tmp_path / "c", ckpt_path=str(tmp_path / "a" / "ckpt" / "epoch=0.ckpt"), skip=["mlp.2"])
    assert "mlp.2" not in cb.report["layers"] and "mlp.2" in cb.report["skipped"]  # from FP32: the new skip applies


def test_a_resume_under_other_settings_says_which_and_takes_them(tmp_path):
    # kl_threshold, calibration_batches, ... changed at a resume were taken without a word: the run
    # silently was not the one the checkpoint's would have continued
    import warnings

    _ckpt_run(tmp_path / "a")
    ckpt = str(tmp_path / "a" / "ckpt" / "epoch=1.ckpt")
    with pytest.warns(UserWarning, match=r"ProgressiveQuantization: resuming a checkpoint written in phase 'qat' with "
                                         r"other settings than it was written with: kl_threshold=0\.5 \(checkpoint: "
                                         r"0\.01\), validation_batches=2 \(checkpoint: 8\); the values given here apply"):
        _, cb = _ckpt_run(tmp_path / "b", ckpt_path=ckpt, kl_threshold=0.5, validation_batches=2)
    assert cb.kl_threshold == 0.5 and cb.phase == "done"
    with warnings.catch_warnings(record=True) as seen:  # the same settings: nothing said
        warnings.simplefilter("always")
        _ckpt_run(tmp_path / "c", ckpt_path=ckpt)
    assert not [w for w in seen if "other settings" in str(w.message)]


@pytest.mark.parametrize("other", [None, {"mlp.2": INT4_G32, "emb": INT4_ROWS}])
def test_resume_with_other_layer_specs_is_refused(tmp_path, other):
    _ckpt_run(tmp_path / "a", layer_specs=_MIXED)
    ckpt = str(tmp_path / "a" / "ckpt" / "epoch=1.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint was written by ProgressiveQuantization\(layer_specs=\{'mlp.2': "
                                         r"\{'weight': int4/g32/sym, 'activation': None\}.*resume with the layer_specs="):
        _ckpt_run(tmp_path / "b", ckpt_path=ckpt, layer_specs=other)
    # a checkpoint from the FP32 phase has no quantized layer yet: the new layer_specs simply apply
    _, cb = _ckpt_run(tmp_path / "c", ckpt_path=str(tmp_path / "a" / "ckpt" / "epoch=0.ckpt"), layer_specs=other)
    assert cb.report["layers"]["mlp.2"]["weight"] == ("int8/per_channel/sym" if other is None else "int4/g32/sym")
    assert cb.report["layers"]["mlp.2"]["activation"] == STATIC_ACT.short()


def test_a_second_fit_after_qat_finished_is_refused_before_it_trains(tmp_path):
    # the scales were frozen and validated on the final weights: training on would move the weights
    # past them and export would clip them silently
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    _, model = _fit(tmp_path, cb, max_epochs=2)
    assert cb.phase == "done"
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"ProgressiveQuantization already finished \(QAT validated, phase 'done' at "
                                           r"epoch 2\): training on would move the weights away from the scales"):
        _fit(tmp_path / "again", cb, model=model, max_epochs=2)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # not one step was taken


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_kl_validation_feeds_batches_as_lightning_does(tmp_path, precision):
    """End-of-fit KL validation casts the batches to the precision's dtype and runs the module's
    on_before_batch_transfer, as Lightning's loops do (it fed raw float32 batches: a bf16-true or
    64-true model crashed after all of training with a dtype mismatch)."""
    seen = []

    class Hooked(TinyCTR):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            seen.append(batch[0].dtype)
            return batch

    trainer, model, cb = train_with_quant(tmp_path, model=Hooked(), max_epochs=2, start_epoch=1, calibration_batches=2,
                                          trainer_kwargs={"precision": precision})
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float64
    assert cb.phase == "done" and cb.report["output_kl"] is not None and all(k >= 0 for k in cb.report["kl"].values())
    assert set(seen) == {dtype}  # every batch, the callback's too, cast before the hook as Lightning casts it
    assert len(seen) == 2 * 4 + 2 * 8 + cb.validation_batches  # the loops' val and train batches, and the KL pass's


def test_calibration_gradients_do_not_reach_the_first_qat_step(tmp_path):
    """With gradient accumulation the calibration batches since the last optimizer step left their
    FP32 gradients for QAT's first step ("calibration observes, it does not train")."""
    grads = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cb.phase == "qat" and "first" not in grads:
                w = pl_module.mlp[2].weight.grad
                grads["first"] = None if w is None else float(w.norm())

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=6)  # 8 batches an epoch, steps after 4 and 8
    _fit(tmp_path, cb, extra=[Probe()], max_epochs=2, accumulate_grad_batches=4)
    assert cb.phase == "done" and grads["first"] in (None, 0.0)


def test_static_activation_ranges_that_would_never_be_observed_are_refused():
    with pytest.raises(ValueError, match=r"calibration_batches=0 with freeze_observers_after=0 leaves the static activation "
                                         r"ranges of activation_spec unobserved"):
        ProgressiveQuantization(calibration_batches=0, freeze_observers_after=0, activation_spec=STATIC_ACT)
    with pytest.raises(ValueError, match=r"ranges of layer_specs\['mlp.0'\] unobserved"):
        ProgressiveQuantization(calibration_batches=0, freeze_observers_after=0, layer_specs={"mlp.0": {"activation": STATIC_ACT}})
    ProgressiveQuantization(calibration_batches=0, freeze_observers_after=0)  # dynamic activations: nothing to observe
    ProgressiveQuantization(calibration_batches=0, freeze_observers_after=1, activation_spec=STATIC_ACT)


def test_an_override_a_layer_cannot_take_warns_once(tmp_path):
    int4 = QuantSpec(bits=4, granularity="per_group", group_size=64)  # mlp.0 has K = 12
    with pytest.warns(UserWarning) as record:
        _fit(tmp_path, ProgressiveQuantization(start_epoch=1, calibration_batches=2, layer_specs={"mlp.0": int4}), max_epochs=2)
    assert len([w for w in record if "cannot take" in str(w.message)]) == 1


class ReadsWeight(TinyCTR):
    """mlp.0's weight is read by forward itself (F.linear), the module never called."""

    def forward(self, dense, ids):
        e = self.emb(ids, torch.arange(ids.shape[0], device=ids.device))
        h = torch.nn.functional.linear(torch.cat([dense, e], dim=1), self.mlp[0].weight, self.mlp[0].bias)
        return self.mlp[2](self.mlp[1](h)).squeeze(-1)


def test_a_layer_the_model_never_calls_is_left_fp32_with_the_reason(tmp_path):
    """Fake quantization runs in the layer's forward: a weight read directly trained in FP32. The
    report said int8 with KL 0 and export packed it (then crashed: a deploy module has no weight)."""
    import hwaware

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    with pytest.warns(UserWarning, match=r"1 quantized layer\(s\) \['mlp.0'\] were never called by the model"):
        _, model = _fit(tmp_path, cb, model=ReadsWeight(), max_epochs=2)
    r = cb.report
    assert sorted(r["layers"]) == ["emb", "mlp.2"] and "mlp.0" not in r["kl"]
    assert r["skipped"]["mlp.0"].startswith("never called by the model") and type(model.mlp[0]) is nn.Linear
    art = hwaware.export(model, tmp_path / "art", val_dataloader=loaders()[1], max_drop=1.0)
    assert art.manifest["layers"]["mlp.2"]["scheme"] == "int8" and "mlp.0" in art.manifest["dense_layers"]
    assert "never called" in art.manifest["dense_layers"]["mlp.0"]
    dense, ids, _ = next(iter(loaders()[1]))
    served = hwaware.load(art.path, model=ReadsWeight)
    torch.testing.assert_close(served(dense, ids), art.model(dense, ids), atol=0, rtol=0)


def test_validate_or_predict_from_a_checkpoint_runs_and_exports_the_quantized_model(tmp_path):
    """A fresh Trainer(callbacks=[ProgressiveQuantization()]).validate/predict(model, ckpt_path=...)
    restored the callback to phase 'done' but ran the model in FP32, and export then re-quantized it
    post-training (losing skip and fallback decisions). The quantizers are now attached as QAT left them."""
    import hwaware

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, skip=["mlp.2"])
    trainer, model = _fit(tmp_path, cb, max_epochs=2)
    ckpt = str(tmp_path / "final.ckpt")
    trainer.save_checkpoint(ckpt)
    val = loaders()[1]
    want = trainer.validate(model, val, verbose=False)
    preds_want = torch.cat(trainer.predict(model, val))
    art_want = hwaware.export(model, tmp_path / "want", val_dataloader=val, max_drop=1.0, int8_impls=("int_mm",))

    pl.seed_everything(0, verbose=False)
    fresh, cb2 = TinyCTR(), ProgressiveQuantization(start_epoch=1, calibration_batches=2, skip=["mlp.2"])
    t2 = make_trainer(tmp_path / "b", [cb2])
    assert t2.validate(fresh, val, ckpt_path=ckpt, verbose=False) == want
    assert cb2.phase == "done" and sorted(hwaware.quant_states(fresh)) == ["emb", "mlp.0"]
    art = hwaware.export(fresh, tmp_path / "got", val_dataloader=val, max_drop=1.0, int8_impls=("int_mm",))  # (not a timing race)
    assert art.manifest["post_training"] is False and art.report == art_want.report
    assert {k: v["scheme"] for k, v in art.manifest["layers"].items()} == {"emb": "rowwise_int8", "mlp.0": "int8"}

    other = TinyCTR()
    t3 = make_trainer(tmp_path / "c", [ProgressiveQuantization(start_epoch=1, calibration_batches=2, skip=["mlp.2"])])
    torch.testing.assert_close(torch.cat(t3.predict(other, val, ckpt_path=ckpt)), preds_want, atol=0, rtol=0)


def test_a_weights_only_checkpoint_is_said_to_hold_no_quantization_state(tmp_path, capsys):
    """A user trial: ModelCheckpoint(save_weights_only=True) of a QAT run, validated in a new process
    with the same callback: Lightning restored the weights and said nothing, and export packed the
    model post-training (a skipped layer int8, an int4 table int8). Now a warning says so, and the
    artifact's summary and hwaware inspect say how it was quantized."""
    import hwaware
    from hwaware.cli import main

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, skip=["mlp.2"])
    trainer, model = _fit(tmp_path, cb, max_epochs=2)
    ckpt = str(tmp_path / "weights.ckpt")
    trainer.save_checkpoint(ckpt, weights_only=True)
    val = loaders()[1]
    with pytest.warns(UserWarning, match=r"holds no ProgressiveQuantization state.*keeps the state it had \(phase 'done', "
                                         r"2 quantized layer\(s\), from its own fit\)") as got:  # (the same trainer)
        trainer.validate(model, val, ckpt_path=ckpt, verbose=False)
    assert not any("post-training" in str(w.message) for w in got)
    fresh, cb2 = TinyCTR(), ProgressiveQuantization(start_epoch=1, calibration_batches=2, skip=["mlp.2"])
    with pytest.warns(UserWarning, match=r"ProgressiveQuantization: the checkpoint .*weights.ckpt' holds no "
                                         r"ProgressiveQuantization state \(saved with ModelCheckpoint\(save_weights_only=True\)"
                                         r".*phase 'fp32': the model runs unquantized.*post-training export"):
        make_trainer(tmp_path / "b", [cb2]).validate(fresh, val, ckpt_path=ckpt, verbose=False)
    art = hwaware.export(fresh, tmp_path / "art", val_dataloader=val, max_drop=1.0)
    assert art.manifest["post_training"] is True and "quantized: post-training" in repr(art)
    capsys.readouterr()
    assert main(["inspect", art.path]) == 0
    assert "quantized: post-training (the model carried no QAT state: export calibrated it)" in capsys.readouterr().out

    full = str(tmp_path / "full.ckpt")  # with the callback's state: no warning, and QAT's artifact
    trainer.save_checkpoint(full)
    fresh, cb3 = TinyCTR(), ProgressiveQuantization(start_epoch=1, calibration_batches=2, skip=["mlp.2"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*holds no ProgressiveQuantization state")
        make_trainer(tmp_path / "c", [cb3]).validate(fresh, val, ckpt_path=full, verbose=False)
    art = hwaware.export(fresh, tmp_path / "art2", val_dataloader=val, max_drop=1.0)
    assert "quantized: by QAT" in repr(art)


def test_a_checkpoint_saved_during_fit_gets_the_end_of_fit_kl_validation_at_validate(tmp_path):
    """Every checkpoint ModelCheckpoint writes during fit is from before on_fit_end, where the KL
    validation and its fallbacks run: validate(ckpt_path=...) then export shipped int8 every layer the
    run had kept at higher precision (trial: 9 fallbacks lost). validate runs that validation now;
    test / predict, which cannot, warn."""
    import hwaware

    kw = dict(start_epoch=1, calibration_batches=2, weight_spec=QuantSpec(bits=2, granularity="per_channel"),
              kl_threshold=0.005)
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer, model = _fit(tmp_path, ProgressiveQuantization(**kw), max_epochs=2, extra=[saver], enable_checkpointing=True)
    val = loaders()[1]
    want = hwaware.export(model, tmp_path / "want", val_dataloader=val, max_drop=1.0)
    assert want.manifest["dense_layers"] or any(m["scheme"] == "int8" for m in want.manifest["layers"].values())
    last = str(tmp_path / "ckpt" / "last.ckpt")
    assert torch.load(last, weights_only=False)["callbacks"]
    pl.seed_everything(0, verbose=False)
    fresh, cb = TinyCTR(), ProgressiveQuantization(**kw)
    make_trainer(tmp_path / "b", [cb]).validate(fresh, val, ckpt_path=last, verbose=False)
    assert cb.phase == "done" and cb.report["fallbacks"]
    got = hwaware.export(fresh, tmp_path / "got", val_dataloader=val, max_drop=1.0)
    def schemes(art):
        return {n: (m["scheme"], m.get("bits"), m.get("weight")) for n, m in art.manifest["layers"].items()}

    assert schemes(got) == schemes(want) and got.manifest["dense_layers"] == want.manifest["dense_layers"]
    assert got.report["by_impl"] == want.report["by_impl"]  # each int8 implementation: the same metric
    with pytest.warns(UserWarning, match=r"from before the end-of-fit KL validation \(phase 'qat'\), and predict does "
                                         r"not run it.*Run trainer.validate\(model, datamodule, ckpt_path=\.\.\.\)"):
        make_trainer(tmp_path / "c", [ProgressiveQuantization(**kw)]).predict(TinyCTR(), val, ckpt_path=last)


class StepScheduled(TinyCTR):
    """TinyCTR with a per-step StepLR (gamma 0.5 per optimizer step)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
                                                   "interval": "step"}}


class LrAtQAT(Callback):
    """The first QAT batch's learning rate and per-step schedule position, in ``seen``."""

    def __init__(self, qat: ProgressiveQuantization) -> None:
        self.qat, self.seen = qat, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.qat.phase == "qat" and "lr" not in self.seen:
            self.seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
            self.seen["last_epoch"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def test_calibration_leaves_a_per_step_lr_schedule_where_fp32_training_left_it(tmp_path):
    """Lightning steps a per-step scheduler after calibration's gradient-free optimizer steps too:
    16 calibration batches used up 16 steps of the schedule (trial). QAT now starts where FP32 left it."""
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=4)
    at_qat = LrAtQAT(cb)
    seen = at_qat.seen
    trainer, model = _fit(tmp_path, cb, model=StepScheduled(), max_epochs=2, extra=[at_qat])
    # 8 FP32 steps in epoch 0; the 4 calibration steps of epoch 1 do not count
    assert seen == {"lr": 0.05 * 0.5 ** 8, "last_epoch": 8}
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 8 + 4 and trainer.optimizers[0].param_groups[0]["lr"] == 0.05 * 0.5 ** 12  # 4 QAT steps


def test_specs_no_deploy_op_packs_warn_at_setup_and_at_export(tmp_path):
    """A per-tensor (or int4 per-channel) weight spec trained fine and export left every such layer
    FP32, saying so only in dense_layers."""
    import hwaware

    per_tensor = QuantSpec(granularity="per_tensor")
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, weight_spec=per_tensor)
    with pytest.warns(UserWarning, match=r"2 layer\(s\) will train with specs no hwaware deploy op packs.*mlp.0: no deploy "
                                         r"op for int8/per_tensor/sym linear weights"):
        _, model = _fit(tmp_path, cb, max_epochs=2)
    with pytest.warns(UserWarning, match=r"export: 2 layer\(s\) QAT quantized have no deploy op and are exported dense "
                                         r"\(FP32\): mlp.0: no deploy op"):
        art = hwaware.export(model, tmp_path / "art")
    assert set(art.manifest["layers"]) == {"emb"} and {"mlp.0", "mlp.2"} <= set(art.manifest["dense_layers"])


def test_a_never_called_layers_learned_scale_leaves_the_optimizer_so_a_resume_matches(tmp_path):
    """Its LSQ scale stayed in the optimizer's group after the layer was left FP32; a resume, which
    adds the remaining layers' scales, then built a smaller group and Lightning refused the state."""
    def run(path, ckpt=None):
        pl.seed_everything(0, verbose=False)
        cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, weight_spec=QuantSpec(learnable=True))
        mc = ModelCheckpoint(dirpath=str(path / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        model = ReadsWeight()
        model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=1e-2)
        trainer = make_trainer(path, [cb, mc], max_epochs=3, enable_checkpointing=True)
        trainer.fit(model, *loaders(), ckpt_path=ckpt)
        return trainer, model, cb

    with pytest.warns(UserWarning, match="never called"):
        t1, m1, cb1 = run(tmp_path / "a")
    assert [len(g["params"]) for g in t1.optimizers[0].param_groups] == [5, 1]  # mlp.0's scale is gone
    t2, m2, cb2 = run(tmp_path / "b", ckpt=str(tmp_path / "a" / "ckpt" / "epoch=1.ckpt"))
    _assert_state_equal(m1.state_dict(), m2.state_dict())
    _assert_state_equal(cb1.state_dict(), cb2.state_dict())


def test_no_call_tracking_hook_stays_on_the_model(tmp_path):
    """The hooks that find never-called layers came off only at the end of the first QAT epoch: a fit
    ending in calibration, or an error, left them on the user's model."""
    def hooks(m):
        return {n: len(mod._forward_pre_hooks) for n, mod in m.named_modules() if mod._forward_pre_hooks}

    class StopAfterEpoch1(pl.Callback):  # (a max_epochs that cannot reach QAT is refused at fit start)
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch >= 1

    pl.seed_everything(0, verbose=False)
    model = TinyCTR()
    trainer = make_trainer(tmp_path / "a", [ProgressiveQuantization(start_epoch=1, calibration_batches=100),
                                            StopAfterEpoch1()], max_epochs=20)
    with pytest.warns(UserWarning, match=r"fit ended in phase 'calibrate'.*: the fit was stopped early "
                                         r"\(trainer.should_stop\) after 2 epochs"):
        trainer.fit(model, *loaders())
    assert hooks(model) == {}

    class Boom(TinyCTR):
        def training_step(self, batch, i):
            if self.trainer.global_step == 11:
                raise RuntimeError("boom")
            return super().training_step(batch, i)

    with pytest.raises(RuntimeError, match="boom"):
        train_with_quant(tmp_path / "b", model=(boom := Boom()), max_epochs=2, start_epoch=1, calibration_batches=2)
    assert hooks(boom) == {}


# -- schedules Lightning can run in more ways than max_epochs (Lightning-feature trial) ---------------

class EpochLossCTR(TinyCTR):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("epoch_loss", loss.detach(), on_step=False, on_epoch=True)
        return loss


def test_plateau_on_an_epoch_level_training_metric(tmp_path):
    """Lightning aggregates epoch-level training metrics after validation ends: the monitor was
    refused as "not logged" after one epoch, where EarlyStopping takes it."""
    cb = ProgressiveQuantization(start="plateau", monitor="epoch_loss", mode="min", patience=1, min_delta=10.0,
                                 calibration_batches=2)
    _fit(tmp_path, cb, model=EpochLossCTR(), max_epochs=4)
    phases = {p["phase"]: p["start_epoch"] for p in cb.report["phases"]}
    assert phases["calibrate"] == 2  # best after epoch 0, no improvement after epoch 1: as with val_loss


@pytest.mark.parametrize("no_validation", ["limit_val_batches=0", "no val loader"])
def test_plateau_without_validation_reads_training_metrics_and_names_a_val_monitor(tmp_path, no_validation):
    """With no validation loop, on_validation_end never ran: QAT never started, no error, and export
    quantized post-training without a word."""
    kwargs = {"limit_val_batches": 0} if no_validation == "limit_val_batches=0" else {}

    def fit(cb):
        pl.seed_everything(0, verbose=False)
        trainer = make_trainer(tmp_path, [cb], max_epochs=4, **kwargs)
        train, val = loaders()
        trainer.fit(EpochLossCTR(), train, val if kwargs else None)

    with pytest.raises(ValueError, match=r"monitor='val_loss'\): metric not logged; logged metrics are \['epoch_loss', 'train_loss'\] "
                                         r"\(this fit runs no validation"):
        fit(ProgressiveQuantization(start="plateau", monitor="val_loss", mode="min"))
    cb = ProgressiveQuantization(start="plateau", monitor="epoch_loss", mode="min", patience=1, min_delta=10.0,
                                 calibration_batches=2)
    fit(cb)
    assert {p["phase"]: p["start_epoch"] for p in cb.report["phases"]}["calibrate"] == 2 and cb.phase == "done"


@pytest.mark.parametrize("max_steps,calibration", [(10, 2), (17, 2), (16, 0)])
def test_max_steps_that_stop_before_qat_are_refused_before_training(tmp_path, max_steps, calibration):
    """Only max_epochs was checked: max_steps=10 with start_epoch=2 trained FP32 to the end, and
    QAT starting at exactly max_steps was reported 'done' after 0 QAT steps."""
    cb = ProgressiveQuantization(start_epoch=2, calibration_batches=calibration)
    qat_step = 2 * 8 + calibration
    with pytest.raises(ValueError, match=rf"would start QAT at optimizer step {qat_step} \(8 per epoch\), but "
                                         rf"Trainer\(max_steps={max_steps}\) stops before it"):
        _fit(tmp_path, cb, max_epochs=None, max_steps=max_steps)
    ok = ProgressiveQuantization(start_epoch=2, calibration_batches=calibration)
    _fit(tmp_path, ok, max_epochs=None, max_steps=qat_step + 3)
    assert ok.phase == "done" and ok._qat_seen == 3


def test_max_steps_check_counts_a_window_calibration_ends_in_as_a_qat_step(tmp_path):
    """Calibration ending inside an accumulation window drops its gradients, so that window's
    optimizer step trains QAT: max_steps ending right after it was refused as stopping before QAT."""
    acc = dict(accumulate_grad_batches=5)  # 8 batches an epoch: 2 optimizer steps
    with pytest.raises(ValueError, match=r"would start QAT at optimizer step 4 \(2 per epoch\), but Trainer\(max_steps=4\)"):
        _fit(tmp_path, ProgressiveQuantization(start_epoch=2, calibration_batches=1), max_epochs=None, max_steps=4, **acc)
    ok = ProgressiveQuantization(start_epoch=2, calibration_batches=1)
    _fit(tmp_path / "ok", ok, max_epochs=None, max_steps=5, **acc)
    qat = next(p for p in ok.report["phases"] if p["phase"] == "qat")
    assert ok._qat_seen == 4 and qat["start_step"] == 4  # batches 1-4 of epoch 2: step 4 (its 5th) trained them


def test_a_new_callback_removes_the_fake_quant_an_earlier_run_left_on_the_model(tmp_path):
    """The first run's frozen fake quant stayed attached: the second run's FP32 phase trained (and
    measured metrics_before) quantized."""
    from hwaware.quant import quant_states

    first = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    _, model = _fit(tmp_path, first, max_epochs=2)
    assert first.phase == "done" and quant_states(model)

    second = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    probe = PhaseProbe(second)
    with pytest.warns(UserWarning, match=r"the model carries fake quantization from an earlier run on 3 layer\(s\)"):
        _fit(tmp_path / "second", second, model=model, max_epochs=2, extra=[probe])
    fp32_rows = [r for r in probe.rows if r[1] == "fp32"]
    assert len(fp32_rows) == 8 and all(not flags for _, _, flags in fp32_rows)  # nothing attached in FP32
    assert second.phase == "done" and set(quant_states(model)) == set(second.quant_states)
    assert all(quant_states(model)[n] is st for n, st in second.quant_states.items())


class ImprovingCTR(TinyCTR):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("falling", torch.tensor(10.0 - self.current_epoch), on_step=False, on_epoch=True)
        return loss


def test_plateau_reads_each_epoch_s_own_value_of_a_training_metric(tmp_path):
    """trainer.callback_metrics keeps last epoch's value: from epoch 1 on it was read at validation's
    end, a value behind and epoch 0's twice, so a metric improving every epoch 'plateaued' at epoch 2."""
    readings = []

    class Spy(ProgressiveQuantization):
        def _update_plateau(self, metrics):
            readings.append(metrics.get(self.monitor))
            super()._update_plateau(metrics)

    cb = Spy(start="plateau", monitor="falling", mode="min", patience=1, min_delta=0.0, calibration_batches=2)
    with pytest.warns(UserWarning, match="QAT never ran"):
        _fit(tmp_path, cb, model=ImprovingCTR(), max_epochs=4)
    assert readings == [10.0, 9.0, 8.0, 7.0] and cb.phase == "fp32"


def test_learned_weight_scales_stay_positive_under_adamw_and_the_model_exports(tmp_path):
    """Learned directly, AdamW's steps (about lr) were as large as the scales: about half of each
    layer's scales went below zero during QAT, and export refused the layer after the whole run."""
    import hwaware

    model = TinyCTR()
    model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, weight_spec=QuantSpec(learnable=True))
    _fit(tmp_path, cb, model=model, max_epochs=3)
    learned = {n: st.weight for n, st in cb.quant_states.items() if st.weight.learned_log_scale is not None}
    assert sorted(learned) == ["mlp.0", "mlp.2"]  # the Linears (the table's rows are not learnable)
    scales = {n: q.current_scale() for n, q in learned.items()}
    assert all(bool((s > 0).all()) for s in scales.values())
    assert all(not torch.equal(scales[n], q.lsq_base) for n, q in learned.items())  # they were learned
    art = hwaware.export(model, tmp_path / "art")
    for name, s in scales.items():
        if art.manifest["layers"].get(name, {}).get("scheme") == "int8":
            torch.testing.assert_close(art.model.get_submodule(name).w_scale, s, atol=0, rtol=0)


class AuxHead(TinyCTR):
    """An auxiliary head only training_step calls: forward (what the KL batches run) never reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        dense, _, y = batch
        aux = torch.nn.functional.binary_cross_entropy_with_logits(self.aux(dense).squeeze(-1), y)
        return super().training_step(batch, batch_idx) + 0.1 * aux


def test_a_layer_no_kl_batch_reaches_is_reported_unmeasured_not_perfect(tmp_path):
    # it read KL 0.0 and SQNR inf, and a fallback could never trigger for it
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, kl_threshold=1e-12, on_kl_violation="fallback")
    with pytest.warns(UserWarning, match=r"1 quantized layer\(s\) were not called by the model's forward on the KL validation "
                                         r"batches: aux .*None in report\['kl'\]"):
        _fit(tmp_path, cb, model=AuxHead(), max_epochs=2)
    r = cb.report
    assert r["kl"]["aux"] is None and r["sqnr_db"]["aux"] is None and "aux" not in r["fallbacks"]
    assert r["layers"]["aux"]["enabled"]
    # every measured layer exceeded kl_threshold=1e-12 and fell back: those left FP32 read 0.0 (no quantization error)
    assert "fp32" in r["fallbacks"].values()
    assert all(r["kl"][n] == 0.0 and r["sqnr_db"][n] == float("inf") for n in r["fallbacks"] if r["fallbacks"][n] == "fp32")
    assert cb.state_dict()["kl"]["aux"] is None


# -- resumes a trial found ending elsewhere than the uninterrupted run -----------------------------

class BNStepScheduled(StepScheduled):
    def __init__(self) -> None:
        super().__init__(bn=True)


def _step_ckpt_run(path, model_cls, ckpt=None, max_epochs=3, **cb_kwargs):
    """A fit saving a checkpoint after every optimizer step (step=N.ckpt), fresh callback and model."""
    pl.seed_everything(0, verbose=False)
    cb = ProgressiveQuantization(**cb_kwargs)
    mc = ModelCheckpoint(dirpath=str(path / "ckpt"), save_top_k=-1, every_n_train_steps=1, filename="{step}")
    model = model_cls()
    trainer = make_trainer(path, [cb, mc], max_epochs=max_epochs, enable_checkpointing=True)
    trainer.fit(model, *loaders(), ckpt_path=ckpt)
    return model, cb


def test_a_resume_from_an_epochs_last_step_starts_qat_where_the_uninterrupted_run_did(tmp_path):
    """Lightning starts the next epoch without on_train_epoch_start after that resume: QAT started an
    epoch late, or (here) never, and the fit ended FP32 with only a warning."""
    kw = dict(start_epoch=2, calibration_batches=2)
    model_a, cb_a = _step_ckpt_run(tmp_path / "a", TinyCTR, max_epochs=3, **kw)
    model_b, cb_b = _step_ckpt_run(tmp_path / "b", TinyCTR, ckpt=str(tmp_path / "a" / "ckpt" / "step=16.ckpt"),
                                   max_epochs=3, **kw)  # the last step of epoch 1
    assert cb_a.phase == cb_b.phase == "done"
    assert [p["phase"] for p in cb_b.report["phases"]] == [p["phase"] for p in cb_a.report["phases"]]
    _assert_state_equal(model_a.state_dict(), model_b.state_dict())
    _assert_state_equal(cb_a.state_dict()["quantizers"], cb_b.state_dict()["quantizers"])


def test_a_resume_mid_calibration_keeps_the_lr_schedule_and_the_reference_buffers(tmp_path):
    """Two things taken at calibration start and used at QAT start were not in the checkpoint: the
    per-step LR schedule to rewind (QAT then ran at another LR) and the FP32 BatchNorm statistics
    (the gate's reference then had the calibration batches in its running stats)."""
    kw = dict(start_epoch=1, calibration_batches=10)
    model_a, cb_a = _step_ckpt_run(tmp_path / "a", BNStepScheduled, max_epochs=3, **kw)
    # the last step of epoch 1 (calibration from step 8 to 18): a plain DataLoader resumes exactly at an epoch's end
    ckpt = str(tmp_path / "a" / "ckpt" / "step=16.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert next(v for k, v in saved["callbacks"].items() if "ProgressiveQuantization" in k)["phase"] == "calibrate"
    model_b, cb_b = _step_ckpt_run(tmp_path / "b", BNStepScheduled, ckpt=ckpt, max_epochs=3, **kw)
    _assert_state_equal(cb_a.fp32_reference, cb_b.fp32_reference)
    _assert_state_equal(model_a.state_dict(), model_b.state_dict())
    _assert_state_equal(cb_a.state_dict()["quantizers"], cb_b.state_dict()["quantizers"])


def test_a_checkpoint_written_during_kl_validation_validates_again_or_refuses_to_train_on(tmp_path):
    """Phase 'validate' (an interrupt during the end-of-fit KL validation, saved by Lightning's
    OnExceptionCheckpoint): the resumed fit ended with the stale KL of the interrupted validation,
    or trained on against frozen scales."""
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    trainer, model = _fit(tmp_path / "a", cb, max_epochs=2)
    done = cb.state_dict()
    interrupted = {**copy.deepcopy(done), "phase": "validate", "kl": {n: 1.0 for n in done["kl"]},
                   "history": copy.deepcopy(done["history"][:-1])}
    ckpt = tmp_path / "validate.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    key = next(k for k in saved["callbacks"] if "ProgressiveQuantization" in k)
    saved["callbacks"][key] = interrupted
    torch.save(saved, ckpt)

    again = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    pl.seed_everything(0, verbose=False)
    make_trainer(tmp_path / "b", [again], max_epochs=2).fit(TinyCTR(), *loaders(), ckpt_path=str(ckpt))
    assert again.phase == "done" and again.report["kl"] == cb.report["kl"]
    assert [p["phase"] for p in again.report["phases"]] == [p["phase"] for p in cb.report["phases"]]
    with pytest.raises(RuntimeError, match=r"resumed from a checkpoint written during the end-of-fit KL validation"):
        make_trainer(tmp_path / "c", [ProgressiveQuantization(start_epoch=1, calibration_batches=2)],
                     max_epochs=3).fit(TinyCTR(), *loaders(), ckpt_path=str(ckpt))


# ------------------------------------------------------------------------------------------------
# weight observers, the plateau reading across a checkpoint, KL fallback formats, LR scaling of
# other callbacks, batch-shaped activation specs, hooks after an exception, validate() before fit
# ------------------------------------------------------------------------------------------------
def test_weight_observers_see_training_batches_only(tmp_path):
    """A weight spec with a stateful observer (moving_average / histogram) was updated by every
    forward, validation and the sanity check included: limit_val_batches changed the final weights,
    and a resume (whose sanity check runs validation batches again) did not end where the
    uninterrupted run did."""
    def run(path, limit_val, sanity):
        cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, freeze_observers_after=None,
                                     weight_spec=QuantSpec(granularity="per_tensor", observer="moving_average",
                                                           averaging_constant=0.5))
        _, model = _fit(path, cb, max_epochs=3, limit_val_batches=limit_val, num_sanity_val_steps=sanity)
        return model, cb

    model_a, cb_a = run(tmp_path / "a", 1, 0)
    model_b, cb_b = run(tmp_path / "b", 4, 2)
    assert int(cb_a.quant_states["mlp.0"].weight.observer.observed) == 2 + 6 + 8  # calibration + QAT training batches
    _assert_state_equal(model_a.state_dict(), model_b.state_dict())
    _assert_state_equal(cb_a.state_dict()["quantizers"], cb_b.state_dict()["quantizers"])


def _plateau_ckpt_run(path, ckpt=None):
    pl.seed_everything(0, verbose=False)
    cb = ProgressiveQuantization(start="plateau", monitor="epoch_loss", mode="min", patience=1, min_delta=10.0,
                                 calibration_batches=2)
    # at validation end, between the validation and the end of the epoch that reads epoch_loss
    mc = ModelCheckpoint(dirpath=str(path / "ckpt"), save_top_k=-1, filename="{epoch}", save_on_train_epoch_end=False)
    model = EpochLossCTR()
    make_trainer(path, [cb, mc], max_epochs=4, enable_checkpointing=True).fit(model, *loaders(), ckpt_path=ckpt)
    return model, cb


def test_a_plateau_reading_pending_at_a_validation_end_checkpoint_survives_the_resume(tmp_path):
    """start='plateau' on an epoch-level training metric: the reading validation leaves to the end of
    the epoch was not in the checkpoint ModelCheckpoint writes at validation end, so a run resumed
    from it started QAT an epoch late."""
    model_a, cb_a = _plateau_ckpt_run(tmp_path / "a")
    assert {p["phase"]: p["start_epoch"] for p in cb_a.report["phases"]}["calibrate"] == 2
    ckpt = tmp_path / "a" / "ckpt" / "epoch=1.ckpt"
    model_b, cb_b = _plateau_ckpt_run(tmp_path / "b", ckpt=str(ckpt))
    assert cb_b.report["phases"] == cb_a.report["phases"]
    _assert_state_equal(model_a.state_dict(), model_b.state_dict())
    _assert_state_equal(cb_a.state_dict(), cb_b.state_dict())
    saved = torch.load(ckpt, weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if "ProgressiveQuantization" in k)
    assert state["plateau_pending"] is True and isinstance(state["plateau_pending_value"], float)
    # a checkpoint written before the keys existed still loads (its pending reading is lost, as then)
    for key in ("plateau_pending", "plateau_pending_value"):
        del state[key]
    torch.save(saved, tmp_path / "old.ckpt")
    _, cb_c = _plateau_ckpt_run(tmp_path / "c", ckpt=str(tmp_path / "old.ckpt"))
    assert cb_c.phase == "done"


def test_validate_before_fit_does_not_count_toward_the_plateau(tmp_path):
    """trainer.validate() before fit counted as a plateau reading: QAT started earlier than in the same fit."""
    def run(path, pre_validate):
        pl.seed_everything(0, verbose=False)
        model = TinyCTR()
        cb = ProgressiveQuantization(start="plateau", monitor="val_loss", mode="min", patience=2, min_delta=0.02,
                                     calibration_batches=2)
        trainer = make_trainer(path, [cb], max_epochs=6)
        train, val = loaders()
        if pre_validate:
            trainer.validate(model, val, verbose=False)
            assert cb._best is None and cb._wait == 0 and cb.report["metrics_before"] == {}
        trainer.fit(model, train, val)
        return model, cb

    model_a, cb_a = run(tmp_path / "a", False)
    model_b, cb_b = run(tmp_path / "b", True)
    assert cb_b.report["phases"] == cb_a.report["phases"]
    _assert_state_equal(model_a.state_dict(), model_b.state_dict())


INT4_G32_ASYM = QuantSpec(bits=4, granularity="per_group", group_size=32, symmetric=False)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym_table", "sym_table"])
def test_kl_fallback_to_int8_is_the_format_export_packs_and_serves(tmp_path, symmetric):
    """An int4 table fell back to int8 keeping its float16 scales (int8 rows store float32): KL validated
    other rows than export packed, and a symmetric one was refused by export. An asymmetric int4
    group-wise Linear fell back to int8 per-channel asymmetric, which no deploy op packs: export left it
    FP32 while the report said int8. Both now fall back to the int8 format export packs, and the
    exported layers serve exactly what the fallback validated."""
    import hwaware
    from hwaware.ops.packing import dequantize_int8_weight, dequantize_rowwise, unpack_rowwise
    from hwaware.quant.primitives import fake_quantize_dynamic

    table = QuantSpec(bits=4, granularity="per_row", symmetric=symmetric)
    _, model, cb = train_with_quant(tmp_path, model=TinyCTR(dim=28), max_epochs=2, start_epoch=1, calibration_batches=2,
                                    layer_specs={"mlp.0": INT4_G32_ASYM, "emb": table}, kl_threshold=3e-4)
    r = cb.report
    assert r["fallbacks"] == {"mlp.0": "int8", "emb": "int8"}, r["kl"]
    assert r["layers"]["mlp.0"]["weight"] == "int8/per_channel/sym"
    assert r["layers"]["emb"]["weight"] == f"int8/per_row/{'sym' if symmetric else 'asym'}/dyn"
    assert cb.quant_states["emb"].weight.spec.scale_dtype == "float32"  # the int8 row format's
    assert cb.quant_states["mlp.0"].weight.spec == QuantSpec(bits=8, granularity="per_channel", symmetric=True)
    val = loaders()[1]
    art = hwaware.export(model, tmp_path / "art", val_dataloader=val, max_drop=1.0)
    assert art.manifest["layers"]["mlp.0"]["scheme"] == "int8" and art.manifest["layers"]["emb"]["scheme"] == "rowwise_int8"
    assert "mlp.0" not in art.manifest["dense_layers"] and "emb" not in art.manifest["dense_layers"]
    model.eval()
    with torch.no_grad():
        # the Linear: the packed int8 weight is the fake-quantized one KL validated
        lin = art.model.get_submodule("mlp.0")
        validated = cb.quant_states["mlp.0"].weight(model.mlp[0].weight, False)
        torch.testing.assert_close(dequantize_int8_weight(lin.qweight, lin.w_scale), validated, atol=0, rtol=0)
        # the table: the packed rows hold the scales (float32) and codes KL validated, and serve its rows
        spec = cb.quant_states["emb"].weight.spec
        rows, scale, offset, _ = fake_quantize_dynamic(model.emb.weight, spec)
        packed = art.model.get_submodule("emb").weight
        codes, packed_scale, packed_offset = unpack_rowwise(packed, 8, model.emb.embedding_dim)
        torch.testing.assert_close(packed_scale, scale, atol=0, rtol=0)
        if symmetric:  # stored as code + 128 with offset -128 * scale: the dequantized row is q * scale up to one rounding
            torch.testing.assert_close(packed_offset, -128 * scale, atol=0, rtol=0)
            torch.testing.assert_close(dequantize_rowwise(packed, 8, model.emb.embedding_dim), rows, atol=1e-7, rtol=1e-6)
        else:
            torch.testing.assert_close(packed_offset, offset, atol=0, rtol=0)
            torch.testing.assert_close(dequantize_rowwise(packed, 8, model.emb.embedding_dim), rows, atol=0, rtol=0)
        ids = torch.arange(model.emb.num_embeddings)
        offsets = torch.arange(ids.numel())
        torch.testing.assert_close(art.model.get_submodule("emb")(ids, offsets), model.emb(ids, offsets), atol=1e-6, rtol=1e-5)


class StepScheduledSparse(StepScheduled):
    """StepScheduled with widths 2:4 pruning takes (K % 4 == 0 on both Linears)."""

    def __init__(self):
        super().__init__(dim=28)


@pytest.mark.parametrize("sparsity_first", [True, False], ids=["sparsity_first", "quantization_first"])
def test_semi_structured_sparsitys_lr_scale_survives_calibration(tmp_path, sparsity_first):
    """Pruning starting while this callback calibrates (the same start_epoch) scales the LRs; QAT's start
    put back the rates and schedule saved at calibration start, wiping that lr_scale (either order)."""
    from hwaware import SemiStructuredSparsity

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=4)
    at_qat = LrAtQAT(cb)
    seen = at_qat.seen
    sparse = SemiStructuredSparsity(start_epoch=1, lr_scale=0.1)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [sparse, cb, at_qat] if sparsity_first else [cb, sparse, at_qat], max_epochs=2)
    trainer.fit(StepScheduledSparse(), *loaders())
    # 8 FP32 steps in epoch 0; the 4 calibration steps are undone, the pruning's x0.1 is kept
    assert seen["last_epoch"] == 8 and seen["lr"] == pytest.approx(0.05 * 0.5 ** 8 * 0.1, rel=1e-12)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == [pytest.approx(0.005, rel=1e-12)]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 12 * 0.1, rel=1e-12)  # 4 QAT steps
    assert sched.get_last_lr() == [trainer.optimizers[0].param_groups[0]["lr"]]


def test_the_rewind_leaves_rates_no_per_step_schedule_drives():
    """An optimizer without a per-step scheduler (a GAN's second net) was rewound too: another
    callback's lr_scale on it was undone."""
    import types

    from hwaware.callbacks._common import _scale_lr

    p1, p2 = (torch.nn.Parameter(torch.ones(2)) for _ in range(2))
    scheduled, plain = torch.optim.SGD([p1], lr=1.0), torch.optim.SGD([p2], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(scheduled, lambda s: 1.0 / (1 + s))
    trainer = types.SimpleNamespace(optimizers=[scheduled, plain],
                                    lr_scheduler_configs=[types.SimpleNamespace(scheduler=sched, interval="step")])
    cb = ProgressiveQuantization()
    cb._schedules_at_calibration = [[copy.deepcopy(sched.state_dict())],
                                    [[g["lr"] for g in o.param_groups] for o in trainer.optimizers],
                                    [[g.get("initial_lr") for g in o.param_groups] for o in trainer.optimizers]]
    for _ in range(3):  # calibration's gradient-free steps move the scheduled group only
        scheduled.step()
        sched.step()
    _scale_lr(trainer, 0.5)  # SemiStructuredSparsity(lr_scale=0.5) starting meanwhile
    cb._rewind_schedules(trainer)
    assert scheduled.param_groups[0]["lr"] == 0.5 and plain.param_groups[0]["lr"] == 0.5
    assert sched.last_epoch == 0


@pytest.mark.parametrize("where", ["activation_spec", "layer_specs"])
def test_activation_specs_with_a_scale_per_batch_position_are_refused_at_construction(where):
    """activation_spec=QuantSpec(bits=8) (per_channel, QuantSpec's default) kept one static scale per
    batch position: the fit crashed on a smaller last batch, eval on another batch size."""
    kwargs = (dict(activation_spec=QuantSpec(bits=8)) if where == "activation_spec"
              else dict(layer_specs={"mlp.*": {"activation": QuantSpec(bits=8)}}))
    prefix = "activation_spec" if where == "activation_spec" else r"layer_specs\['mlp\.\*'\]\['activation'\]"
    with pytest.raises(ValueError, match=prefix + r": granularity='per_channel' \(int8/per_channel/sym\) is invalid for "
                                      r"activations.*write QuantSpec\(bits=8, granularity='per_row', dynamic=True\)"):
        ProgressiveQuantization(start_epoch=1, **kwargs)
    with pytest.raises(ValueError, match=r"granularity='per_row' with dynamic=False"):
        ProgressiveQuantization(activation_spec=QuantSpec(granularity="per_row"))
    # what activations take
    ProgressiveQuantization(activation_spec=QuantSpec(granularity="per_tensor"))
    ProgressiveQuantization(activation_spec=QuantSpec(granularity="per_tensor", dynamic=True))
    ProgressiveQuantization(layer_specs={"mlp.*": {"activation": QuantSpec(granularity="per_row", dynamic=True)}})


def test_kl_collector_hooks_come_off_after_an_exception_in_validation(tmp_path):
    """An error during a QAT validation left the per-layer KL collector's forward hooks on the user's
    layers: every later call ran each quantized layer twice."""
    class Boom(TinyCTR):
        def validation_step(self, batch, i):
            super().validation_step(batch, i)
            if self.trainer.current_epoch == 1 and i == 1:
                raise RuntimeError("metric failed")

    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2)
    with pytest.raises(RuntimeError, match="metric failed"):
        _fit(tmp_path, cb, model=(model := Boom()), max_epochs=3)
    assert cb.phase == "qat"
    assert {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules() if m._forward_hooks
            or m._forward_pre_hooks} == {}


def test_qat_epochs_ends_the_fit_that_many_epochs_after_qat_starts_and_validates(tmp_path):
    # a plateau start cannot say ahead how long FP32 runs: the README's example trained QAT to
    # max_epochs and failed its own gate; qat_epochs stops fine-tuning where the recipe does
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=4, qat_epochs=1)
    trainer, _ = _fit(tmp_path, cb, max_epochs=6)
    phases = {p["phase"]: p["start_epoch"] for p in cb.report["phases"]}
    assert phases["qat"] == 1 and trainer.current_epoch == 2 and cb.report["kl"]  # epoch 1 trained, then validated
    two = ProgressiveQuantization(start_epoch=1, calibration_batches=4, qat_epochs=2)
    trainer, _ = _fit(tmp_path / "two", two, max_epochs=6)
    assert trainer.current_epoch == 3 and two.report["kl"]
    with pytest.raises(ValueError, match=r"qat_epochs=0 is invalid; expected an int >= 1 or None"):
        ProgressiveQuantization(qat_epochs=0)


def test_qat_epochs_counts_epochs_qat_trained_in_and_a_resume_after_the_last_trains_no_more(tmp_path):
    class QATBatches(Callback):
        def __init__(self, qat):
            self.qat, self.n = qat, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.n += self.qat.phase == "qat"

    # calibration uses up epoch 1 (8 batches): QAT's first epoch is 2, not the one it started in
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=8, qat_epochs=1)
    count = QATBatches(cb)
    trainer, _ = _fit(tmp_path / "a", cb, max_epochs=6, extra=[count])
    assert count.n == 8 and trainer.current_epoch == 3 and cb.report["kl"]
    # the last checkpoint is from before the end-of-fit validation: a resume validates, and trains nothing
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=4, qat_epochs=1)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "b" / "ckpt"), save_last=True)
    _fit(tmp_path / "b", cb, max_epochs=6, extra=[ckpt], enable_checkpointing=True)
    again = ProgressiveQuantization(start_epoch=1, calibration_batches=4, qat_epochs=1)
    count = QATBatches(again)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "b", [again, count], max_epochs=6)
    trainer.fit(TinyCTR(), *loaders(), ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert count.n == 0 and again.phase == "done" and again.report["kl"] == cb.report["kl"]


def test_activation_specs_no_deploy_kernel_serves_warn_at_setup(tmp_path):
    # static per-tensor scales trained fine, and export served every such layer per token or float
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, activation_spec=STATIC_ACT)
    with pytest.warns(UserWarning, match=r"activation spec\(s\) int8/per_tensor/sym: hwaware's deploy kernels quantize a "
                                         r"Linear's input int8/per_row/sym/dyn"):
        _fit(tmp_path, cb, max_epochs=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit(tmp_path / "b", ProgressiveQuantization(start_epoch=1, calibration_batches=2), max_epochs=2)
    assert not [w for w in seen if "activation spec(s)" in str(w.message)]  # the default is what is served


class WarmupCosine(TinyCTR):
    """TinyCTR with a per-step warmup-then-cosine schedule (SequentialLR) annealing towards an eta_min."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt, [torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=4),
                  torch.optim.lr_scheduler.CosineAnnealingLR(opt, 30, eta_min=0.01)], milestones=[4])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lr_scale_holds_through_a_sequential_warmup_cosine_schedule(tmp_path):
    """lr_scale reached neither the schedulers inside SequentialLR nor cosine's eta_min: QAT's rate
    went back towards the unscaled schedule (0.01 at the end instead of 0.0001)."""
    runs = {}
    for scale in (1.0, 0.01):
        lrs = {}

        class Rec(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

        _fit(tmp_path / str(scale), ProgressiveQuantization(start_epoch=1, calibration_batches=2, lr_scale=scale),
             model=WarmupCosine(), extra=[Rec()], max_epochs=3)
        runs[scale] = lrs
    plain, scaled = runs[1.0], runs[0.01]
    assert sorted(plain) == sorted(scaled) == list(range(24))
    assert all(scaled[s] == plain[s] for s in range(10))  # FP32 and calibration (steps 8, 9: rewound at QAT start)
    for s in range(10, 24):
        assert scaled[s] == pytest.approx(0.01 * plain[s], rel=1e-9), s


class TwoNets(TinyCTR):
    """Manual optimization with two optimizers: ``mlp`` and ``emb`` on one, ``critic`` on the other."""

    def __init__(self) -> None:
        super().__init__()
        self.critic = nn.Linear(1, 1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_main, opt_critic = self.optimizers()
        loss = self._loss(batch)
        opt_main.zero_grad()
        self.manual_backward(loss)
        opt_main.step()
        dense, ids, y = batch
        critic_loss = torch.nn.functional.binary_cross_entropy_with_logits(self.critic(self(dense, ids).detach()[:, None]).squeeze(-1), y)
        opt_critic.zero_grad()
        self.manual_backward(critic_loss)
        opt_critic.step()

    def configure_optimizers(self):
        main = [p for n, p in self.named_parameters() if not n.startswith("critic")]
        return torch.optim.SGD(main, lr=self.lr), torch.optim.SGD(self.critic.parameters(), lr=0.01)


def test_learned_scales_go_to_the_optimizer_that_trains_their_layer(tmp_path):
    """Every learned (LSQ) scale went to optimizers[0]: a GAN's discriminator scales were stepped at
    the generator's rate on the generator's loss (a DDP/multi-optimizer trial)."""
    spec = QuantSpec(granularity="per_tensor", learnable=True)
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, weight_spec=QuantSpec(learnable=True),
                                 activation_spec=spec)
    trainer, model = _fit(tmp_path, cb, model=TwoNets(), max_epochs=2)
    main, critic = trainer.optimizers
    in_main = {id(p) for p in main.param_groups[-1]["params"]}
    in_critic = {id(p) for p in critic.param_groups[-1]["params"]}
    assert len(main.param_groups) == 2 and len(critic.param_groups) == 2
    for name, st in cb.quant_states.items():
        for q in st.quantizers():
            if q.learned_log_scale is not None:
                assert id(q.learned_log_scale) in (in_critic if name == "critic" else in_main), name
    assert cb.quant_states["critic"].weight.learned_log_scale is not None
    assert critic.param_groups[-1]["weight_decay"] == 0.0


def test_a_callback_reused_on_a_new_model_starts_from_that_models_own_plateau(tmp_path):
    """A callback that ended a fit in the FP32 phase kept that model's plateau (best, wait): reused
    on a new model it started QAT two epochs before a fresh callback did (a trial)."""
    def qat_start(cb):
        return next(p["start_epoch"] for p in cb.report["phases"] if p["phase"] == "qat")

    kw = dict(start="plateau", monitor="val_loss", mode="min", patience=2, min_delta=1e9, calibration_batches=2)
    reused = ProgressiveQuantization(**kw)
    _fit(tmp_path / "first", reused, max_epochs=2)  # best, then one epoch without improvement: still FP32
    assert reused.phase == "fp32"
    _fit(tmp_path / "second", reused, max_epochs=5)
    fresh = ProgressiveQuantization(**kw)
    _fit(tmp_path / "fresh", fresh, max_epochs=5)
    assert qat_start(fresh) == 3 and qat_start(reused) == 3
    assert reused.report["phases"] == fresh.report["phases"]


class OneCycle(TinyCTR):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=40)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_learned_scales_take_their_layers_group_hyperparameters_a_scheduler_reads(tmp_path):
    """The LSQ param group lacked OneCycleLR's initial_lr / max_lr: a KeyError at QAT's first step
    (a review). It copies the hyperparameters of its layers' group, weight decay off."""
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, weight_spec=QuantSpec(learnable=True),
                                 lr_scale=0.1)
    trainer, _ = _fit(tmp_path, cb, model=OneCycle(), max_epochs=3)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0
    for k in ("lr", "initial_lr", "max_lr", "min_lr", "momentum"):
        assert groups[1][k] == pytest.approx(groups[0][k], rel=1e-12), k


def test_a_plateau_schedulers_default_floor_scales_for_the_group_lsq_adds():
    """ReduceLROnPlateau rebuilds min_lrs from default_min_lr when a group is added: the unscaled
    floor came back and the rate was never reduced again (a review)."""
    import types

    from hwaware.callbacks._common import _scale_lr

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=0.02)
    _scale_lr(types.SimpleNamespace(optimizers=[opt], lr_scheduler_configs=[types.SimpleNamespace(scheduler=sched)]), 0.01)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.001})
    for _ in range(6):
        sched.step(1.0)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(2e-4, rel=1e-12)] * 2


def test_each_epochs_layer_kl_reads_the_first_validation_loader_only(tmp_path):
    """With two validation loaders and fewer batches in the first than validation_batches, the
    epoch's kl_history mixed the second loader's batches in (a loop trial), while the end-of-fit
    KL reads the first only."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from hwaware.callbacks import ProgressiveQuantization
    from tests.helpers import TinyCTR, loaders, make_trainer, tiny_data

    class TwoLoaders(TinyCTR):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self.log("val_loss", self._loss(batch))

    dense, ids, y = tiny_data(64, seed=7).tensors
    other = DataLoader(TensorDataset(dense * 50, ids, y), batch_size=32)  # far larger activations: another KL

    def kl_history(val):
        pl.seed_everything(0, verbose=False)
        cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, validation_batches=8)
        train, first = loaders()
        make_trainer(tmp_path, [cb], max_epochs=3, limit_val_batches=2).fit(TwoLoaders(), train, [first, other][:val])
        return cb.report["kl_history"]

    one, two = kl_history(1), kl_history(2)
    assert sorted(one) == ["1", "2"] and one == two


def test_a_max_epochs_that_ends_inside_calibration_is_refused_at_fit_start(tmp_path):
    """A transformer trial: 10 batches an epoch, calibration_batches=16 from epoch 1, max_epochs=2:
    the fit ended calibrating ("QAT never ran"), and export then packed the model as if QAT-trained."""
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=16)
    trainer = make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=10)
    with pytest.raises(ValueError, match=r"ProgressiveQuantization\(start_epoch=1, calibration_batches=16\) would start QAT "
                                         r"at optimizer step 26 \(10 per epoch\), but Trainer\(max_epochs=2, 20 steps\) stops "
                                         r"before it: lower start_epoch or calibration_batches, or raise max_epochs"):
        trainer.fit(TinyCTR(), *loaders())
    # one calibration batch less than the epoch holds: QAT trains from the epoch's last step
    make_trainer(tmp_path, [ProgressiveQuantization(start_epoch=1, calibration_batches=9)], max_epochs=2,
                 limit_train_batches=10).fit(TinyCTR(), *loaders())


def test_the_schedule_check_counts_each_epochs_accumulation_windows(tmp_path):
    """Lightning restarts accumulation every epoch: 10 batches with accumulate 4 are 3 steps an
    epoch, and calibration over 20 batches from epoch 1 ends with epoch 2, so max_epochs=3 trains no
    QAT step (the check had counted 20 // 4 = 5 steps of calibration and let it through)."""
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=20)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3, limit_train_batches=10, accumulate_grad_batches=4)
    with pytest.raises(ValueError, match=r"would start QAT at optimizer step 9 \(3 per epoch\), but "
                                         r"Trainer\(max_epochs=3, 9 steps\) stops before it"):
        trainer.fit(TinyCTR(), *loaders())
