"""Table options the row-wise deploy op does or does not serve, end to end: what QAT trains is what
export packs, and an export never changes the user's model."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hwaware import QuantSpec
from hwaware.export import export, load
from hwaware.recsys import EmbeddingBagList
from tests.helpers import make_trainer


class Bags(pl.LightningModule):
    def __init__(self, max_norm=None, table_bits=4, symmetric=True):
        super().__init__()
        self.save_hyperparameters()
        self.bag = nn.EmbeddingBag(40, 8, mode="sum", max_norm=max_norm)
        self.head = nn.Linear(8, 1)

    def forward(self, ids):  # [B, 3] ids: fixed-length bags
        return self.head(self.bag(ids)).squeeze(-1)

    def training_step(self, batch, i):
        return F.binary_cross_entropy_with_logits(self(batch[0]), batch[1])

    def validation_step(self, batch, i):
        self.log("val_loss", F.binary_cross_entropy_with_logits(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, 3), generator=g)
    y = ((ids % 2).sum(1) > 1).float()
    return DataLoader(TensorDataset(ids, y), batch_size=32)


def test_export_leaves_a_max_norm_table_of_the_users_model_as_it_was(tmp_path):
    # max_norm renormalizes the looked-up rows in place, in eval too: export's run of the user's
    # model rewrote the rows of the first batch's ids; and a packed bag was never renormalized
    torch.manual_seed(0)
    model = Bags(max_norm=0.5)
    with torch.no_grad():
        model.bag.weight.mul_(3)
    before = model.bag.weight.detach().clone()
    val = _data(seed=1)
    art = export(model, tmp_path / "a", val_dataloader=val, metric="auroc", max_drop=1.0)
    assert torch.equal(model.bag.weight, before)
    assert "bag" not in art.manifest["layers"] and "max_norm=0.5" in art.manifest["dense_layers"]["bag"]


def test_a_tied_max_norm_table_is_restored_too():
    # the copy was kept per module: the second of two modules sharing the table kept it already
    # renormalized by the first, and restored that over the original
    from hwaware._predict import side_effect_free

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(10, 4, max_norm=1.0), nn.Embedding(10, 4, max_norm=1.0)
            self.b.weight = self.a.weight

        def forward(self, ids):
            return self.a(ids) + self.b(ids)

    torch.manual_seed(0)
    model = Tied()
    with torch.no_grad():
        model.a.weight.mul_(5)
    before = model.a.weight.detach().clone()
    with side_effect_free(model):
        model(torch.tensor([1, 2, 3]))
    assert torch.equal(model.a.weight, before) and model.b.weight is model.a.weight


def test_a_symmetric_int4_table_serves_the_codes_qat_trained(tmp_path):
    # the spec's own codes, not an affine re-quantization (26% of a trial's codes differed)
    from hwaware import ProgressiveQuantization

    pl.seed_everything(0, verbose=False)
    model = Bags()
    qat = ProgressiveQuantization(start_epoch=1, calibration_batches=2, layer_specs={
        "bag": QuantSpec(bits=4, granularity="per_row", symmetric=True)})
    make_trainer(tmp_path, [qat], max_epochs=2).fit(model, _data(), _data(seed=1))
    assert qat.report["layers"]["bag"]["weight"].startswith("int4/per_row/sym")
    art = export(model, tmp_path / "a")
    served = load(art.path, model=Bags)
    ids = torch.randint(0, 40, (64, 3), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        want = model.bag(ids)  # the fake-quantized table QAT trained
        torch.testing.assert_close(served.bag(ids), want, atol=1e-7, rtol=2 ** -20)


class TablesFirst(nn.Module):
    """ids [T, N]: dim 0 is the table count, not the batch (README's EmbeddingBagList layout)."""

    def __init__(self):
        super().__init__()
        self.tables = EmbeddingBagList(nn.EmbeddingBag(100, 8, mode="sum") for _ in range(3))
        self.head = nn.Linear(24, 1)

    def forward(self, ids, offsets):
        return self.head(torch.cat(self.tables(ids, offsets), 1))


def test_an_input_whose_first_dim_is_not_the_batch_gets_a_fixed_range(tmp_path):
    # a KeyError from torch.export's range constraints, after the whole gate had run
    torch.manual_seed(0)
    ids, offsets = torch.randint(0, 100, (3, 64)), torch.arange(64)
    art = export(TablesFirst().eval(), tmp_path / "a", example_inputs=(ids, offsets))
    assert art.manifest["program"]["batch_range"][0] == [3, 3]
    program = torch.export.load(f"{art.path}/program.pt2")
    with torch.no_grad():
        assert torch.equal(program.module()(ids, offsets), art.model(ids, offsets))


class ReadsTableWidth(nn.Module):
    """A forward that reads the tables' attributes, as models do (a reshape by embedding_dim, a
    sqrt(d) scale): the deploy tables keep them."""

    def __init__(self):
        super().__init__()
        self.hist = nn.EmbeddingBag(40, 8, mode="mean", padding_idx=0)
        self.item = nn.Embedding(40, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, ids):  # [B, 3]
        pooled = self.hist(ids).view(-1, self.hist.embedding_dim)
        item = self.item(ids[:, 0]) * self.item.embedding_dim ** 0.5
        assert self.hist.num_embeddings == 40 and self.hist.padding_idx == 0 and self.hist.mode == "mean"
        assert self.hist.max_norm is None and self.item.max_norm is None
        return self.head(pooled + item).squeeze(-1)


def test_a_forward_reading_the_tables_attributes_exports_and_serves(tmp_path):
    torch.manual_seed(0)
    model = ReadsTableWidth().eval()
    ids = torch.randint(0, 40, (16, 3))
    art = export(model, tmp_path / "a", example_inputs=(ids,))
    assert art.manifest["layers"]["hist"]["scheme"] == "rowwise_int8" and art.manifest["layers"]["item"]["scheme"] == "rowwise_int8"
    loaded = load(art.path, model=ReadsTableWidth())
    assert loaded.hist.embedding_dim == 8 and loaded.item.embedding_dim == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), art.model(ids), atol=0, rtol=0)
        torch.testing.assert_close(loaded(ids), model(ids), atol=0.05, rtol=0)
