"""Tests for hwaware.recsys.dlrm: DLRM structure, forward math, Lightning loop, evaluate_auroc."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from hwaware.recsys.criteo import DEFAULT_TABLE_SIZES, NUM_DENSE, NUM_SPARSE, CriteoDataModule
from hwaware.recsys.dlrm import DLRM, evaluate_auroc

TINY_TABLES = (20, 5, 40, 3) * 6 + (9, 2)  # 26 tables
TINY = dict(table_sizes=TINY_TABLES, embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(16,))


def _inputs(batch, tables=TINY_TABLES, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, NUM_DENSE, generator=g) * 3  # [B, 13]
    sparse = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in tables], dim=1)  # [B, 26]
    return dense, sparse


def _trainer(**kwargs):
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        yield


def test_default_structure():
    model = DLRM()
    assert len(model.embeddings) == NUM_SPARSE
    for emb, size in zip(model.embeddings, DEFAULT_TABLE_SIZES):
        assert type(emb) is nn.EmbeddingBag and emb.mode == "sum"
        assert emb.weight.shape == (size, 16)
    assert isinstance(model.bottom_mlp, nn.Sequential) and isinstance(model.top_mlp, nn.Sequential)
    for layer in [*model.bottom_mlp, *model.top_mlp]:
        assert type(layer) in (nn.Linear, nn.ReLU)
    bottom_linears = [m for m in model.bottom_mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in bottom_linears] == [(13, 64), (64, 16)]
    top_linears = [m for m in model.top_mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in top_linears] == [(16 + 351, 256), (256, 128), (128, 1)]
    assert model.top_mlp[-1] is top_linears[-1]  # ends with the bare logit layer
    assert model.hparams.table_sizes == DEFAULT_TABLE_SIZES


def test_forward_shape_and_dtype():
    model = DLRM(**TINY)
    dense, sparse = _inputs(37)
    logits = model(dense, sparse)
    assert logits.shape == (37,) and logits.dtype == torch.float32


def test_forward_matches_reference_interaction():
    torch.manual_seed(0)
    model = DLRM(**TINY)
    dense, sparse = _inputs(5)
    x = model.bottom_mlp(dense)  # [B, D]
    vectors = [x] + [emb.weight[sparse[:, t]] for t, emb in enumerate(model.embeddings)]
    pairs = [(vectors[i] * vectors[j]).sum(1) for i in range(27) for j in range(i + 1, 27)]
    expected = model.top_mlp(torch.cat([x, torch.stack(pairs, dim=1)], dim=1)).squeeze(1)
    torch.testing.assert_close(model(dense, sparse), expected)


def test_forward_rejects_wrong_sparse_shape():
    model = DLRM(**TINY)
    dense, sparse = _inputs(4)
    with pytest.raises(ValueError, match=r"sparse must be \[B, 26\], got shape \(4, 25\)"):
        model(dense, sparse[:, :25])
    # a width or dtype the model cannot take: named here, not by a matmul deep inside
    with pytest.raises(ValueError, match=r"dense must be float \[B, 13\], got torch.float32 of shape \(4, 12\)"):
        model(dense[:, :12], sparse)
    with pytest.raises(ValueError, match=r"dense must be float \[B, 13\], got torch.int64 of shape \(4, 13\)"):
        model(dense.long(), sparse)
    with pytest.raises(TypeError, match=r"sparse must hold int64 \(or int32\) ids, got torch.float32"):
        model(dense, sparse.float())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embedding_dim": 16, "bottom_mlp": (64, 32)}, r"bottom_mlp must end at embedding_dim=16.*\(64, 32\)"),
        ({"bottom_mlp": ()}, "bottom_mlp must be a non-empty sequence of positive ints"),
        ({"top_mlp": (0,)}, "top_mlp must be a sequence of positive ints, got \\(0,\\)"),
        ({"table_sizes": ()}, "table_sizes must be a non-empty sequence of positive ints"),
        ({"table_sizes": (10, 0)}, "table_sizes must be a non-empty sequence of positive ints"),
        ({"embedding_dim": 0, "bottom_mlp": (0,)}, "embedding_dim must be a positive int, got 0"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0, got -1.0"),
        ({"interaction_pad": 0}, "interaction_pad must be a positive int, got 0"),
    ],
)
def test_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DLRM(**kwargs)


def test_tiny_fit_logs_val_auroc_and_predicts():
    dm = CriteoDataModule(num_samples=2000, batch_size=128, table_sizes=TINY_TABLES)
    model = DLRM(**TINY)
    trainer = _trainer(max_epochs=1, limit_train_batches=5)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_auroc"} <= set(metrics)
    assert 0.0 <= float(metrics["val_auroc"]) <= 1.0

    (test_result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert test_result["test_auroc"] == pytest.approx(float(metrics["val_auroc"]))  # same rows

    logits = torch.cat(trainer.predict(model, datamodule=dm))
    assert logits.shape == (400,)
    labels = torch.cat([b["label"] for b in dm.val_dataloader()]).long()
    assert evaluate_auroc(model, dm.val_dataloader()) == pytest.approx(binary_auroc(logits, labels).item())


def test_dlrm_learns_the_synthetic_signal():
    dm = CriteoDataModule(num_samples=20_000, batch_size=256, table_sizes=TINY_TABLES, seed=1)
    model = DLRM(**TINY, lr=1e-2)
    _trainer(max_epochs=2, num_sanity_val_steps=0).fit(model, dm)
    assert evaluate_auroc(model, dm.val_dataloader()) > 0.7


def test_evaluate_auroc_restores_mode():
    dm = CriteoDataModule(num_samples=500, batch_size=100, table_sizes=TINY_TABLES)
    dm.setup("fit")
    model = DLRM(**TINY).train()
    auroc = evaluate_auroc(model, dm.val_dataloader())
    assert 0.0 <= auroc <= 1.0 and model.training
    model.eval()
    evaluate_auroc(model, dm.val_dataloader())
    assert not model.training


def test_checkpoint_round_trip(tmp_path):
    dm = CriteoDataModule(num_samples=1000, batch_size=128, table_sizes=TINY_TABLES)
    model = DLRM(**TINY)
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "dlrm.ckpt")
    restored = DLRM.load_from_checkpoint(tmp_path / "dlrm.ckpt")
    dense, sparse = _inputs(8)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(dense, sparse), model(dense, sparse), atol=0, rtol=0)


def test_interaction_pad_appends_zero_columns():
    # TINY: D=4 + 27*26/2 = 351 pairs -> 355; padded to 356 (a multiple of 4, what 2:4 needs)
    torch.manual_seed(0)
    plain = DLRM(**TINY)
    padded = DLRM(**TINY, interaction_pad=4)
    assert plain.top_mlp[0].in_features == 355 and padded.top_mlp[0].in_features == 356
    state = plain.state_dict()
    w = state["top_mlp.0.weight"]
    state["top_mlp.0.weight"] = torch.cat([w, torch.randn(w.shape[0], 1)], dim=1)  # the pad column's weight is irrelevant
    padded.load_state_dict(state)
    dense, sparse = _inputs(8)
    torch.testing.assert_close(padded(dense, sparse), plain(dense, sparse), rtol=1e-6, atol=1e-6)
    assert padded.hparams["interaction_pad"] == 4
