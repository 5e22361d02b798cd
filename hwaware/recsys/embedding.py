"""``EmbeddingBagList``: a CTR model's tables, looked up together.

An ``nn.ModuleList`` of embedding bags (state-dict keys ``<name>.<t>.weight``, as a plain
``ModuleList``) whose forward takes every table's ids at once. In training and FP32 inference each
table is called in turn. After ``hwaware.export`` has replaced the tables with row-wise deploy
tables (``RowwiseEmbeddingBag``), the ones that agree on ``dim`` and mode are served by one
``hwaware::embedding_bags_rowwise`` call instead of one op call per table (TBE-style table
batching): at 26 tables of 2048 single-id bags the per-call cost of T calls was about as large as
the lookups themselves (``benchmarks/bench_ops_cpu.py``, "embedding").
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from hwaware.export.deploy import RowwiseEmbeddingBag, _hooked

__all__ = ["EmbeddingBagList"]


class EmbeddingBagList(nn.ModuleList):
    """Tables called as ``tables(ids, offsets) -> [table_t(ids[t], offsets) for t]``.

    ``ids``: ``[T, N]`` int64/int32, row t holding table t's ids (a strided view such as
    ``sparse.t()`` of a ``[B, T]`` batch is fine); ``offsets``: ``[B]``, the bag starts, shared by
    every table. Returns T tensors ``[B, D_t]``. A table with hooks (or any global module hook) is
    called on its own, so the hooks run.
    """

    @staticmethod
    def batched(table: nn.Module) -> bool:
        """Whether ``table`` is looked up by the table-batched op (a row-wise deploy table, sum or mean,
        without ``include_last_offset`` or ``padding_idx``, returning float32 as the op does, and no hooks
        to call) rather than called on its own. (A table packed from bf16/fp16 returns its own dtype:
        called on its own, it does.)"""
        return (type(table) is RowwiseEmbeddingBag and table.mode in ("sum", "mean") and not table.include_last_offset
                and table.padding_idx is None and table.out_dtype == torch.float32 and not _hooked(table))

    def _one_group(self, modules: list) -> tuple | None:
        """``(weights, bits, dim, mode)`` when every table is :meth:`batched` with one ``(dim, mode)``,
        else None; ``mode`` as the op takes it (0 sum, 1 mean). Buffers are read from ``_buffers``:
        ``nn.Module`` attribute lookups cost about a microsecond a table, a visible share of a small batch."""
        if not modules:
            return None
        first = modules[0]
        dim, mode = getattr(first, "dim", None), getattr(first, "mode", None)
        weights, bits = [], []
        for m in modules:
            if not self.batched(m) or m.dim != dim or m.mode != mode:
                return None
            weights.append(m._buffers["weight"])
            bits.append(m.bits)
        return weights, bits, dim, 0 if mode == "sum" else 1

    @staticmethod
    def _name_bad_table(ids: Tensor, modules: list, members) -> None:
        """The op numbers the tables it was given: raise the IndexError naming the table of this list."""
        for t in members:
            bad = ((ids[t] < 0) | (ids[t] >= modules[t].num_embeddings)).nonzero()
            if bad.numel():
                raise IndexError(f"ids[{t}] (table {t}) must lie in [0, {modules[t].num_embeddings}), "
                                 f"got {int(ids[t, bad[0, 0]])}") from None

    def forward(self, ids: Tensor, offsets: Tensor) -> list[Tensor]:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != len(self):
            shape = list(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be [T, N] with T = {len(self)} tables (row t: table t's ids), got {shape}")
        modules = list(self._modules.values())
        whole = self._one_group(modules)
        if whole is not None:  # the usual deployed model: every table in one call
            weights, bits, dim, mode = whole
            off = offsets if offsets.dtype == ids.dtype else offsets.to(ids.dtype)
            try:
                return list(torch.ops.hwaware.embedding_bags_rowwise.default(weights, bits, dim, ids, off, mode).unbind(0))
            except IndexError:
                self._name_bad_table(ids, modules, range(len(modules)))
                raise
        groups: dict[tuple, list[int]] = defaultdict(list)  # row-wise deploy tables by (dim, mode)
        plain: list[int] = []
        for t, m in enumerate(modules):
            if self.batched(m):
                groups[(m.dim, m.mode)].append(t)
            else:
                plain.append(t)
        out: list[Tensor | None] = [None] * len(modules)
        if plain:
            ids_c = ids.contiguous()  # one copy for all tables; each row then is a contiguous 1-D tensor
            for t in plain:
                out[t] = modules[t](ids_c[t], offsets)
        for (dim, mode), members in groups.items():
            if len(members) == len(modules):
                rows, tables = ids, modules
            else:
                rows, tables = ids[torch.tensor(members, device=ids.device)], [modules[t] for t in members]
            off = offsets if offsets.dtype == ids.dtype else offsets.to(ids.dtype)
            try:
                pooled = torch.ops.hwaware.embedding_bags_rowwise.default(
                    [m.weight for m in tables], [m.bits for m in tables], dim, rows, off, 0 if mode == "sum" else 1)
            except IndexError:
                self._name_bad_table(ids, modules, members)
                raise
            if len(members) == len(modules):
                return list(pooled.unbind(0))
            for t, v in zip(members, pooled.unbind(0)):
                out[t] = v
        return out  # type: ignore[return-value]
