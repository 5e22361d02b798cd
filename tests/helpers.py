"""Tiny Lightning models and a shared `train_with_*` helper for callback tests."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyCTR(pl.LightningModule):
    """Embedding bag + MLP binary classifier on a fixed random problem with learnable structure."""

    def __init__(self, vocab: int = 50, dim: int = 8, hidden: int = 32, lr: float = 0.05, bn: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()  # hwaware.load rebuilds the class from these
        self.emb = nn.EmbeddingBag(vocab, dim, mode="sum")
        layers: List[nn.Module] = [nn.Linear(4 + dim, hidden)]
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, 1)]
        self.mlp = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids, torch.arange(ids.shape[0], device=ids.device))
        return self.mlp(torch.cat([dense, e], dim=1)).squeeze(-1)

    def _loss(self, batch):
        dense, ids, y = batch
        return F.binary_cross_entropy_with_logits(self(dense, ids), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), prog_bar=False)

    def predict_step(self, batch, batch_idx=0):
        dense, ids, _ = batch
        return self(dense, ids)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tiny_data(n: int = 512, vocab: int = 50, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, 4, generator=g)
    ids = torch.randint(0, vocab, (n,), generator=g)
    item_effect = torch.randn(vocab, generator=g)
    logit = dense[:, 0] - 0.5 * dense[:, 1] + item_effect[ids]
    y = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    return TensorDataset(dense, ids, y)


def loaders(batch_size: int = 32, n: int = 512, seed: int = 0):
    train = DataLoader(tiny_data(n, seed=seed), batch_size=batch_size, shuffle=False)
    val = DataLoader(tiny_data(n // 2, seed=seed + 1), batch_size=batch_size)
    return train, val


def make_trainer(tmp_path, callbacks, max_epochs: int = 4, limit_train_batches: int = 8, **kwargs: Any) -> pl.Trainer:
    defaults: Dict[str, Any] = dict(
        default_root_dir=str(tmp_path), max_epochs=max_epochs, limit_train_batches=limit_train_batches,
        limit_val_batches=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def train_with_quant(tmp_path, model: Optional[pl.LightningModule] = None, max_epochs: int = 4, trainer_kwargs=None, **cb_kwargs):
    """Fit a TinyCTR (or ``model``) with ProgressiveQuantization(**cb_kwargs); returns (trainer, model, callback)."""
    from hwaware.callbacks import ProgressiveQuantization

    pl.seed_everything(0, verbose=False)
    model = model or TinyCTR()
    cb = ProgressiveQuantization(**cb_kwargs)
    trainer = make_trainer(tmp_path, [cb], max_epochs=max_epochs, **(trainer_kwargs or {}))
    train, val = loaders()
    trainer.fit(model, train, val)
    return trainer, model, cb


def int8_layers(dims, seed: int = 0):
    """Int8 MLP layers ``dims[0] -> dims[1] -> ...``: ``(qweights, w_scales, biases)``, a bias on
    every other layer (layer 0 has one), weights quantized per channel from a seeded normal."""
    from hwaware.ops.packing import quantize_int8_weight

    g = torch.Generator().manual_seed(seed)
    qws, scales, biases = [], [], []
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        qw, s = quantize_int8_weight(torch.randn(n, k, generator=g) / k**0.5)
        qws.append(qw)
        scales.append(s)
        biases.append(torch.randn(n, generator=g) if i % 2 == 0 else None)
    return qws, scales, biases


def int8_chain_top(model) -> None:
    """``model.top_mlp`` as export leaves it with every Linear on ``int_mm``, in place: an ``Int8Chain``
    of ``Int8Linear`` (weights quantized per channel) and the ``nn.ReLU`` after each (which the chain
    applies in that layer's epilogue)."""
    import torch
    from hwaware.export.deploy import Int8Chain, Int8Linear
    from hwaware.ops.packing import quantize_int8_weight

    seq = []
    for m in model.top_mlp:
        if isinstance(m, torch.nn.Linear):
            qw, s = quantize_int8_weight(m.weight.detach())
            seq.append(Int8Linear(qw, s, m.bias.detach().clone(), {"cpu": "int_mm"}))
        else:
            seq.append(m)
    model.top_mlp = Int8Chain(*seq)


def dlrm_unfused(model, dense, sparse):
    """DLRM's forward with every part called on its own: bottom MLP, the table list, the float
    interaction, the top MLP (what the fused paths must match bit for bit)."""
    import torch
    import hwaware.ops as ops

    x = model.bottom_mlp(dense)
    vectors = [x] + model.embeddings(sparse.t(), torch.arange(dense.shape[0]))
    return model.top_mlp(ops.dot_interaction(vectors, model._pad)).squeeze(1)


def record_calls(monkeypatch, overload_packet) -> list:
    """Appends 1 to the returned list on each call of ``overload_packet.default`` (as DLRM makes them)."""
    calls = []
    real = overload_packet.default
    monkeypatch.setattr(overload_packet, "default", lambda *a: calls.append(1) or real(*a))
    return calls


def use_int8_engine(monkeypatch, name: Optional[str]) -> None:
    """Run the rest of a test with hwaware's int8 pass on engine ``name`` (of ``native.ENGINES``;
    None: the ``torch._int_mm`` passes), the faster ones switched off; skip where this CPU (or the
    build) lacks it."""
    import pytest
    from hwaware.quant import native

    have = native.engines_available()
    if name is not None and not have[name]:
        pytest.skip(f"no {name} engine here (native: {native.native_status()})")
    for attr, engine in zip(("_amx", "_vnni", "_madd"), native.ENGINES):
        monkeypatch.setattr(native, attr, have[engine] and engine == name)
    assert native.int8_engine() == name
