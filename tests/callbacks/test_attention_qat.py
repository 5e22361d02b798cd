"""QAT of a transformer through a real Trainer: the attention projections (``in_proj``,
``out_proj`` of every ``nn.MultiheadAttention``, self- and cross-attention) are quantized, resumed,
exported and served like any other Linear layer."""
from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hwaware import QuantSpec
from hwaware.callbacks import ProgressiveQuantization
from hwaware.export import export, load
from hwaware.export.deploy import Int4Linear, Int8Linear
from hwaware.quant import quant_states
from hwaware.quant.attention import RoutedMultiheadAttention
from tests.helpers import make_trainer

VOCAB, DIM, CLASSES, SEQ = 32, 32, 3, 10
ATTENTION = ["enc.layers.0.self_attn.in_proj", "enc.layers.0.self_attn.out_proj", "enc.layers.1.self_attn.in_proj",
             "enc.layers.1.self_attn.out_proj", "pool.in_proj", "pool.out_proj"]


class TinyTransformer(pl.LightningModule):
    """Padded token sequences -> a 2-layer encoder -> learned queries cross-attending over it
    (``key is value``, ``query`` another tensor) -> classes."""

    def __init__(self, lr: float = 3e-3, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(DIM, 4, 64, dropout=dropout, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(2, DIM) * 0.1)
        self.pool = nn.MultiheadAttention(DIM, 4, batch_first=True)
        self.head = nn.Linear(2 * DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x == 0
        h = self.enc(self.emb(x), src_key_padding_mask=pad)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        pooled, _ = self.pool(q, h, h, key_padding_mask=pad, need_weights=False)
        return self.head(pooled.flatten(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx=0):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
    x[torch.arange(SEQ) >= lengths[:, None]] = 0
    y = ((x >= VOCAB // 2).sum(1) * 3 // lengths).clamp(max=CLASSES - 1)
    return TensorDataset(x, y)


def _loaders():
    return DataLoader(_data(256, 0), batch_size=32), DataLoader(_data(128, 1), batch_size=32)


def _fit(tmp_path, max_epochs=3, callbacks=(), ckpt_path=None, dropout=0.1, **qat):
    pl.seed_everything(0, verbose=False)
    model = TinyTransformer(dropout=dropout)
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, **qat)
    trainer = make_trainer(tmp_path, [cb, *callbacks], max_epochs=max_epochs, enable_checkpointing=bool(callbacks))
    trainer.fit(model, *_loaders(), ckpt_path=ckpt_path)
    return model, cb


def test_qat_quantizes_every_attention_projection_and_export_serves_them(tmp_path):
    model, cb = _fit(tmp_path / "fit")
    states = quant_states(model)
    assert all(n in states and states[n].enabled for n in ATTENTION)
    assert all(isinstance(m, RoutedMultiheadAttention) for m in (model.enc.layers[0].self_attn, model.pool))
    assert not any("attn" in n or "pool" in n for n in cb.report["skipped"])
    val = _loaders()[1]
    x = next(iter(val))[0]
    art = export(model, tmp_path / "art", val_dataloader=val, metric="accuracy", max_drop=0.05, example_inputs=(x,))
    for name in ATTENTION:
        assert art.manifest["layers"][name]["scheme"] == "int8", name
        assert art.manifest["layers"][name]["qat_activation"] is not None
    assert isinstance(art.model.pool.in_proj, Int8Linear) and art.model.pool.in_proj_weight is None
    loaded = load(art.path, model=TinyTransformer)  # built on meta: its attention routed for the packed layers
    assert isinstance(loaded.enc.layers[1].self_attn.in_proj, Int8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(x), art.model(x))
    program = torch.export.load(str(tmp_path / "art" / "program.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), art.model(x), atol=1e-5, rtol=0)


def test_a_resumed_qat_run_of_a_transformer_ends_where_the_uninterrupted_one_does(tmp_path):
    ckpts = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_top_k=-1, monitor=None, filename="{epoch}")
    # (no dropout: Lightning does not checkpoint the RNG a resumed run would draw dropout masks from)
    whole, _ = _fit(tmp_path / "a", callbacks=[ckpts], dropout=0.0)
    resumed, cb = _fit(tmp_path / "b", ckpt_path=str(tmp_path / "ck" / "epoch=1.ckpt"), dropout=0.0)  # inside QAT
    assert list(quant_states(resumed)) == list(quant_states(whole))
    a, b = whole.state_dict(), resumed.state_dict()
    assert list(a) == list(b) and "pool.in_proj_weight" in a and not any(".in_proj." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for n, st in quant_states(whole).items():
        other = quant_states(resumed)[n]
        for q, r in zip(st.quantizers(), other.quantizers()):
            assert q.state_dict().keys() == r.state_dict().keys()
            assert all(torch.equal(v, r.state_dict()[k]) for k, v in q.state_dict().items()), n


def test_int4_attention_and_a_dense_in_projection_export_and_load(tmp_path):
    model, _ = _fit(tmp_path / "fit", max_epochs=2, skip=["enc.layers.0.self_attn.in_proj"],
                    weight_spec=QuantSpec(bits=4, granularity="per_group", group_size=32))
    val = _loaders()[1]
    x = next(iter(val))[0]
    art = export(model, tmp_path / "art", val_dataloader=val, metric="accuracy", max_drop=1.0)
    layers, dense = art.manifest["layers"], art.manifest["dense_layers"]
    assert layers["pool.in_proj"]["scheme"] == "int4" and layers["enc.layers.0.self_attn.out_proj"]["scheme"] == "int4"
    assert "enc.layers.0.self_attn.in_proj" in dense and "enc.layers.0.self_attn.in_proj" not in layers
    attn = art.model.enc.layers[0].self_attn  # routed (its out_proj is packed), its in_proj FP32 and stored as torch names it
    assert isinstance(attn.out_proj, Int4Linear) and type(attn.in_proj) is not Int4Linear
    assert attn.in_proj.weight is attn.in_proj_weight
    loaded = load(art.path, model=TinyTransformer())
    assert torch.equal(loaded.enc.layers[0].self_attn.in_proj_weight, model.enc.layers[0].self_attn.in_proj_weight)
    with torch.no_grad():
        assert torch.equal(loaded(x), art.model(x))
    # the trained model itself is untouched by export, and a copy of it still trains
    copy.deepcopy(model).training_step(next(iter(val)), 0).backward()
