"""DLRM (Naumov et al., 2019) as a LightningModule, plus an AUROC evaluation helper.

    dense [B, 13] -> bottom MLP -> x [B, D]
    sparse [B, 26] -> 26 EmbeddingBag(sum, single-hot) -> e_1..e_26 [B, D]
    (held in an ``EmbeddingBagList``: once exported, one table-batched op looks all 26 up)
    pairwise dots of (x, e_1..e_26): strictly upper triangle of [27, 27] -> [B, 351]
    cat(x, dots) [B, D + 351] -> top MLP -> logit [B]
    (the last two lines are one op, ``hwaware::dot_interaction``: a C pass on CPU)

Built only from `nn.Linear`, `nn.ReLU` and `nn.EmbeddingBag`, so quantization and sparsity code
that attaches to those module types finds every layer.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Iterable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import BinaryAUROC

import hwaware.ops  # noqa: F401  (registers torch.ops.hwaware.dot_interaction)
from hwaware.export.deploy import Int8Chain
from hwaware.recsys.criteo import DEFAULT_TABLE_SIZES, NUM_DENSE
from hwaware.recsys.embedding import EmbeddingBagList

__all__ = ["DLRM", "evaluate_auroc"]


def _mlp(in_features: int, widths: Sequence[int], *, final_out: int | None = None) -> nn.Sequential:
    """Linear+ReLU for each width; then a bare Linear(..., final_out) if `final_out` is given."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    if final_out is not None:
        layers.append(nn.Linear(in_features, final_out))
    return nn.Sequential(*layers)


def _is_positive_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1


def _check_widths(name: str, widths: Sequence[int], *, allow_empty: bool) -> tuple[int, ...]:
    widths = tuple(widths)
    if (not widths and not allow_empty) or not all(_is_positive_int(w) for w in widths):
        kind = "sequence" if allow_empty else "non-empty sequence"
        raise ValueError(f"{name} must be a {kind} of positive ints, got {widths!r}")
    return widths


class DLRM(pl.LightningModule):
    """Deep Learning Recommendation Model with dot interactions, trained with BCE on logits.

    Example::

        dm = CriteoDataModule()
        model = DLRM(table_sizes=dm.table_sizes)
        pl.Trainer(max_epochs=3, accelerator="cpu").fit(model, dm)   # logs val_auroc

    Args:
        table_sizes: rows of each embedding table, one table per categorical field.
        embedding_dim: D, the width of every embedding and of the bottom MLP output.
        bottom_mlp: widths of the bottom MLP (13 -> ... -> D), each followed by ReLU; the last
            width must equal `embedding_dim`.
        top_mlp: hidden widths of the top MLP (each followed by ReLU); a final Linear(..., 1) is
            appended.
        lr: Adam learning rate.
        weight_decay: Adam (L2) weight decay. The default 1e-3 stops the model memorising rare ids:
            on `CriteoDataModule()` val AUROC by epoch was 0.782 / 0.730 / 0.687 with 0, and
            0.775 / 0.782 / 0.785 with 1e-3.
        interaction_pad: pad the top MLP's input (D + pairs, 367 by default) with zero columns to a
            multiple of this (as NVIDIA's DLRM pads to 8 for tensor cores). 2:4 sparsity needs the
            input dimension to be a multiple of 4; 1 (the default) leaves it unpadded.

    Raises:
        ValueError: if `table_sizes` is empty or not positive ints, `embedding_dim` < 1, a width is
            not a positive int, `bottom_mlp[-1] != embedding_dim`, `lr` <= 0 or `weight_decay` < 0.
    """

    def __init__(
        self,
        table_sizes: Sequence[int] = DEFAULT_TABLE_SIZES,
        embedding_dim: int = 16,
        bottom_mlp: Sequence[int] = (64, 16),
        top_mlp: Sequence[int] = (256, 128),
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        interaction_pad: int = 1,
    ) -> None:
        super().__init__()
        table_sizes = tuple(table_sizes)
        if not table_sizes or not all(_is_positive_int(s) for s in table_sizes):
            raise ValueError(f"table_sizes must be a non-empty sequence of positive ints, got {table_sizes!r}")
        table_sizes = tuple(int(s) for s in table_sizes)  # recorded by save_hyperparameters below
        if not _is_positive_int(embedding_dim):
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        bottom = _check_widths("bottom_mlp", bottom_mlp, allow_empty=False)
        top = _check_widths("top_mlp", top_mlp, allow_empty=True)
        if bottom[-1] != embedding_dim:
            raise ValueError(
                f"bottom_mlp must end at embedding_dim={embedding_dim} (its output is dotted with the "
                f"embeddings), got bottom_mlp={bottom!r}"
            )
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not _is_positive_int(interaction_pad):
            raise ValueError(f"interaction_pad must be a positive int, got {interaction_pad!r}")
        self.save_hyperparameters()

        self.bottom_mlp = _mlp(NUM_DENSE, bottom)  # [B, 13] -> [B, D]
        # one call for all tables: after export, one table-batched row-wise op (recsys/embedding.py)
        self.embeddings = EmbeddingBagList(nn.EmbeddingBag(size, embedding_dim, mode="sum") for size in table_sizes)
        for emb in self.embeddings:  # DLRM reference init: U(-1/sqrt(n), 1/sqrt(n)) per table
            bound = emb.num_embeddings**-0.5
            nn.init.uniform_(emb.weight, -bound, bound)
        num_vectors = 1 + len(table_sizes)
        num_pairs = num_vectors * (num_vectors - 1) // 2
        top_in = embedding_dim + num_pairs
        self._pad = -top_in % interaction_pad  # zero columns appended to the top MLP input
        self.top_mlp = _mlp(top_in + self._pad, top, final_out=1)  # [B, D + P (+ pad)] -> [B, 1]

        self.val_auroc = BinaryAUROC()
        self.test_auroc = BinaryAUROC()

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        # dense: float32 [B, 13] (log-transformed), sparse: int64 [B, T] -> logits [B]
        if sparse.dim() != 2 or sparse.shape[1] != len(self.embeddings):
            raise ValueError(f"sparse must be [B, {len(self.embeddings)}], got shape {tuple(sparse.shape)}")
        if sparse.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"sparse must hold int64 (or int32) ids, got {sparse.dtype}")
        if dense.dim() != 2 or dense.shape[1] != NUM_DENSE or not dense.is_floating_point():
            raise ValueError(f"dense must be float [B, {NUM_DENSE}], got {dense.dtype} of shape {tuple(dense.shape)}")
        batch = dense.shape[0]
        if sparse.shape[0] != batch:
            raise ValueError(f"dense and sparse must hold the same batch, got dense {tuple(dense.shape)} and "
                             f"sparse {tuple(sparse.shape)}")
        x = self.bottom_mlp(dense)  # [B, D]
        top = self.top_mlp
        tables = self._deployed_tables(x) if x.dtype == torch.float32 and x.device.type == "cpu" else None
        if tables is not None:
            # exported, every table a row-wise deploy table: one pass looks the rows up into the
            # interaction (bit for bit the lookups and the interaction in turn), so the [T, B, D]
            # lookups are never written and read back
            if type(top) is Int8Chain and top.takes_quantized():
                # ... and writes its rows as the top int8 chain's input (codes and per-row scales, what
                # the chain would make of them), so the [B, D + P] float rows are not written either
                codes, scales = torch.ops.hwaware.embedding_interaction_int8.default(x, *tables, sparse.t(), self._pad)
                return top.forward_quantized(codes, scales).squeeze(1)
            z = torch.ops.hwaware.embedding_interaction.default(x, *tables, sparse.t(), self._pad)
            return top(z).squeeze(1)
        # [B] one id per bag (single-hot); microseconds to build, and no cache keeps it export-friendly
        offsets = torch.arange(batch, device=sparse.device)
        vectors = [x] + self.embeddings(sparse.t(), offsets)  # ids [T, B]; V = T + 1 of [B, D]
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in vectors))  # bf16 MLP + fp32 tables: fp32
        vectors = [v if v.dtype == dtype else v.to(dtype) for v in vectors]
        if type(top) is Int8Chain and dtype == torch.float32 and x.device.type == "cpu" and top.takes_quantized():
            # exported, with the top MLP's first layers an int8 chain: the interaction writes its rows as
            # that chain's int8 input (codes and per-row scales, bit for bit what the chain would make of
            # the float rows), so the [B, D + P] float rows are never written and read back
            codes, scales = torch.ops.hwaware.dot_interaction_int8.default(vectors, self._pad)
            return top.forward_quantized(codes, scales).squeeze(1)
        # [x | pairwise dots, strictly upper triangle of [V, V] row-major | pad zeros]: [B, D + V(V-1)/2 + pad],
        # one fused op (hwaware/ops: stack + bmm + index_select + cat in one C pass on CPU, with its backward)
        z = torch.ops.hwaware.dot_interaction(vectors, self._pad)
        return self.top_mlp(z).squeeze(1)  # [B]

    def _deployed_tables(self, x: Tensor) -> tuple | None:
        """``(weights, bits)`` when the tables are row-wise deploy tables served by one table-batched call
        (``EmbeddingBagList._one_group``) of ``x``'s width, sum or mean (the same for one id a bag), and
        no hook on the table list would miss its call; else None. (The fused ops serve inference, like
        every deploy op: a backward through them raises.)"""
        emb = self.embeddings
        if type(emb) is not EmbeddingBagList or emb._forward_hooks or emb._forward_pre_hooks:
            return None
        group = emb._one_group(list(emb._modules.values()))
        return None if group is None or group[2] != x.shape[1] else group[:2]

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self(batch["dense"], batch["sparse"])  # [B]
        return logits, F.binary_cross_entropy_with_logits(logits, batch["label"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits, loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, loss = self._loss(batch)
        self.val_auroc.update(torch.sigmoid(logits), batch["label"].long())
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=logits.shape[0])
        self.log("val_auroc", self.val_auroc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, loss = self._loss(batch)
        self.test_auroc.update(torch.sigmoid(logits), batch["label"].long())
        self.log("test_loss", loss, on_epoch=True, batch_size=logits.shape[0])
        self.log("test_auroc", self.test_auroc, on_epoch=True, prog_bar=True)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["dense"], batch["sparse"])  # logits [B]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused=True: one kernel per step instead of several per parameter, whose overhead made the
        # unfused optimizer a large share of a default-DLRM CPU training step.
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True
        )


def evaluate_auroc(model: nn.Module, dataloader: Iterable[dict[str, Tensor]]) -> float:
    """AUROC of `model(dense, sparse) -> logits [B]` over `dataloader`'s batches.

    Works for any module with the DLRM call signature (trained, fake-quantized or deployed);
    runs under `torch.no_grad()` in eval mode and restores the previous train/eval mode.
    """
    tensors = list(model.parameters()) or list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    metric = BinaryAUROC()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in dataloader:
                logits = model(batch["dense"].to(device), batch["sparse"].to(device))  # [B]
                metric.update(torch.sigmoid(logits.float()).cpu(), batch["label"].long().cpu())
    finally:
        model.train(was_training)
    return float(metric.compute())
