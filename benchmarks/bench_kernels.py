"""Triton kernels vs torch's GPU contenders, side by side in one run; writes JSON. Needs a CUDA GPU.

    python benchmarks/bench_kernels.py                  # all shapes -> benchmarks/results/kernels_<device>.json
    python benchmarks/bench_kernels.py --quick          # K = N = 4096 and the recsys shapes only
    python benchmarks/bench_kernels.py --timing eager   # per-call CUDA events (includes Python launch cost)

GEMMs, ``y = x @ W^T``, M in {1, 16, 256, 4096} x (K = N in {4096, 8192}), plus recsys MLP layers at
M = 2048: 256->128, 1024->1024, 512->256. Contenders: fp16 cuBLAS (``F.linear``, the 1.0x baseline),
``torch._int_mm`` (int8 GEMM alone: no activation quantization, no dequant epilogue; needs M > 16),
``torch.sparse.to_sparse_semi_structured`` fp16 (CUTLASS/cuSPARSELt 2:4), torch's int4 tinygemm
(``aten._weight_int4pack_mm``, bf16 activations, group 128), and ours: W8A8 ``int8_linear``
(including its per-token quantization kernel), W4A16 ``int4_linear`` (fp16, group 128, asymmetric),
2:4 ``sparse24_linear`` with fp16 values and with int8 values (W8A8 math).
Embedding bags: fp32 ``F.embedding_bag`` (sum) vs our row-wise int8 / int4 tables; speed ratio and
table-bytes ratio.

Timing: every op runs over enough copies of its weight (or table) to cycle through more than 2x the
L2 cache, so weights stream from HBM as in a real model rather than from L2, and the time per op is
the total divided by the copies. Default ``--timing cudagraph`` replays the sequence in a CUDA graph
(``triton.testing.do_bench_cudagraph``), so the numbers are GPU time without Python launch overhead
for every contender alike; our launchers' autotuning runs once before capture. The embedding bags
run with ``check_indices=False`` (the op checks index values with one host sync per call, which a
graph cannot capture). Bandwidth = bytes that must move (weights + activations + outputs) / time,
as a fraction of the device's peak HBM bandwidth from NVIDIA's datasheets (``PEAK_HBM_TBPS``).

Targets (issue 5), reported pass/fail per shape and overall: int4 W4A16 at M <= 16 >= 3x fp16
cuBLAS; int8 W8A8 at M >= 256 >= 1.5x; 2:4 + int8 at M <= 16 >= 3x; int4 embedding bag >= 0.8x the
speed of fp32 ``F.embedding_bag`` at <= 1/6 of its table bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import code_version  # noqa: E402  (benchmarks/_results.py)

# Peak HBM bandwidth in TB/s from NVIDIA's product datasheets (H100 SXM5 80GB HBM3: 3.35; H100 PCIe:
# 2.0; H100 NVL: 3.9; H200 141GB HBM3e: 4.8; A100 80GB SXM: 2.039, PCIe: 1.935; A100 40GB: 1.555;
# L40S: 0.864; L4: 0.3; A10/A10G: 0.6; RTX 4090: 1.008). Matched in order against
# torch.cuda.get_device_name(), so the more specific names come first.
PEAK_HBM_TBPS = [
    ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8), ("GH200", 4.0),
    ("A100 80GB PCIe", 1.935), ("A100-SXM4-80GB", 2.039), ("A100", 1.555),
    ("L40S", 0.864), ("L4", 0.3), ("A10", 0.6), ("RTX 4090", 1.008),
]

TARGETS = {
    "int4_w4a16_small_m": 3.0,  # speedup vs fp16 cuBLAS at M <= 16
    "int8_w8a8_large_m": 1.5,  # speedup vs fp16 cuBLAS at M >= 256
    "sparse24_int8_small_m": 3.0,  # speedup vs fp16 cuBLAS at M <= 16
    "int4_embedding_bag_speed": 0.8,  # speed vs fp32 F.embedding_bag ...
    "int4_embedding_bag_bytes": 1 / 6,  # ... at no more than this fraction of its table bytes
}

DEVICE = "cuda"  # where the benchmark runs (a module global so a smoke test can point it elsewhere)
L2_FLUSH_BYTES = 2 * 64 * 2**20  # > 2x the largest L2 of these GPUs (H100/H200: 50 MB)


def peak_bandwidth(name: str) -> Optional[float]:
    for key, tbps in PEAK_HBM_TBPS:
        if key in name:
            return tbps * 1e12
    return None


def _copies(nbytes: int, cap: int = 64) -> int:
    return max(1, min(cap, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1))))


class Timer:
    def __init__(self, mode: str, rep_ms: int) -> None:
        self.mode, self.rep_ms = mode, rep_ms

    def per_call_ms(self, calls: List[Callable[[], object]]) -> float:
        """Median time of running every callable once, divided by their number (ms)."""
        import triton.testing

        def run():
            for c in calls:
                c()

        run()  # compile, autotune (our launchers), allocate outside any graph capture
        torch.cuda.synchronize()
        if self.mode == "cudagraph":
            t = triton.testing.do_bench_cudagraph(run, rep=self.rep_ms, return_mode="median")
        else:
            t = triton.testing.do_bench(run, warmup=max(5, self.rep_ms // 4), rep=self.rep_ms, return_mode="median")
        return t / len(calls)


def _contender(timer: Timer, calls_fn: Callable[[], List[Callable[[], object]]]) -> Dict:
    try:
        return {"ms": timer.per_call_ms(calls_fn())}
    except Exception as e:  # a contender unavailable on this device/shape is reported, not fatal
        return {"ms": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def _random_24(n: int, k: int, device) -> torch.Tensor:
    w = torch.randn(n, k, device=device) / k**0.5
    keep = torch.rand(n, k // 4, 4, device=device).argsort(-1)[..., :2]
    return (w.reshape(n, k // 4, 4) * torch.zeros(n, k // 4, 4, device=device).scatter_(-1, keep, 1.0)).reshape(n, k)


def bench_gemm(m: int, k: int, n: int, timer: Timer, peak: Optional[float]) -> Dict:
    from hwaware.kernels.int4_linear import int4_linear
    from hwaware.kernels.int8_linear import int8_linear
    from hwaware.kernels.sparse24_linear import sparse24_linear
    from hwaware.ops.packing import compress_24, quantize_int4_weight, quantize_int8_weight

    dev = DEVICE
    gs = 128
    w = _random_24(n, k, dev)  # 2:4 weights for every contender, so all compute the same function
    x16 = torch.randn(m, k, device=dev, dtype=torch.float16)
    xbf = x16.bfloat16()
    w16 = w.half()
    qw, ws = quantize_int8_weight(w)
    p4, s4, z4 = quantize_int4_weight(w.cpu(), gs, symmetric=False)
    p4, s4, z4 = p4.to(dev), s4.to(dev), z4.to(dev)
    v16, meta16 = compress_24(w16)
    v8, meta8 = compress_24(qw)
    rows: Dict[str, Dict] = {}
    act_out = m * k * 2 + m * n * 2  # fp16 activations in, fp16 out

    def reps(*tensors):
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return nbytes, _copies(nbytes)

    def add(name, weight_tensors, make_call):
        wbytes, c = reps(*weight_tensors)
        copies = [tuple(t.clone() for t in weight_tensors) for _ in range(c)]
        r = _contender(timer, lambda: [make_call(*cp) for cp in copies])
        r["bytes"] = wbytes + act_out
        if r["ms"]:
            r["TBps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e12
            r["bw_fraction_of_peak"] = (r["bytes"] / (r["ms"] * 1e-3) / peak) if peak else None
        rows[name] = r

    add("fp16_cublas", (w16,), lambda wt: (lambda: F.linear(x16, wt)))

    q8x = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
    if m > 16:
        add("torch_int_mm", (qw,), lambda wt: (lambda: torch._int_mm(q8x, wt.t())))
    else:
        rows["torch_int_mm"] = {"ms": None, "error": "torch._int_mm needs M > 16 on CUDA"}

    def semi(wt):
        ws_ = torch.sparse.to_sparse_semi_structured(wt)
        return lambda: F.linear(x16, ws_)
    add("torch_semi_structured_fp16", (w16,), semi)

    def tinygemm(wt_codes):
        # torch's int4 tinygemm (aten::_convert_weight_to_int4pack(Tensor self, int innerKTiles),
        # aten::_weight_int4pack_mm(Tensor self, Tensor mat2, int qGroupSize, Tensor qScaleAndZeros)):
        # [N, K/2] uint8 with the even element in the HIGH nibble, repacked to its tiled layout;
        # scales_and_zeros bf16 [K/g, N, 2]. tinygemm dequantizes w = (q - 8) * scale + zero, so
        # zero = (8 - zp) * scale gives our w = (q - zp) * scale (the same function as the others).
        packed = torch.ops.aten._convert_weight_to_int4pack(wt_codes, 8)
        zero = (8 - z4.float()) * s4
        sz = torch.stack([s4.t().bfloat16(), zero.t().bfloat16()], dim=-1).contiguous()
        return lambda: torch.ops.aten._weight_int4pack_mm(xbf, packed, gs, sz)
    codes_hi = ((p4 & 0xF) << 4) | (p4 >> 4)  # our low-nibble-first bytes with the nibbles swapped
    add("torch_int4_tinygemm_bf16", (codes_hi,), tinygemm)

    add("hwaware_int8_w8a8", (qw, ws), lambda a, b: (lambda: int8_linear(x16, a, b)))
    add("hwaware_int4_w4a16", (p4, s4, z4), lambda a, b, c: (lambda: int4_linear(x16, a, b, c, gs)))
    add("hwaware_sparse24_fp16", (v16, meta16), lambda a, b: (lambda: sparse24_linear(x16, a, b)))
    add("hwaware_sparse24_int8", (v8, meta8, ws), lambda a, b, c: (lambda: sparse24_linear(x16, a, b, c)))

    base = rows["fp16_cublas"]["ms"]
    for r in rows.values():
        r["speedup_vs_fp16_cublas"] = (base / r["ms"]) if (base and r.get("ms")) else None
    return {"M": m, "K": k, "N": n, "contenders": rows}


def bench_embedding_bag(dim: int, rows_: int, batch: int, pooling: int, timer: Timer, peak: Optional[float]) -> Dict:
    from hwaware.kernels.embedding_bag_rowwise import embedding_bag_rowwise
    from hwaware.ops.packing import quantize_rowwise

    dev = DEVICE
    table = torch.randn(rows_, dim, device=dev)
    off = torch.arange(0, batch * pooling, pooling, device=dev)
    # tables are too large to copy, so the index sets rotate instead: enough random batches that the
    # rows they gather (fp32: batch * pooling * dim * 4 bytes each) exceed the L2 flush size
    n_sets = _copies(batch * pooling * dim * 4, cap=16)
    idx_sets = [torch.randint(0, rows_, (batch * pooling,), device=dev) for _ in range(n_sets)]
    res: Dict[str, Dict] = {}
    fp32_bytes = table.numel() * 4
    for name, t, fn in [
        ("fp32_embedding_bag", table, lambda t, idx: (lambda: F.embedding_bag(idx, t, off, mode="sum"))),
        ("hwaware_int8_rowwise", quantize_rowwise(table, 8),
         lambda t, idx: (lambda: embedding_bag_rowwise(t, 8, dim, idx, off, 0, None, False, check_indices=False))),
        ("hwaware_int4_rowwise", quantize_rowwise(table, 4),
         lambda t, idx: (lambda: embedding_bag_rowwise(t, 4, dim, idx, off, 0, None, False, check_indices=False))),
    ]:
        tbytes = t.numel() * t.element_size()
        row_bytes = tbytes // rows_
        r = _contender(timer, lambda: [fn(t, idx) for idx in idx_sets])
        r["table_bytes"] = tbytes
        r["table_bytes_vs_fp32"] = tbytes / fp32_bytes
        r["bytes"] = batch * pooling * (row_bytes + 8) + batch * dim * 4  # rows + int64 indices, fp32 out
        if r["ms"]:
            r["TBps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e12
            r["bw_fraction_of_peak"] = (r["bytes"] / (r["ms"] * 1e-3) / peak) if peak else None
        res[name] = r
    base = res["fp32_embedding_bag"]["ms"]
    for r in res.values():
        r["speed_vs_fp32"] = (base / r["ms"]) if (base and r.get("ms")) else None
    return {"dim": dim, "rows": rows_, "batch": batch, "pooling": pooling, "contenders": res}


def evaluate_targets(gemms: List[Dict], bags: List[Dict]) -> Dict:
    def check(name, entries, target):
        vals = [(f"M={g['M']} K={g['K']} N={g['N']}", g["contenders"][name].get("speedup_vs_fp16_cublas")) for g in entries]
        ok = bool(vals) and all(v is not None and v >= target for _, v in vals)
        return {"target": f">= {target}x fp16 cuBLAS", "passed": ok, "per_shape": dict(vals)}

    small = [g for g in gemms if g["M"] <= 16]
    large = [g for g in gemms if g["M"] >= 256]
    out = {
        "int4_w4a16_at_M<=16": check("hwaware_int4_w4a16", small, TARGETS["int4_w4a16_small_m"]),
        "int8_w8a8_at_M>=256": check("hwaware_int8_w8a8", large, TARGETS["int8_w8a8_large_m"]),
        "sparse24_int8_at_M<=16": check("hwaware_sparse24_int8", small, TARGETS["sparse24_int8_small_m"]),
    }
    per = {}
    ok = bool(bags)
    for b in bags:
        c = b["contenders"]["hwaware_int4_rowwise"]
        good = (c.get("speed_vs_fp32") is not None and c["speed_vs_fp32"] >= TARGETS["int4_embedding_bag_speed"]
                and c["table_bytes_vs_fp32"] <= TARGETS["int4_embedding_bag_bytes"])
        per[f"dim={b['dim']}"] = {"speed_vs_fp32": c.get("speed_vs_fp32"), "bytes_vs_fp32": c["table_bytes_vs_fp32"],
                                  "passed": good}
        ok = ok and good
    out["int4_embedding_bag"] = {"target": ">= 0.8x fp32 F.embedding_bag speed at <= 1/6 of its table bytes",
                                 "passed": ok, "per_shape": per}
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    p.add_argument("--quick", action="store_true", help="K = N = 4096 and the recsys shapes only")
    p.add_argument("--timing", choices=("cudagraph", "eager"), default="cudagraph")
    p.add_argument("--rep", type=int, default=100, help="timed repetition budget per contender (ms)")
    p.add_argument("--ms", type=int, nargs="*", default=[1, 16, 256, 4096], help="M values for the square shapes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); it measures GPU kernels "
              "and does not estimate numbers without one.", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_kernels.py needs triton: pip install triton", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name)
    timer = Timer(args.timing, args.rep)
    sizes = [4096] if args.quick else [4096, 8192]
    shapes = [(m, s, s) for s in sizes for m in args.ms] + [(2048, 256, 128), (2048, 1024, 1024), (2048, 512, 256)]
    gemms = []
    for m, k, n in shapes:
        g = bench_gemm(m, k, n, timer, peak)
        ratios = [f"{c}={r['speedup_vs_fp16_cublas']:.2f}x" for c, r in g["contenders"].items()
                  if r.get("speedup_vs_fp16_cublas")]
        print(f"M={m:5d} K={k:5d} N={n:5d}  " + "  ".join(ratios), flush=True)
        gemms.append(g)
    bags = []
    for dim in (64, 128):
        b = bench_embedding_bag(dim, rows_=1_000_000, batch=2048, pooling=32, timer=timer, peak=peak)
        print(f"embedding_bag dim={dim}  " + "  ".join(
            f"{c}={r['speed_vs_fp32']:.2f}x@{r['table_bytes_vs_fp32']:.3f}B" for c, r in b["contenders"].items()
            if r.get("speed_vs_fp32")), flush=True)
        bags.append(b)
    targets = evaluate_targets(gemms, bags)
    result = {
        "benchmark": "bench_kernels", "device": name, "peak_hbm_bytes_per_s": peak,
        "peak_source": "NVIDIA datasheet values in PEAK_HBM_TBPS (benchmarks/bench_kernels.py)" if peak else
                       f"unknown device {name!r}: add it to PEAK_HBM_TBPS",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "timing": args.timing, "rep_ms": args.rep, "gemm": gemms, "embedding_bag": bags, "targets": targets,
        "code": code_version(),
    }
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"kernels_{_slug(name)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    for t, r in targets.items():
        print(f"{t}: {'PASS' if r['passed'] else 'FAIL'} ({r['target']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
