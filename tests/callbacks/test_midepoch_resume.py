"""A run resumed from a checkpoint written inside an epoch (``val_check_interval`` < 1, a loader
Lightning can resume mid-epoch) must go on as the uninterrupted run did: with ``start="plateau"``
reached at a mid-epoch validation, calibration starts at the next epoch's start, not at the resume."""
from __future__ import annotations

import glob
import os

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from hwaware.callbacks import ProgressiveQuantization
from tests.helpers import TinyCTR, make_trainer, tiny_data


class ResumableLoader:
    """Unshuffled batches; Lightning saves its position (state_dict) and a resume skips what was read."""

    def __init__(self, dataset, batch_size):
        self.dl = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        self.n, self.skip = 0, 0

    def __len__(self):
        return len(self.dl)

    def __iter__(self):
        skip, self.skip, self.n = self.skip, 0, 0
        for i, b in enumerate(self.dl):
            if i >= skip:
                self.n = i + 1
                yield b

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.skip = 0 if sd["n"] >= len(self.dl) else sd["n"]


def _fit(tmp_path, name, ckpt=None):
    pl.seed_everything(0, verbose=False)
    model = TinyCTR()
    # min_delta too large to ever improve: the plateau comes at the 3rd validation, the middle of epoch 1
    pq = ProgressiveQuantization(start="plateau", monitor="val_loss", mode="min", patience=2, min_delta=10.0,
                                 calibration_batches=2, qat_epochs=1)
    ckpts = ModelCheckpoint(dirpath=str(tmp_path / name), save_top_k=-1, monitor=None, every_n_epochs=None)
    trainer = make_trainer(tmp_path / name, [pq, ckpts], max_epochs=6, limit_train_batches=None, val_check_interval=0.5,
                           enable_checkpointing=True)
    train = ResumableLoader(tiny_data(256), 32)  # 8 batches an epoch
    val = DataLoader(tiny_data(128, seed=1), batch_size=32)
    trainer.fit(model, train, val, ckpt_path=ckpt)
    return model, pq


def test_a_plateau_reached_mid_epoch_starts_calibration_at_the_next_epoch_after_a_resume(tmp_path):
    model, pq = _fit(tmp_path, "full")
    phases = [(p["phase"], p["start_epoch"], p["start_step"]) for p in pq.report["phases"]]
    assert phases[1] == ("calibrate", 2, 16)  # the plateau came at epoch 1's middle: epoch 2 starts it

    def reached(path):
        state = torch.load(path, weights_only=False)["callbacks"]
        return next(v for k, v in state.items() if "ProgressiveQuantization" in k)["plateau_reached"]

    ckpts = sorted(glob.glob(os.path.join(tmp_path, "full", "*.ckpt")), key=os.path.getmtime)
    first = next(c for c in ckpts if reached(c))
    assert "step=12" in first  # written at that mid-epoch validation
    resumed, rpq = _fit(tmp_path, "resumed", ckpt=first)
    assert [(p["phase"], p["start_epoch"], p["start_step"]) for p in rpq.report["phases"]] == phases
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_evaluating_an_fp32_phase_checkpoint_after_a_qat_fit_runs_it_as_fp32(tmp_path):
    """trainer.predict / validate(ckpt_path=<a checkpoint from before QAT>) after a fit that ran QAT
    (ckpt_path="best" from the FP32 epochs): the checkpoint's FP32 model, as a fresh process restores
    it; the fit's quantizers (scales frozen on the final weights) had run it quantized, and export
    then packed it with them."""
    from hwaware.quant.attach import fp32_reference, quant_states

    pl.seed_everything(0, verbose=False)
    model = TinyCTR()
    pq = ProgressiveQuantization(start_epoch=2, calibration_batches=2)
    ckpts = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_top_k=-1, monitor=None, filename="{epoch}")
    trainer = make_trainer(tmp_path, [pq, ckpts], max_epochs=3, enable_checkpointing=True)
    train = DataLoader(tiny_data(256), batch_size=32)
    val = DataLoader(tiny_data(64, seed=1), batch_size=32)
    trainer.fit(model, train, val)
    assert quant_states(model) and pq.phase == "done"
    fp32_ckpt = str(tmp_path / "ck" / "epoch=0.ckpt")

    fresh_model = TinyCTR()
    fresh = make_trainer(tmp_path / "fresh", [ProgressiveQuantization(start_epoch=2, calibration_batches=2)])
    expected = torch.cat(fresh.predict(fresh_model, val, ckpt_path=fp32_ckpt))
    got = torch.cat(trainer.predict(model, val, ckpt_path=fp32_ckpt))
    assert not quant_states(model) and pq.phase == "fp32" and fp32_reference(model) is None
    assert torch.equal(got, expected)


class EpochLoss(TinyCTR):
    """Logs its training loss per epoch only (on_epoch=True): in callback_metrics from the epoch's end."""

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


def _qat_fit(tmp_path, name, ckpt=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = EpochLoss()
    pq = ProgressiveQuantization(start_epoch=1, calibration_batches=2, qat_epochs=2)
    ckpts = ModelCheckpoint(dirpath=str(tmp_path / name), save_top_k=-1, monitor=None)
    trainer = make_trainer(tmp_path / name, [pq, ckpts], max_epochs=5, enable_checkpointing=True, **trainer_kwargs)
    train = DataLoader(tiny_data(256), batch_size=32)
    val = DataLoader(tiny_data(128, seed=1), batch_size=32)
    trainer.fit(model, train, val, ckpt_path=ckpt)
    return pq


def test_the_reports_metrics_pair_each_epochs_validation_with_its_training_also_after_a_resume(tmp_path):
    """metrics_before / metrics_after were callback_metrics at the phase's last validation: the
    epoch-level training metrics there are the previous epoch's, and a resumed run (Lightning does
    not checkpoint callback_metrics) had none, so its report lost train_loss (a loop trial)."""
    full = _qat_fit(tmp_path, "full")
    after = full.report["metrics_after"]
    assert {"train_loss", "val_loss"} <= set(after) and "train_loss" in full.report["metrics_before"]
    ckpt = next(c for c in sorted(glob.glob(os.path.join(tmp_path, "full", "*.ckpt"))) if "epoch=1" in c)
    resumed = _qat_fit(tmp_path, "resumed", ckpt=ckpt)
    assert resumed.report["metrics_after"] == after
    assert resumed.report["metrics_before"] == full.report["metrics_before"]


def test_a_fit_without_validation_still_reports_its_training_metrics(tmp_path):
    pq = _qat_fit(tmp_path, "noval", limit_val_batches=0)
    assert "train_loss" in pq.report["metrics_before"] and "train_loss" in pq.report["metrics_after"]
    assert pq.report["metrics_before"]["train_loss"] != pq.report["metrics_after"]["train_loss"]


def test_the_warning_names_an_early_stopping_that_ended_the_fit_at_the_plateau(tmp_path):
    import pytest
    from pytorch_lightning.callbacks import EarlyStopping

    pl.seed_everything(0, verbose=False)
    pq = ProgressiveQuantization(start="plateau", monitor="val_loss", mode="min", patience=1, min_delta=10.0,
                                 calibration_batches=2)
    stop = EarlyStopping(monitor="val_loss", mode="min", patience=1, min_delta=10.0)
    trainer = make_trainer(tmp_path, [pq, stop], max_epochs=8)
    with pytest.warns(UserWarning, match=r"QAT never ran .*: EarlyStopping\(monitor='val_loss', patience=1\) stopped the fit "
                                         r"at epoch 1, at the plateau ProgressiveQuantization waits for to start QAT: give "
                                         r"EarlyStopping a larger patience"):
        trainer.fit(TinyCTR(), DataLoader(tiny_data(256), batch_size=32), DataLoader(tiny_data(128, seed=1), batch_size=32))
