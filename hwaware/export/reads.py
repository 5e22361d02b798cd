"""Every read of the regression gate's validation loader gives the same batches.

The gate reads ``val_dataloader`` once per model it compares (the FP32 reference, each int8
implementation, the chosen mix), so a loader that draws anything at random (a sampler with
replacement, a random crop, noise in ``__getitem__``, a shuffle) would compare the models on
different data, and the verdict would be sampling noise: in a trial one model passed, passed, then
failed. :class:`ReplayedReads` wraps the loader: before each read it puts back the random state the
first read started from, so every read draws the same numbers, and it checks that it did, by a
fingerprint of every batch (the inputs as well as the targets). What it cannot replay (worker
processes that keep their state across reads, a generator it cannot see) is caught by that check;
a read that gives the same samples in another order (a shuffle it could not replay) still passes,
since no metric the gate computes depends on the order. A sample is compared whole (its inputs with
its target, by a digest of their bytes), so inputs and targets shuffled apart are refused; a batch
with an input of no per-sample rows (offsets-style ids, a sequence-first ``[T, B]`` input) matches
only as the same batch.
"""
from __future__ import annotations

import collections.abc
import hashlib
import random
import sys
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["ReplayedReads"]

# objects of a DataLoader whose attributes may hold the generators a read draws from
_OWNERS = ("sampler", "batch_sampler", "dataset")
_OWNED = ("sampler", "transform", "transforms", "target_transform")


def _generators(loader: Any) -> List[Any]:
    """The random generators a read of ``loader`` may draw from besides the global ones: torch,
    numpy and ``random.Random`` generators held (one attribute deep) by the loader, its sampler,
    batch sampler and dataset, and their sampler / transforms."""
    while hasattr(loader, "loader") and not hasattr(loader, "sampler"):  # HookedBatches and the like
        loader = loader.loader
    objs = [loader]
    for name in _OWNERS:
        obj = getattr(loader, name, None)
        if obj is not None:
            objs.append(obj)
            objs += [o for o in (getattr(obj, n, None) for n in _OWNED) if o is not None]
    np_gen = getattr(sys.modules.get("numpy"), "random", None)
    kinds: Tuple[type, ...] = (torch.Generator, random.Random)
    if np_gen is not None:
        kinds += (np_gen.Generator, np_gen.RandomState)
    found: Dict[int, Any] = {}
    for obj in objs:
        for value in list(vars(obj).values()) if hasattr(obj, "__dict__") else ():
            if isinstance(value, kinds) and value is not random._inst:
                try:
                    _get_state(value)
                except (NotImplementedError, TypeError, AttributeError):  # random.SystemRandom: no state to put back
                    continue
                found.setdefault(id(value), value)
    return list(found.values())


def _plain(batch: Any) -> Any:
    """``batch`` with mappings and sequences pytree does not open (a HuggingFace ``BatchEncoding``,
    a ``UserDict``) as dicts and lists, and numpy arrays as tensors: every value is fingerprinted."""
    np = sys.modules.get("numpy")
    if isinstance(batch, Tensor):
        return batch
    if np is not None and isinstance(batch, np.ndarray) and batch.dtype != object:
        return torch.from_numpy(batch)
    if isinstance(batch, collections.abc.Mapping):
        return {k: _plain(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_plain(v) for v in batch) if type(batch) in (list, tuple) else [_plain(v) for v in batch]
    return batch


def _get_state(g: Any) -> Any:
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, random.Random):
        return g.getstate()
    if hasattr(g, "bit_generator"):  # numpy Generator
        return g.bit_generator.state
    return g.get_state()  # numpy RandomState


def _set_state(g: Any, state: Any) -> None:
    if isinstance(g, torch.Generator):
        g.set_state(state)
    elif isinstance(g, random.Random):
        g.setstate(state)
    elif hasattr(g, "bit_generator"):
        g.bit_generator.state = state
    else:
        g.set_state(state)


class _RandomState:
    """The global random states (torch's CPU and initialized CUDA generators, ``random``'s, numpy's
    global one) and those of ``generators``."""

    def __init__(self, generators: List[Any]) -> None:
        self.generators = generators
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.python = random.getstate()
        np = sys.modules.get("numpy")
        self.numpy = np.random.get_state() if np is not None else None
        self.own = [_get_state(g) for g in generators]

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        np = sys.modules.get("numpy")
        if self.numpy is not None and np is not None:
            np.random.set_state(self.numpy)
        for g, state in zip(self.generators, self.own):
            _set_state(g, state)


def leaf_bytes(t: Tensor) -> memoryview:
    """``t``'s elements as a byte buffer (on the CPU, contiguous; no copy of a CPU tensor that is
    contiguous already): what a digest of its contents hashes."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _rows(t: Tensor) -> Tuple[Any, str]:
    """``t`` as a 2-d uint8 numpy array, one row of bytes per sample along dim 0 (a 0-d tensor is
    one row), and a description of its rows (dtype, layout, the shape after dim 0) for the digests.
    A sparse tensor is one row (its coalesced indices and values); conjugate and negative views
    are resolved, so the bytes are the values the model reads."""
    t = t.detach()
    if t.is_nested:
        parts = list(t.unbind())
        raw = np.concatenate([_rows(p)[0].reshape(-1) for p in parts]) if parts else np.zeros(0, np.uint8)
        return raw.reshape(1, -1), f"nested {t.dtype} [{', '.join(str(tuple(p.shape)) for p in parts)}]"
    if t.layout != torch.strided:
        c = t.to_sparse().coalesce()
        raw = np.concatenate([_rows(c.indices())[0].reshape(-1), _rows(c.values())[0].reshape(-1)])
        return raw.reshape(1, -1), f"sparse {t.dtype} {tuple(t.shape)}"
    t = t.resolve_conj().resolve_neg().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy()
    rows = 1 if t.dim() == 0 else t.shape[0]
    return raw.reshape(rows, raw.size // rows if rows else 0), f"{t.dtype} {tuple(t.shape[1:])}"


_MOD = 1 << 128


def _add_rows(counts: Dict[str, List[int]], key: str, rows: List[Any]) -> None:
    """Adds the rows (byte strings or arrays) to the multiset ``key`` of ``counts``: [count, sum of
    the rows' 128-bit blake2b digests mod 2**128]; equal multisets give equal entries, in any order."""
    entry = counts.setdefault(key, [0, 0])
    total = entry[1]
    for r in rows:
        total += int.from_bytes(hashlib.blake2b(r, digest_size=16).digest(), "little")
    entry[0] += len(rows)
    entry[1] = total % _MOD


def _sample_multisets(leaves: List[Any], rows: Dict[int, Tuple[Any, str]]) -> Dict[str, List[int]]:
    """One batch's samples as order-free multisets. A sample is one index along dim 0 of every
    tensor leaf whose dim 0 is the batch's size (the size most leaves have; on a tie, the last
    such leaf's), so its inputs and target stay together. A tensor leaf of another dim 0 (flat
    offsets-style ids, a 0-d tensor) has no per-sample rows: it is one member, whole, so such a
    batch matches only as the same batch in the same order. The other leaves are one multiset of
    their reprs. ``rows``: :func:`_rows` of each tensor leaf, by its index."""
    tensors = [(i, leaf) for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    sizes = [leaf.shape[0] for _, leaf in tensors if leaf.dim() and leaf.layout == torch.strided and not leaf.is_nested]
    size = max(reversed(sizes), key=sizes.count) if sizes else None
    counts: Dict[str, List[int]] = {}
    aligned, names, whole = [], [], []
    for i, leaf in tensors:
        r, what = rows[i]
        if size is not None and leaf.dim() and leaf.layout == torch.strided and not leaf.is_nested and leaf.shape[0] == size:
            aligned.append(r)
            names.append(f"{i}: {what}")
        else:
            whole.append(f"{i}: {what} {tuple(leaf.shape)}".encode() + r.tobytes())
    if aligned:
        joined = aligned[0] if len(aligned) == 1 else np.concatenate(aligned, axis=1)
        _add_rows(counts, "samples " + "; ".join(names), list(joined))
    if whole:  # (ids permuted within a batch whose targets stayed put passed as a multiset of ids)
        _add_rows(counts, "batches with leaves of no per-sample rows", [b"".join(whole)])
    others = [repr(leaf).encode() if isinstance(leaf, (int, float, str, bytes, bool, type(None))) else type(leaf).__qualname__.encode()
              for leaf in leaves if not isinstance(leaf, Tensor)]
    if others:
        _add_rows(counts, "other leaves", others)
    return counts


class _Fingerprint:
    """What one read gave: an exact digest per batch (in order), and per batch its samples as
    order-free multisets (:func:`_sample_multisets`), so the same samples read in another order
    match. A batch equal to the same batch of ``like`` (the first read) reuses its multisets: a
    read that replays exactly costs one digest per batch."""

    def __init__(self, like: Optional["_Fingerprint"] = None) -> None:
        self.digests: List[str] = []
        self.parts: List[Dict[str, List[int]]] = []
        self.like = like

    def add(self, batch: Any) -> None:
        leaves, spec = pytree.tree_flatten(_plain(batch))
        h = hashlib.blake2b(str(spec).encode(), digest_size=16)
        rows: Dict[int, Tuple[Any, str]] = {}
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                rows[i] = r, what = _rows(leaf)
                h.update(f"{what} {tuple(leaf.shape)}".encode())  # (the full shape: a 0-d and a [1] tensor differ)
                h.update(r)
            else:
                h.update(repr(leaf).encode() if isinstance(leaf, (int, float, str, bytes, bool, type(None)))
                         else type(leaf).__qualname__.encode())
        digest, i = h.hexdigest(), len(self.digests)
        self.digests.append(digest)
        like = self.like
        if like is not None and i < len(like.digests) and like.digests[i] == digest:
            self.parts.append(like.parts[i])
        else:
            self.parts.append(_sample_multisets(leaves, rows))

    def multisets(self) -> Dict[str, Tuple[int, int]]:
        total: Dict[str, List[int]] = {}
        for part in self.parts:
            for key, (n, s) in part.items():
                entry = total.setdefault(key, [0, 0])
                entry[0] += n
                entry[1] = (entry[1] + s) % _MOD
        return {k: (n, s) for k, (n, s) in total.items()}

    def same_samples(self, other: "_Fingerprint") -> bool:
        return self.multisets() == other.multisets()

    def first_difference(self, other: "_Fingerprint") -> str:
        for i, (a, b) in enumerate(zip(self.digests, other.digests)):
            if a != b:
                return f"batch {i} differs"
        return f"{len(self.digests)} batches, then {len(other.digests)}"


class ReplayedReads:
    """``loader`` read afresh on every iteration, each read from the random state the first began
    with, checked to give the same samples; :meth:`finish` leaves the random state as one read of
    the loader left it. ``who`` names the caller in errors."""

    def __init__(self, loader: Iterable, who: str = "export") -> None:
        self.loader, self.who = loader, who
        self._start: Optional[_RandomState] = None
        self._after: Optional[_RandomState] = None
        self._first: Optional[_Fingerprint] = None
        self._reads = 0

    def __iter__(self) -> Iterator[Any]:
        generators = _generators(self.loader)
        if self._start is None:
            self._start = _RandomState(generators)
        else:
            self._start.restore()
        seen = _Fingerprint(like=self._first)
        for batch in self.loader:
            seen.add(batch)  # before the model sees it (a model may change a batch in place)
            yield batch
        self._reads += 1  # a complete read (a partial one, e.g. one batch to time kernels on, is not compared)
        if self._first is None:
            self._first, self._after = seen, _RandomState(generators)
            return
        self._after.restore()  # as one read left it, whatever export does next (a refusal raises after a read)
        if seen.digests != self._first.digests and not seen.same_samples(self._first):
            raise ValueError(
                f"{self.who}: val_dataloader gave other samples on read {self._reads} than on the first "
                f"({self._first.first_difference(seen)}), although the gate puts back the random state the first read "
                "started from before each read (torch's, random's and numpy's global generators, and the generators the "
                "loader, its sampler and dataset hold). The gate runs each model it compares on its own read, so it "
                "would compare them on different data. Something it cannot replay changed the batches: worker "
                "processes that keep their state across reads (persistent_workers=True), a generator held elsewhere, or "
                "a batch changed in place by the model, a batch hook or output_fn (a list of batches is the same objects "
                "on every read). Pass a loader that gives the same samples on every read")

    def finish(self) -> None:
        """The random state as the first complete read left it (as if the loader was read once)."""
        if self._after is not None:
            self._after.restore()
