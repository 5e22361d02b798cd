"""Per-call cost of the CPU deploy ops at the recipe DLRM's shapes, side by side with FP32; JSON.

    python benchmarks/bench_ops_cpu.py        # ~30 s; writes benchmarks/results/ops_cpu.json

What the whole-model numbers in benchmarks/bench_export_recsys.py are made of, at batch 2048:
- every Linear of the recipe's DLRM (13->64, 64->16, 367->256, 256->128, 128->1), each followed by
  its ReLU where the model has one: ``hwaware::int8_linear`` with each CPU implementation (ReLU
  fused), against fp32 ``F.linear`` + ``torch.relu``;
- the top MLP's int8 layers (367->256->128, ReLU after each) from the interaction's int8 codes,
  ``hwaware::int8_mlp_quantized``, on each engine of hwaware's int8 pass this CPU has (AMX tiles;
  VNNI, which a CPU without AMX runs; VPMADDWD, which a CPU without VNNI runs) and with none
  (``torch._int_mm`` between the C passes: oneDNN, which uses AMX itself where it may), against
  fp32 ``F.linear`` + ``torch.relu`` twice;
- one embedding lookup (2048 single-row bags, 16 wide, a 48,000-row table): the deploy module, the
  op, fbgemm's kernel alone, the op's bounds check alone, and FP32 ``nn.EmbeddingBag``;
- all 26 tables of the recipe DLRM (dim 16, int8 rows, one batch of generated Criteo-schema ids):
  FP32 ``nn.EmbeddingBag`` per table, the deploy modules called per table, ``EmbeddingBagList``
  (one ``hwaware::embedding_bags_rowwise`` call, what the exported DLRM ran before the fused pass
  below; also with every id 0, which leaves the pass and its output write without the random reads)
  and fbgemm's kernel alone per table (no checks, no module);
- interaction: ``hwaware::dot_interaction`` (one C pass) against the torch ops it replaces
  (stack, bmm, index_select, cat: ``dot_interaction_ref``) on 27 vectors of [2048, 16], forward
  alone and forward + backward;
- lookups + interaction (the exported DLRM's middle, x [2048, 16] and the 26 int8 tables above):
  ``hwaware::embedding_interaction_int8`` (one pass: the rows go straight into the interaction's
  blocks, its output is the top MLP's int8 input) against the two ops it fuses
  (``EmbeddingBagList`` + ``hwaware::dot_interaction_int8``, bit for bit the same) and against what
  the FP32 model runs (``nn.EmbeddingBag`` per table + ``hwaware::dot_interaction``);
- dispatch: an op that returns an empty tensor, registered as the hwaware ops are
  (``hwaware.ops._Op``) and with ``torch.library.custom_op``, called under ``torch.no_grad()`` and
  ``torch.inference_mode()`` (aten's own ``empty_like`` for scale).
Medians of interleaved rounds (contenders alternate, so drift on a shared machine hits all alike);
ratios are to the FP32 contender of the same row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

import hwaware.ops  # noqa: F401  (registers torch.ops.hwaware.*)
from hwaware.export.deploy import RowwiseEmbeddingBag
from hwaware.ops import INT8_KERNELS, packing
from hwaware.ops.reference import quantize_per_token_ref
from hwaware.quant import native

from _results import cpu_device, write_json  # benchmarks/_results.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 2048
# (K, N, followed by ReLU) of hwaware.recsys.DLRM's defaults: bottom 13-64-16, top 367-256-128-1
LINEARS = [(13, 64, True), (64, 16, True), (367, 256, True), (256, 128, True), (128, 1, False)]


def _interleaved_us(fns: Dict[str, Callable[[], object]], rounds: int, calls: int) -> Dict[str, float]:
    """Median over ``rounds`` of the mean time of ``calls`` back-to-back calls, per contender (µs)."""
    for fn in fns.values():
        for _ in range(10):
            fn()
    samples: Dict[str, list] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter_ns() - t0) / calls / 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def linears(rounds: int) -> list:
    g = torch.Generator().manual_seed(0)
    rows = []
    for k, n, relu in LINEARS:
        x = torch.relu(torch.randn(BATCH, k, generator=g))
        w, b = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
        qw, s = packing.quantize_int8_weight(w)
        fns = {"fp32": (lambda: torch.relu(F.linear(x, w, b))) if relu else (lambda: F.linear(x, w, b))}
        for impl in INT8_KERNELS["cpu"]:
            fns[f"int8_{impl}"] = lambda impl=impl: torch.ops.hwaware.int8_linear(x, qw, s, b, impl, relu)
        us = _interleaved_us(fns, rounds, calls=20)
        rows.append({"shape": [BATCH, k, n], "relu": relu, "us": us,
                     "time_vs_fp32": {name: t / us["fp32"] for name, t in us.items()}})
    return rows


def top_mlp(rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(BATCH, 367, generator=g))
    ws = [torch.randn(n, k, generator=g) / k**0.5 for k, n in ((367, 256), (256, 128))]
    bs = [torch.randn(n, generator=g) for n in (256, 128)]
    qws, scales = zip(*(packing.quantize_int8_weight(w) for w in ws))
    codes, sx = quantize_per_token_ref(x)

    def on(*engines: str) -> Callable[[], object]:
        def run():
            with native.only_engines(*engines):
                return torch.ops.hwaware.int8_mlp_quantized(codes, sx, list(qws), list(scales), bs, [True, True])
        return run

    fns = {"fp32": lambda: torch.relu(F.linear(torch.relu(F.linear(x, ws[0], bs[0])), ws[1], bs[1]))}
    for engine, have in native.engines_available().items():
        if have:
            fns[engine] = on(engine)
    fns["int_mm_passes"] = on()
    outs = {name: fn() for name, fn in fns.items() if name != "fp32"}
    first = next(iter(outs.values()))
    assert all(torch.equal(o, first) for o in outs.values()), "the engines must give the same bits"
    us = _interleaved_us(fns, rounds, calls=5)
    return {"shape": [BATCH, 367, 256, 128], "us": us, "time_vs_fp32": {name: t / us["fp32"] for name, t in us.items()}}


def embedding(rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(48_000, 16, generator=g) * 0.01
    fused = packing.quantize_rowwise(table, 8)
    module = RowwiseEmbeddingBag(fused, 8, 16, "sum", False)
    fp32 = nn.EmbeddingBag.from_pretrained(table, mode="sum")
    ids = torch.randint(0, 48_000, (BATCH,), generator=g)
    offsets = torch.arange(BATCH)
    op = torch.ops.hwaware.embedding_bag_rowwise.default
    fbgemm = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
    fns = {
        "fp32_nn_EmbeddingBag": lambda: fp32(ids, offsets),
        "deploy_module": lambda: module(ids, offsets),
        "hwaware_op": lambda: op(fused, 8, 16, ids, offsets, 0, None, False),
        "fbgemm_kernel_alone": lambda: fbgemm(fused, ids, offsets, False, 0, False, None, None, False),
        "bounds_check_alone": lambda: native.check_bags(ids, offsets, 48_000, False),
    }
    us = _interleaved_us(fns, rounds, calls=200)
    return {"lookups": BATCH, "dim": 16, "rows": 48_000, "us": us,
            "time_vs_fp32": {name: t / us["fp32_nn_EmbeddingBag"] for name, t in us.items()},
            "native": native.native_status()}


def embedding_tables(rounds: int) -> dict:
    from hwaware.recsys import DEFAULT_TABLE_SIZES, CriteoDataModule, EmbeddingBagList

    dm = CriteoDataModule(num_samples=20_000, batch_size=BATCH, seed=0)
    dm.setup("fit")
    sparse = next(iter(dm.val_dataloader()))["sparse"]  # [B, 26], the generator's skewed ids
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(n, 16, generator=g) * n**-0.5 for n in DEFAULT_TABLE_SIZES]
    fp32 = EmbeddingBagList(nn.EmbeddingBag.from_pretrained(t, mode="sum") for t in tables)
    deploy = EmbeddingBagList(RowwiseEmbeddingBag(packing.quantize_rowwise(t, 8), 8, 16, "sum", False) for t in tables)
    offsets = torch.arange(BATCH)
    ids = sparse.t()
    zeros = torch.zeros_like(ids)
    per_table_ids = [ids[t].contiguous() for t in range(len(tables))]
    fbgemm = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
    fns = {
        "fp32_per_table": lambda: fp32(ids, offsets),
        "deploy_modules_per_table": lambda: [m(i, offsets) for m, i in zip(deploy, per_table_ids)],
        "EmbeddingBagList_one_call": lambda: deploy(ids, offsets),
        # the same call with every id 0: one cached row per table, so what is left is the pass and
        # writing the [26, 2048, 16] output, not the random reads
        "EmbeddingBagList_one_call_all_ids_0": lambda: deploy(zeros, offsets),
        "fbgemm_kernels_alone": lambda: [fbgemm(m.weight, i, offsets, False, 0, False, None, None, False)
                                         for m, i in zip(deploy, per_table_ids)],
    }
    us = _interleaved_us(fns, rounds, calls=20)
    return {"tables": len(tables), "lookups_per_table": BATCH, "dim": 16, "us": us,
            "time_vs_fp32": {name: t / us["fp32_per_table"] for name, t in us.items()}}


def lookups_and_interaction(rounds: int) -> dict:
    from hwaware.recsys import DEFAULT_TABLE_SIZES, CriteoDataModule, EmbeddingBagList

    dm = CriteoDataModule(num_samples=20_000, batch_size=BATCH, seed=0)
    dm.setup("fit")
    sparse = next(iter(dm.val_dataloader()))["sparse"]
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(n, 16, generator=g) * n**-0.5 for n in DEFAULT_TABLE_SIZES]
    fp32 = EmbeddingBagList(nn.EmbeddingBag.from_pretrained(t, mode="sum") for t in tables)
    deploy = EmbeddingBagList(RowwiseEmbeddingBag(packing.quantize_rowwise(t, 8), 8, 16, "sum", False) for t in tables)
    weights, bits = [m.weight for m in deploy], [m.bits for m in deploy]
    x, offsets, ids = torch.randn(BATCH, 16, generator=g), torch.arange(BATCH), sparse.t()
    ops = torch.ops.hwaware
    fns = {
        "fp32_tables_then_interaction": lambda: ops.dot_interaction.default([x] + fp32(ids, offsets), 0),
        "deploy_two_ops": lambda: ops.dot_interaction_int8.default([x] + deploy(ids, offsets), 0),
        "deploy_one_pass": lambda: ops.embedding_interaction_int8.default(x, weights, bits, ids, 0),
    }
    us = _interleaved_us(fns, rounds, calls=10)
    return {"shape": {"batch": BATCH, "tables": len(tables), "dim": 16}, "us": us,
            "time_vs_fp32": {name: t / us["fp32_tables_then_interaction"] for name, t in us.items()},
            "one_pass_vs_two_ops": us["deploy_one_pass"] / us["deploy_two_ops"]}


def interaction(rounds: int) -> dict:
    from hwaware.ops.reference import dot_interaction_ref

    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(BATCH, 16, generator=g) for _ in range(27)]  # the recipe DLRM: x + 26 tables
    leaves = [v.clone().requires_grad_(True) for v in vectors]
    grad = torch.randn(BATCH, 16 + 351, generator=g)
    op = torch.ops.hwaware.dot_interaction.default
    with torch.inference_mode():
        fwd = _interleaved_us({"torch_ops": lambda: dot_interaction_ref(vectors, 0),
                               "hwaware_op": lambda: op(vectors, 0)}, rounds, calls=10)
    with torch.inference_mode(False), torch.enable_grad():
        train = _interleaved_us({"torch_ops": lambda: torch.autograd.grad(dot_interaction_ref(leaves, 0), leaves, grad),
                                 "hwaware_op": lambda: torch.autograd.grad(op(leaves, 0), leaves, grad)}, rounds, calls=5)
    return {"shape": {"batch": BATCH, "vectors": 27, "dim": 16},
            "forward_us": fwd, "forward_and_backward_us": train,
            "time_vs_torch_ops": {"forward": fwd["hwaware_op"] / fwd["torch_ops"],
                                  "forward_and_backward": train["hwaware_op"] / train["torch_ops"]}}


def dispatch(rounds: int) -> dict:
    from hwaware.ops import _Op

    lib = torch.library.Library("hwaware_bench", "DEF")  # not the hwaware namespace: a throwaway op
    def kernel(x):
        return torch.empty(0)
    registered = _Op("empty(Tensor x) -> Tensor", kernel, lib)
    custom = torch.library.custom_op("hwaware_bench::empty_custom_op", kernel, mutates_args=(), device_types="cpu",
                                     schema="(Tensor x) -> Tensor")
    x = torch.randn(4)
    out = {}
    for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        with ctx():
            fns = {"aten_empty_like": lambda: torch.ops.aten.empty_like.default(x),
                   "hwaware_registration": lambda: registered.default(x),
                   "custom_op": lambda: torch.ops.hwaware_bench.empty_custom_op.default(x)}
            us = _interleaved_us(fns, rounds, calls=2000)
        out[mode] = {"us": us, "custom_op_vs_hwaware": us["custom_op"] / us["hwaware_registration"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ops_cpu.json"))
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    with torch.inference_mode():
        result = {
            "benchmark": "ops_cpu",
            "device": cpu_device(),
            "torch": torch.__version__,
            "linears": linears(args.rounds),
            "top_mlp": top_mlp(args.rounds),
            "embedding": embedding(args.rounds),
            "embedding_tables": embedding_tables(args.rounds),
            "lookups_and_interaction": lookups_and_interaction(args.rounds),
        }
    result["interaction"] = interaction(args.rounds)  # sets its own grad modes
    result["dispatch"] = dispatch(args.rounds)
    for r in result["linears"]:
        print(r["shape"], {k: round(v) for k, v in r["us"].items()})
    print("top MLP", {k: round(v) for k, v in result["top_mlp"]["us"].items()})
    print("embedding", {k: round(v, 1) for k, v in result["embedding"]["us"].items()})
    print("embedding tables", {k: round(v, 2) for k, v in result["embedding_tables"]["time_vs_fp32"].items()})
    print("lookups + interaction", {k: round(v, 2) for k, v in result["lookups_and_interaction"]["time_vs_fp32"].items()})
    print("interaction", result["interaction"]["time_vs_torch_ops"])
    for mode, r in result["dispatch"].items():
        print("dispatch", mode, {k: round(v, 2) for k, v in r["us"].items()})
    write_json(result, args.out)


if __name__ == "__main__":
    main()
