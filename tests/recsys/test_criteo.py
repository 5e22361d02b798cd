"""Tests for hwaware.recsys.criteo: synthetic generator, TSV loader, DataModule."""

import bz2
import gzip
import lzma
import math
import os
import re

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from hwaware.recsys.criteo import (
    DEFAULT_TABLE_SIZES,
    NUM_DENSE,
    NUM_SPARSE,
    CriteoDataModule,
    generate_criteo_like,
    hash_category,
    load_criteo_tsv,
    preprocess_dense,
)

SMALL_TABLES = (50, 7, 300, 3) * 6 + (11, 2)  # 26 tables


def _write_tsv(path, rows):
    path.write_text("".join("\t".join(row) + "\n" for row in rows))
    return path


def _good_row(label="1"):
    return [label] + ["1"] * NUM_DENSE + ["ab"] * NUM_SPARSE


# ---------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------
def test_default_table_sizes_are_criteo_like():
    assert len(DEFAULT_TABLE_SIZES) == NUM_SPARSE == 26
    assert 200_000 <= sum(DEFAULT_TABLE_SIZES) <= 300_000
    assert sum(s >= 20_000 for s in DEFAULT_TABLE_SIZES) >= 3
    assert sum(s <= 1000 for s in DEFAULT_TABLE_SIZES) >= 10


def test_generate_is_deterministic():
    a = generate_criteo_like(2000, seed=3)
    b = generate_criteo_like(2000, seed=3)
    c = generate_criteo_like(2000, seed=4)
    for key in ("dense", "sparse", "label"):
        assert torch.equal(a[key], b[key]), key
        assert not torch.equal(a[key], c[key]), key


def test_generate_shapes_dtypes_ranges():
    n = 5000
    d = generate_criteo_like(n, seed=0, table_sizes=SMALL_TABLES)
    assert d["dense"].shape == (n, NUM_DENSE) and d["dense"].dtype == torch.float32
    assert d["sparse"].shape == (n, NUM_SPARSE) and d["sparse"].dtype == torch.int64
    assert d["label"].shape == (n,) and d["label"].dtype == torch.float32
    assert (d["dense"] >= 0).all() and torch.equal(d["dense"], d["dense"].floor())  # counts
    assert ((d["dense"] == 0).float().mean(0) > 0.01).sum() >= 5  # several sparse-ish counts
    assert (d["sparse"] >= 0).all()
    assert (d["sparse"] < torch.tensor(SMALL_TABLES)).all()
    assert set(d["label"].unique().tolist()) == {0.0, 1.0}


def test_generate_zipf_skew():
    d = generate_criteo_like(20_000, seed=0)
    big = max(range(NUM_SPARSE), key=lambda f: DEFAULT_TABLE_SIZES[f])
    counts = torch.bincount(d["sparse"][:, big])
    counts = counts[counts > 0].float()
    assert counts.max() > 100 * counts.median()
    assert counts.max() / counts.sum() > 0.05  # the head category is a few percent of traffic


def test_generate_label_base_rate():
    ctr = generate_criteo_like(20_000, seed=1)["label"].mean().item()
    assert 0.2 <= ctr <= 0.3


def test_generate_labels_are_learnable():
    # A per-field smoothed CTR table fitted on one half predicts the other half above chance.
    d = generate_criteo_like(40_000, seed=0, table_sizes=SMALL_TABLES)
    sparse, label = d["sparse"], d["label"]
    fit, held = slice(0, 20_000), slice(20_000, None)
    prior = label[fit].mean()
    score = torch.zeros(20_000)
    for f, size in enumerate(SMALL_TABLES):
        clicks = torch.bincount(sparse[fit, f], weights=label[fit], minlength=size)
        shows = torch.bincount(sparse[fit, f], minlength=size)
        ctr = (clicks + 10 * prior) / (shows + 10)
        score += torch.logit(ctr)[sparse[held, f]]
    assert binary_auroc(score, label[held].long()) > 0.7


def test_generate_misconfiguration():
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        generate_criteo_like(0)
    with pytest.raises(ValueError, match="table_sizes must be 26 positive ints"):
        generate_criteo_like(10, table_sizes=(5, 5))
    with pytest.raises(ValueError, match="table_sizes must be 26 positive ints"):
        generate_criteo_like(10, table_sizes=(5,) * 25 + (0,))


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------
def test_preprocess_dense():
    x = torch.tensor([[-3.0, 0.0, 1.0, 9.0]])
    expected = torch.tensor([[0.0, 0.0, math.log(2.0), math.log(10.0)]])
    torch.testing.assert_close(preprocess_dense(x), expected)


def test_hash_category():
    assert hash_category("", 1000) == 0
    assert hash_category("68fd1e64", 1000) == 0x68FD1E64 % 1000
    assert hash_category("68FD1E64", 1000) == hash_category("68fd1e64", 1000)
    with pytest.raises(ValueError, match="table_size must be an int >= 1, got 0"):
        hash_category("ab", 0)
    with pytest.raises(ValueError, match=r"table_size must be an int >= 1, got 2.5"):  # returned a float row before
        hash_category("ab", 2.5)
    for bad in ("0x1f", "1_f", " 1f\n", "-1f", "g1"):  # int(s, 16) took the first four; the TSV loader refuses them
        with pytest.raises(ValueError, match=re.escape(f"category {bad!r} is not a hex string")):
            hash_category(bad, 1000)


@pytest.mark.parametrize("name", ["day[1].tsv", "day?.tsv", "day*.tsv"])
def test_load_tsv_reads_the_file_named_even_with_glob_characters(tmp_path, name):
    # datasets reads data_files as a glob: day[1].tsv read its sibling day1.tsv, without a word
    _write_tsv(tmp_path / "day1.tsv", [_good_row("0"), _good_row("0"), _good_row("0")])
    path = _write_tsv(tmp_path / name, [_good_row("1"), _good_row("1"), _good_row("1")])
    assert torch.equal(load_criteo_tsv(path, cache_dir=tmp_path / "cache")["label"], torch.ones(3))


def test_load_tsv_sends_no_download_count_request(tmp_path, monkeypatch):
    # datasets' csv builder sent a HEAD request to its S3 bucket on every call: a network call at run time
    import datasets

    calls = []
    monkeypatch.setattr(datasets.load, "get_session", lambda: calls.append("session") or pytest.fail("network"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    load_criteo_tsv(_write_tsv(tmp_path / "a.tsv", [_good_row()]), cache_dir=tmp_path / "cache")
    assert calls == [] and datasets.config.HF_UPDATE_DOWNLOAD_COUNTS is True  # (put back)


def test_a_seed_of_any_size_shuffles():
    dm = CriteoDataModule(num_samples=40, batch_size=8, seed=2**45, table_sizes=SMALL_TABLES)
    dm.setup("fit")
    assert sum(len(b["label"]) for b in dm.train_dataloader()) == 32  # the shuffle's seed overflowed int64 before


# ---------------------------------------------------------------------------------------------
# TSV loader
# ---------------------------------------------------------------------------------------------
def test_load_tsv_round_trip_with_empty_fields(tmp_path):
    sizes = DEFAULT_TABLE_SIZES
    row0 = ["1", "5", "", "-1"] + ["0"] * 10 + ["68fd1e64", "", "00000000"] + ["ABCDEF01"] * 23
    row1 = ["0"] + [""] * NUM_DENSE + [""] * NUM_SPARSE
    row2 = ["0"] + [str(3 * i) for i in range(NUM_DENSE)] + [f"{7919 * i:x}" for i in range(NUM_SPARSE)]
    path = _write_tsv(tmp_path / "day_0.tsv", [row0, row1, row2])

    d = load_criteo_tsv(path, cache_dir=tmp_path / "cache")

    assert torch.equal(d["label"], torch.tensor([1.0, 0.0, 0.0]))
    expected_dense = torch.tensor(
        [[5.0, 0.0, -1.0] + [0.0] * 10, [0.0] * NUM_DENSE, [3.0 * i for i in range(NUM_DENSE)]]
    )
    assert d["dense"].dtype == torch.float32 and torch.equal(d["dense"], expected_dense)
    expected_sparse = torch.tensor(
        [[hash_category(v, sizes[f]) for f, v in enumerate(row[1 + NUM_DENSE :])] for row in (row0, row1, row2)]
    )
    assert d["sparse"].dtype == torch.int64 and torch.equal(d["sparse"], expected_sparse)
    assert d["sparse"][0, 0] == 0x68FD1E64 % sizes[0] and d["sparse"][0, 1] == 0 and (d["sparse"][1] == 0).all()
    # the Criteo transform of the loaded counts, exactly
    assert torch.equal(preprocess_dense(d["dense"])[0, :3], torch.log1p(torch.tensor([5.0, 0.0, 0.0])))


def test_load_tsv_reproduces_generated_log(tmp_path):
    d = generate_criteo_like(300, seed=5, table_sizes=SMALL_TABLES)
    rows = [
        [str(int(y))] + [str(int(v)) for v in dense] + [f"{int(c):x}" for c in cats]
        for y, dense, cats in zip(d["label"], d["dense"], d["sparse"])
    ]
    path = _write_tsv(tmp_path / "synthetic.tsv", rows)
    loaded = load_criteo_tsv(path, table_sizes=SMALL_TABLES, cache_dir=tmp_path / "cache")
    for key in ("dense", "sparse", "label"):
        assert torch.equal(loaded[key], d[key]), key


def test_load_tsv_missing_file(tmp_path):
    path = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_criteo_tsv(path)


def test_load_tsv_directory_says_directory(tmp_path):
    """A directory exists: say it is one, not that the file is missing."""
    with pytest.raises(IsADirectoryError, match=re.escape(f"{str(tmp_path)!r} is a directory; expected a Criteo TSV file")):
        load_criteo_tsv(tmp_path)


@pytest.mark.parametrize(
    ("bad_row", "lineno", "message"),
    [
        (_good_row()[:-1], 3, "expected 40 tab-separated fields (label, I1-I13, C1-C26), got 39"),
        (_good_row() + ["ab"], 3, "expected 40 tab-separated fields (label, I1-I13, C1-C26), got 41"),
        (_good_row()[:20] + ["xyz"] + _good_row()[21:], 2, "C7 must be a hexadecimal string or empty, got 'xyz'"),
        (_good_row()[:2] + ["1.5"] + _good_row()[3:], 2, "I2 must be an integer or empty, got '1.5'"),
        (_good_row()[:13] + ["-"] + _good_row()[14:], 4, "I13 must be an integer or empty, got '-'"),
        (["2"] + _good_row()[1:], 1, "label must be 0 or 1, got '2'"),
        ([], 3, "empty line; expected 40 tab-separated fields (label, I1-I13, C1-C26)"),
        (_good_row()[:5] + ["1" * 30] + _good_row()[6:], 2,
         f"I5 must be an integer in the int64 range [{-2**63}, {2**63 - 1}] or empty, got '{'1' * 30}'"),
        (_good_row()[:1] + [str(2**63)] + _good_row()[2:], 4,
         f"I1 must be an integer in the int64 range [{-2**63}, {2**63 - 1}] or empty, got '{2**63}'"),
        (_good_row()[:13] + [str(-2**63 - 1)] + _good_row()[14:], 1,
         f"I13 must be an integer in the int64 range [{-2**63}, {2**63 - 1}] or empty, got '{-2**63 - 1}'"),
        (_good_row()[:7] + ["9" * 60] + _good_row()[8:], 2,
         f"I7 must be an integer in the int64 range [{-2**63}, {2**63 - 1}] or empty, got '{'9' * 20}...99999999' (60 digits)"),
    ],
)
def test_load_tsv_malformed_line(tmp_path, bad_row, lineno, message):
    rows = [_good_row(), _good_row("0"), _good_row()]
    rows.insert(lineno - 1, bad_row)
    path = _write_tsv(tmp_path / "bad.tsv", rows)
    with pytest.raises(ValueError, match=re.escape(f"{path}, line {lineno}: {message}")):
        load_criteo_tsv(path, cache_dir=tmp_path / "cache")


def test_load_tsv_int64_bounds_and_the_first_bad_line_is_named(tmp_path):
    """Both int64 bounds (and leading zeros) load; of several values too large the first in the
    file (line, then column) is named, whichever column holds it."""
    ok = _good_row()[:1] + [str(2**63 - 1), str(-2**63), "0" * 30 + "7"] + _good_row()[4:]
    d = load_criteo_tsv(_write_tsv(tmp_path / "ok.tsv", [_good_row(), ok]), cache_dir=tmp_path / "cache")
    assert d["dense"][1, :3].tolist() == [float(2**63 - 1), float(-2**63), 7.0]

    late_column = _good_row()[:9] + ["9" * 20] + _good_row()[10:]  # I9 on line 2
    early_column = _good_row()[:2] + ["9" * 20] + _good_row()[3:]  # I2 on line 3
    path = _write_tsv(tmp_path / "bad.tsv", [_good_row(), late_column, early_column, late_column])
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: I9 must be an integer in the int64 range")):
        load_criteo_tsv(path, cache_dir=tmp_path / "cache")
    both = _good_row()[:2] + ["9" * 20] + _good_row()[3:9] + ["9" * 20] + _good_row()[10:]
    path = _write_tsv(tmp_path / "both.tsv", [_good_row(), late_column, both])
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: I9 ")):
        load_criteo_tsv(path, cache_dir=tmp_path / "cache")
    path = _write_tsv(tmp_path / "both2.tsv", [_good_row(), both, late_column])
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: I2 ")):
        load_criteo_tsv(path, cache_dir=tmp_path / "cache")


def test_load_tsv_empty_file(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no rows")):
        load_criteo_tsv(path)


def test_load_tsv_replaced_file_with_the_same_mtime_is_reparsed(tmp_path):
    """cp -p, rsync -t and tar x keep the modification time: a file replaced that way (same path, same
    size, same mtime, every label flipped) must load its new rows, not the cached old ones."""
    rows = [_good_row("1" if i % 3 else "0") for i in range(20)]
    path = _write_tsv(tmp_path / "day_0.tsv", rows)
    cache = tmp_path / "cache"
    before = load_criteo_tsv(path, table_sizes=SMALL_TABLES, cache_dir=cache)
    st = os.stat(path)
    _write_tsv(path, [["1" if r[0] == "0" else "0"] + r[1:] for r in rows])  # in place: same inode, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = load_criteo_tsv(path, table_sizes=SMALL_TABLES, cache_dir=cache)
    assert torch.equal(after["label"], 1 - before["label"])

    replacement = _write_tsv(tmp_path / "new.tsv", rows)  # replaced by a rename: a new inode, same mtime
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, path)
    assert torch.equal(load_criteo_tsv(path, table_sizes=SMALL_TABLES, cache_dir=cache)["label"], before["label"])


def test_load_tsv_unchanged_file_reuses_the_cache(tmp_path):
    path = _write_tsv(tmp_path / "day_0.tsv", [_good_row(), _good_row("0")])
    cache = tmp_path / "cache"
    load_criteo_tsv(path, cache_dir=cache)
    arrow = sorted(cache.rglob("*.arrow"))
    assert arrow
    stamps = [f.stat().st_mtime_ns for f in arrow]
    d = load_criteo_tsv(path, cache_dir=cache)
    assert sorted(cache.rglob("*.arrow")) == arrow and [f.stat().st_mtime_ns for f in arrow] == stamps
    assert d["label"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(("opener", "kind"), [(gzip.open, "gzip"), (bz2.open, "bzip2"), (lzma.open, "xz")])
def test_load_tsv_compressed_file_says_compressed(tmp_path, opener, kind):
    path = tmp_path / "day_0.tsv.gz"
    with opener(path, "wt") as fh:
        fh.write("\t".join(_good_row()) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: the file is {kind}-compressed; expected an uncompressed "
                                                   "Criteo TSV (tab-separated text): decompress it first")):
        load_criteo_tsv(path, cache_dir=tmp_path / "cache")


def test_load_tsv_pipe_says_it_must_be_a_regular_file(tmp_path):
    """`--data <(zcat day_0.gz)` passes /dev/fd/63: it exists, it is not a file that can be read twice."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=re.escape(f"{str(fifo)!r} is not a regular file (a pipe, FIFO or device)")):
        load_criteo_tsv(fifo)  # refused before any open, which would block on a FIFO


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------
def _batches(loader):
    return list(loader)


def test_datamodule_batches():
    dm = CriteoDataModule(num_samples=1000, batch_size=128, table_sizes=SMALL_TABLES, seed=2)
    dm.setup("fit")
    assert dm.table_sizes == SMALL_TABLES
    train = _batches(dm.train_dataloader())
    val = _batches(dm.val_dataloader())
    assert len(train) == math.ceil(800 / 128) and len(val) == math.ceil(200 / 128)
    batch = train[0]
    assert set(batch) == {"dense", "sparse", "label"}
    assert batch["dense"].shape == (128, NUM_DENSE) and batch["dense"].dtype == torch.float32
    assert batch["sparse"].shape == (128, NUM_SPARSE) and batch["sparse"].dtype == torch.int64
    assert batch["label"].shape == (128,) and batch["label"].dtype == torch.float32
    assert train[-1]["label"].shape == (800 - 6 * 128,)

    # val is the last 20% of the log, in order, with dense log1p-transformed
    raw = generate_criteo_like(1000, seed=2, table_sizes=SMALL_TABLES)
    val_dense = torch.cat([b["dense"] for b in val])
    assert torch.equal(val_dense, preprocess_dense(raw["dense"][800:]))
    assert torch.equal(torch.cat([b["sparse"] for b in val]), raw["sparse"][800:])
    # train covers the first 80% exactly once, shuffled
    train_labels = torch.cat([b["label"] for b in train])
    assert train_labels.sum() == raw["label"][:800].sum()
    assert not torch.equal(torch.cat([b["sparse"] for b in train]), raw["sparse"][:800])


def test_datamodule_shuffle_is_deterministic():
    def first_batch(seed, epoch):
        dm = CriteoDataModule(num_samples=1000, batch_size=64, table_sizes=SMALL_TABLES, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))["sparse"]

    assert torch.equal(first_batch(0, 0), first_batch(0, 0))
    assert not torch.equal(first_batch(0, 0), first_batch(0, 1))  # new order each epoch
    assert not torch.equal(first_batch(0, 0), first_batch(1, 0))


def test_datamodule_from_tsv(tmp_path):
    d = generate_criteo_like(100, seed=0, table_sizes=SMALL_TABLES)
    rows = [
        [str(int(y))] + [str(int(v)) for v in dense] + [f"{int(c):x}" for c in cats]
        for y, dense, cats in zip(d["label"], d["dense"], d["sparse"])
    ]
    path = _write_tsv(tmp_path / "train.tsv", rows)
    dm = CriteoDataModule(
        data=path, batch_size=32, val_fraction=0.25, table_sizes=SMALL_TABLES, cache_dir=tmp_path / "cache"
    )
    dm.setup("fit")
    val = _batches(dm.test_dataloader())
    assert [len(b["label"]) for b in val] == [25]
    assert torch.equal(val[0]["sparse"], d["sparse"][75:])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 1}, "num_samples must be an int >= 2"),
        ({"val_fraction": 1.0}, r"val_fraction must be a float in \(0, 1\), got 1.0"),
        ({"val_fraction": 0}, r"val_fraction must be a float in \(0, 1\), got 0"),
        ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
        ({"table_sizes": (10,) * 3}, "table_sizes must be 26 positive ints"),
        ({"data": 3}, "data must be a TSV path or None"),
    ],
)
def test_datamodule_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CriteoDataModule(**kwargs)


def test_datamodule_empty_split():
    dm = CriteoDataModule(num_samples=4, val_fraction=0.01, table_sizes=SMALL_TABLES)
    with pytest.raises(ValueError, match="gives 0 validation rows; expected between 1 and 3"):
        dm.setup("fit")


def _train_with_checkpoints(tmp_path, name, ckpt_path=None, every=None):
    """A tiny DLRM on 700 synthetic rows (5 batches of 128 per epoch, 4 under limit_train_batches), 3 epochs;
    checkpoints every ``every`` steps. Returns the final weights."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from hwaware.recsys import DLRM

    pl.seed_everything(0, verbose=False)
    dm = CriteoDataModule(num_samples=700, batch_size=128, table_sizes=SMALL_TABLES, seed=1)
    model = DLRM(table_sizes=SMALL_TABLES, embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8,))
    callbacks = [] if every is None else [ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=every,
                                                          save_top_k=-1, filename="{step}")]
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=4, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=every is not None, callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == 12
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("step", [6, 4])  # mid-epoch (epoch 1, batch 2 of 4); the last batch of epoch 0
def test_train_loader_resumes_mid_epoch(tmp_path, step):
    """A fit resumed from a checkpoint taken inside an epoch ends with the weights of the uninterrupted
    fit, bit for bit: the resumed epoch trains on the batches it had left, in their order."""
    full = _train_with_checkpoints(tmp_path, "full", every=2)
    ckpt = tmp_path / "full" / f"step={step}.ckpt"
    assert ckpt.exists()
    resumed = _train_with_checkpoints(tmp_path, "resumed", ckpt_path=str(ckpt))
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_train_loader_state_round_trip():
    dm = CriteoDataModule(num_samples=1000, batch_size=100, table_sizes=SMALL_TABLES, seed=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    it = iter(loader)
    seen = [next(it)["label"] for _ in range(3)]
    state = loader.state_dict()
    assert (state["epoch"], state["batches"]) == (3, 3)
    rest = [b["label"] for b in it]
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(3)  # as Lightning does before iterating
    assert [torch.equal(a, b["label"]) for a, b in zip(rest, fresh)] == [True] * 5
    assert [torch.equal(a, b["label"]) for a, b in zip(seen + rest, fresh)] == [True] * 8  # the next pass is whole
    other = CriteoDataModule(num_samples=1000, batch_size=50, table_sizes=SMALL_TABLES, seed=2)
    other.setup("fit")
    mismatched = other.train_dataloader()
    with pytest.warns(UserWarning, match="starts from its first batch"):
        mismatched.load_state_dict(state)
    mismatched.sampler.set_epoch(3)
    assert len(list(mismatched)) == 16  # 800 training rows in 50s, from the first
