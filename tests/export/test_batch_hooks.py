"""Export's gate runs the model on validation batches as Lightning's validation loop hands them to it:
through the LightningModule's on_before_batch_transfer, transfer_batch_to_device and
on_after_batch_transfer. A plain nn.Module, or a LightningModule keeping Lightning's own hooks, is
run on the loader's batches as they are."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics.classification import BinaryAUROC

from hwaware.export import export
from hwaware.export.exporter import _evaluate

D = 8


def _xy(n: int = 256, seed: int = 0):
    """Standardised features and a label that x[:, 0] predicts well."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = ((x[:, 0] + 0.5 * torch.randn(n, generator=g)) > 0).float()
    return x, y


def _raw_loader():
    """Features stored in raw units, (x - 3) / 10: only the module's hook makes them the model's."""
    x, y = _xy()
    return DataLoader(TensorDataset((x - 3.0) / 10.0, y), batch_size=64)


class _Net(pl.LightningModule):
    """x -> one logit; its score is relu(2 * x[:, 0]), so inputs in raw units (all x[:, 0] < 0)
    score every sample 0 (AUROC 0.5) while standardised ones rank the samples well."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(D, 16)
        self.head = nn.Linear(16, 1)
        with torch.no_grad():
            self.l1.weight[0] = 0.0
            self.l1.weight[0, 0] = 2.0
            self.l1.bias[0] = 0.0
            self.head.weight.zero_()
            self.head.weight[0, 0] = 1.0
            self.head.bias.zero_()
        self.val_auroc = BinaryAUROC()

    def forward(self, x):
        return self.head(F.relu(self.l1(x))).squeeze(-1)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_auroc.update(self(x), y.long())
        self.log("val_auroc", self.val_auroc)


class _NormInAfterTransfer(_Net):
    """Normalises the raw features where Lightning's docs put GPU-side transforms."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x * 10.0 + 3.0, y


def test_gate_measures_the_batches_lightning_validates(tmp_path):
    model, val = _NormInAfterTransfer(), _raw_loader()
    art = export(model, tmp_path / "art", val_dataloader=val, metric="auroc", max_drop=1.0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    validated = trainer.validate(model, val, verbose=False)[0]["val_auroc"]
    assert validated > 0.8
    # the raw batches would score 0.5: the gate ran on what the hook makes of them
    assert art.report["reference"] == pytest.approx(validated, abs=1e-6)
    assert art.report["batch_hooks"] == ["on_after_batch_transfer"]
    assert art.report["exported"] == pytest.approx(validated, abs=0.01)
    assert art.manifest["regression"]["batch_hooks"] == ["on_after_batch_transfer"]


class _DictData(Dataset):
    def __init__(self) -> None:
        self.x, self.y = _xy()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "click": self.y[i]}


class _DictToTuple(_Net):
    """Dict batches (no key the gate knows as a label) made (x, y) tuples before the transfer; every
    hook records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(("on_before_batch_transfer", type(batch).__name__, dataloader_idx))
        return batch["features"], batch["click"]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.calls.append(("transfer_batch_to_device", type(batch).__name__, device, dataloader_idx))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(("on_after_batch_transfer", type(batch).__name__, dataloader_idx))
        return batch


def test_dict_batches_made_tuples_by_a_hook_export_end_to_end(tmp_path):
    model, val = _DictToTuple(), DataLoader(_DictData(), batch_size=64)
    art = export(model, tmp_path / "art", val_dataloader=val, metric="auroc", max_drop=0.05)
    assert art.report["passed"] and art.report["reference"] > 0.8
    assert art.report["target"] == "batch[-1] (the last of 2 elements)"  # read off the hooked batch
    assert art.report["batch_hooks"] == ["on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer"]
    # Lightning's order and arguments, batch after batch
    cpu = torch.device("cpu")
    assert model.calls[:6] == [("on_before_batch_transfer", "dict", 0), ("transfer_batch_to_device", "tuple", cpu, 0),
                               ("on_after_batch_transfer", "tuple", 0)] * 2
    hand = _NormInAfterTransfer()  # the same weights; its gate read on (x, y) batches
    x, y = _xy()
    assert art.report["reference"] == pytest.approx(_evaluate(hand, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)],
                                                              "auroc", None), abs=0)


class _NeedsTrainer(_NormInAfterTransfer):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.validating:
            return super().on_after_batch_transfer(batch, dataloader_idx)
        return batch


def test_a_hook_that_fails_outside_a_trainer_is_named(tmp_path):
    model, val = _NeedsTrainer(), _raw_loader()
    with pytest.raises(RuntimeError, match=r"_NeedsTrainer\.on_after_batch_transfer\(batch, 0\) raised RuntimeError") as e:
        export(model, tmp_path / "art", val_dataloader=val, metric="auroc", max_drop=1.0)
    assert "self.trainer" in str(e.value) and "batch_hooks=False" in str(e.value)
    assert not (tmp_path / "art").exists()
    # what the message offers: batches already as the step takes them, hooks off
    x, y = _xy()
    art = export(model, tmp_path / "art", val_dataloader=[(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)],
                 metric="auroc", max_drop=1.0, batch_hooks=False)
    assert "batch_hooks" not in art.report and art.report["reference"] > 0.8


class _PlainWithHookNames(nn.Module):
    """Not a LightningModule: a method named like a batch hook is no hook."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _Net()

    def forward(self, x):
        return self.net(x)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        raise AssertionError("export called a plain module's method as a Lightning hook")


@pytest.mark.parametrize("make", [_PlainWithHookNames, _Net], ids=["plain_nn_module", "lightning_default_hooks"])
def test_modules_without_batch_hooks_are_gated_on_the_loader_as_it_is(tmp_path, make):
    model, val = make(), _raw_loader()
    art = export(model, tmp_path / "art", val_dataloader=val, metric="auroc", max_drop=1.0)
    assert "batch_hooks" not in art.report
    assert art.report["reference"] == pytest.approx(_evaluate(make(), val, "auroc", None), abs=0)
    assert art.report["reference"] == pytest.approx(0.5, abs=0.02)  # raw units: relu(2 * x[:, 0]) is 0
