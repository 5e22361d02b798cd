"""The gate's reads of the validation loader: every model it compares sees the same samples."""
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from hwaware import export
from hwaware.export.reads import ReplayedReads
from tests.helpers import TinyCTR, tiny_data


class _Noisy(Dataset):
    """Random augmentation of the inputs, labels unchanged: ``draw`` picks where the noise comes from."""

    def __init__(self, n: int, draw: str) -> None:
        self.data, self.draw = tiny_data(n, seed=1), draw
        self.rng = np.random.default_rng(0)  # held by the dataset: replayed

    def __len__(self) -> int:
        return len(self.data)

    def noise(self) -> torch.Tensor:
        if self.draw == "torch":
            return torch.randn(4)
        if self.draw == "numpy":
            return torch.from_numpy(np.random.randn(4)).float()
        if self.draw == "random":
            return torch.tensor([random.gauss(0, 1) for _ in range(4)])
        if self.draw == "own":
            return torch.from_numpy(self.rng.standard_normal(4)).float()
        return torch.from_numpy(_HIDDEN.standard_normal(4)).float()  # a generator the gate cannot see

    def __getitem__(self, i):
        dense, ids, y = self.data[i]
        return dense + self.noise(), ids, y


_HIDDEN = np.random.default_rng(0)


def _reads(loader, n=3):
    reads = ReplayedReads(loader)
    return [[torch.cat([t.flatten().float() for t in b]) for b in reads] for _ in range(n)]


@pytest.mark.parametrize("draw", ["torch", "numpy", "random", "own"])
def test_every_read_of_a_randomly_augmented_loader_gives_the_same_batches(draw):
    loader = DataLoader(_Noisy(96, draw), batch_size=32, shuffle=True)
    first, *others = _reads(loader)
    assert len(first) == 3
    for other in others:
        assert all(torch.equal(a, b) for a, b in zip(first, other))
    plain = [torch.cat([t.flatten().float() for t in b]) for b in loader]  # (unwrapped: each read draws anew)
    assert not all(torch.equal(a, b) for a, b in zip(first, plain))


def test_a_sampler_with_replacement_and_its_own_generator_is_replayed():
    data = tiny_data(128, seed=1)
    g = torch.Generator().manual_seed(3)
    loader = DataLoader(data, batch_size=32, sampler=RandomSampler(data, replacement=True, num_samples=96, generator=g))
    first, *others = _reads(loader)
    assert all(torch.equal(a, b) for other in others for a, b in zip(first, other))


def test_randomness_it_cannot_replay_is_refused_naming_the_read():
    reads = ReplayedReads(DataLoader(_Noisy(64, "hidden"), batch_size=32))
    list(reads)
    with pytest.raises(ValueError, match=r"export: val_dataloader gave other samples on read 2 than on the first \(batch 0 "
                                         r"differs\).*persistent_workers=True.*same samples on every read"):
        list(reads)


class _HiddenShuffle(Sampler):
    """A shuffle drawn from a generator the gate cannot see: another order of the same samples."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(_HIDDEN.permutation(self.n).tolist())


def test_the_same_samples_in_another_order_pass():
    reads = ReplayedReads(DataLoader(tiny_data(96, seed=1), batch_size=32, sampler=_HiddenShuffle(96)))
    a, b = list(reads), list(reads)
    assert not torch.equal(a[0][0], b[0][0])  # another order: the check fell back to the samples' multiset
    assert torch.equal(torch.cat([x[2] for x in a]).sort().values, torch.cat([x[2] for x in b]).sort().values)


def test_a_partial_read_is_not_compared_and_the_state_is_left_as_one_read_leaves_it():
    loader = DataLoader(_Noisy(64, "torch"), batch_size=32)
    torch.manual_seed(5)
    once = [b[0] for b in loader]
    after_one_read = torch.rand(3)
    torch.manual_seed(5)
    reads = ReplayedReads(loader)
    next(iter(reads))  # one batch (kernels timed on it)
    got = [b[0] for b in reads]
    list(reads)
    reads.finish()
    assert all(torch.equal(a, b) for a, b in zip(once, got))
    assert torch.equal(torch.rand(3), after_one_read)


def test_the_gate_compares_the_models_on_the_same_augmented_batches(tmp_path):
    """A vision trial: random augmentation on the validation loader, labels unchanged. The gate read
    it once per model, so the same model passed, passed, then failed; the drop was sampling noise."""
    torch.manual_seed(0)
    model = TinyCTR()
    with torch.no_grad():
        model.mlp[0].weight[:, :4] *= 10  # the noise moves the predictions (and the AUROC of each read)
    references, drops = set(), []
    for seed in range(4):
        torch.manual_seed(seed)
        art = export(model, tmp_path / str(seed), val_dataloader=DataLoader(_Noisy(256, "torch"), batch_size=64),
                     max_drop=0.005)
        references.add(art.report["reference"])
        drops.append(art.report["drop"])
    assert len(references) == 4  # each export drew other noise...
    assert max(abs(d) for d in drops) < 0.005  # ...and compared the models on the same draw


def test_a_mapping_batch_pytree_does_not_open_is_fingerprinted():
    """A HuggingFace BatchEncoding is a UserDict: pytree took it for one leaf and fingerprinted its
    type name only, so reads with other contents matched."""
    from collections import UserDict

    class Drawn:
        def __iter__(self):
            return iter([UserDict({"x": _HIDDEN.standard_normal(4), "y": torch.zeros(1)})])

    reads = ReplayedReads(Drawn())
    list(reads)
    with pytest.raises(ValueError, match=r"other samples on read 2.*a batch changed in place by the model"):
        list(reads)


def test_a_generator_with_no_state_to_put_back_is_left_to_the_check():
    class Seeded(Dataset):
        def __init__(self):
            self.rng = random.SystemRandom()  # getstate() raises NotImplementedError

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.full((2,), float(i)), torch.tensor(i % 2)

    reads = ReplayedReads(DataLoader(Seeded(), batch_size=4))
    assert len(list(reads)) == len(list(reads)) == 2


class _Batches:
    """A loader that gives the batches ``make(read)`` builds for each read (``read`` counts from 0)."""

    def __init__(self, make):
        self.make, self.read = make, 0

    def __iter__(self):
        batches = self.make(self.read)
        self.read += 1
        return iter(batches)


def _two_reads(make):
    reads = ReplayedReads(_Batches(make))
    list(reads)
    list(reads)


def _split(x, y, order, size=4):
    return [(x[order][i:i + size], y[order][i:i + size]) for i in range(0, len(order), size)]


def test_a_nan_in_a_reordered_read_still_matches():
    """The order-free check compared float sums: one NaN made any reordered read refused."""
    x, y = torch.randn(8, 3), torch.arange(8.0)
    x[2, 1] = float("nan")
    _two_reads(lambda read: _split(x, y, torch.arange(8) if read == 0 else torch.randperm(8, generator=torch.Generator().manual_seed(1))))


def test_inputs_and_targets_shuffled_apart_are_refused():
    """Each leaf's samples were compared as their own multiset: inputs and targets permuted apart
    (every model compared on other (input, target) pairs) passed."""
    x, y = torch.randn(8, 3), torch.arange(8.0)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))

    def make(read):
        return [(x[i:i + 4], y[i:i + 4]) for i in range(0, 8, 4)] if read == 0 else [
            (x[perm][i:i + 4], y[i:i + 4]) for i in range(0, 8, 4)]

    with pytest.raises(ValueError, match="other samples on read 2"):
        _two_reads(make)


def test_a_changed_value_in_a_reordered_read_is_refused():
    x, y = torch.randn(8, 3), torch.arange(8.0)
    x2 = x.clone()
    x2[5, 0] += 1e-6
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="other samples on read 2"):
        _two_reads(lambda read: _split(x if read == 0 else x2, y, torch.arange(8) if read == 0 else perm))


def test_offsets_style_ids_permuted_within_a_batch_are_refused():
    """Flat ids have no per-sample rows: they were a multiset of single ids, so ids permuted within a
    batch (each bag now other ids) while the targets stayed put passed (a review of this change)."""
    ids, offsets, y = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 2, 4]), torch.tensor([0.0, 1.0, 0.0])
    permuted = torch.tensor([6, 5, 4, 3, 2, 1])
    _two_reads(lambda read: [(ids, offsets, y)])  # the same batches: pass
    with pytest.raises(ValueError, match="other samples on read 2"):
        _two_reads(lambda read: [(ids if read == 0 else permuted, offsets, y)])


def test_a_0d_and_a_1_element_tensor_are_told_apart():
    with pytest.raises(ValueError, match="other samples on read 2"):
        _two_reads(lambda read: [(torch.tensor(1.0) if read == 0 else torch.tensor([1.0]), torch.zeros(2))])


def test_a_conjugate_view_is_fingerprinted_as_its_values():
    from hwaware.export.reads import _rows

    c = torch.complex(torch.randn(3, 2), torch.randn(3, 2))
    assert _rows(c.conj())[0].tobytes() == _rows(c.conj().resolve_conj())[0].tobytes() != _rows(c)[0].tobytes()
    assert _rows(-c)[0].tobytes() == _rows((-c).clone())[0].tobytes()


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "conj", "complex", "empty", "bool", "scalar"])
def test_uncommon_leaves_are_fingerprinted(kind):
    """A sparse tensor or a conjugate view crashed the fingerprint; each kind must also be compared."""
    def leaf(read):
        base = torch.tensor([[0.0, 1.0 + read], [2.0, 0.0]])
        if kind == "sparse_coo":
            return base.to_sparse()
        if kind == "sparse_csr":
            return base.to_sparse_csr()
        if kind in ("conj", "complex"):
            c = torch.complex(base, base)
            return c.conj() if kind == "conj" else c
        if kind == "empty":
            return torch.zeros(2, 0) if read == 0 else torch.zeros(3, 0)
        if kind == "bool":
            return base > 1.5
        return base.sum()

    _two_reads(lambda read: [(leaf(0), torch.zeros(2))])  # the same each read: passes
    with pytest.raises(ValueError, match="other samples on read 2"):
        _two_reads(lambda read: [(leaf(read), torch.zeros(2))])


def test_a_read_that_replays_exactly_hashes_no_sample(monkeypatch):
    """The per-sample multisets of a batch equal to the first read's are reused, not recomputed."""
    import hwaware.export.reads as reads_mod

    calls = []
    real = reads_mod._sample_multisets
    monkeypatch.setattr(reads_mod, "_sample_multisets", lambda leaves, rows: calls.append(1) or real(leaves, rows))
    reads = ReplayedReads(DataLoader(_Noisy(96, "torch"), batch_size=32, shuffle=True))
    for _ in range(4):
        list(reads)
    assert len(calls) == 3
