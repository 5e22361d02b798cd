"""An artifact served on an older CPU than it was exported on: its recorded kernels vs the same
artifact re-timed there (``hwaware.load(path, kernels="measure")``), vs FP32; one run, JSON.

    python benchmarks/bench_export_recsys.py         # first: trains and exports out/bench_export/int{8,4}
    python benchmarks/bench_export_portability.py    # then this (~1 min)

Export times every int8 layer's implementations on the export machine (here: AMX-INT8) and records
the fastest; ``int_mm`` wins on AMX tiles. The older CPUs are this one with each library capped by
its own switch, in one child process each:

``no_amx``  hwaware's AMX pass off (``HWAWARE_NO_AMX=1``) and oneDNN capped below AMX
            (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI``; uncapped, its ``_int_mm`` runs faster, on the
            tiles): an AVX-512 VNNI server.
``avx512_no_vnni``  oneDNN capped at ``AVX512_CORE``, fbgemm at ``AVX512`` (its non-VNNI kernels) and
            hwaware's C library built for ``skylake-avx512``: a Skylake-SP server, AVX-512 without
            VNNI, where hwaware's int8 pass runs on VPMADDWD.
``avx2``    also torch (``ATEN_CPU_CAPABILITY=avx2``), oneDNN (``ONEDNN_MAX_CPU_ISA=AVX2``),
            fbgemm (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``) and MKL capped at AVX2, and hwaware's C
            library built for ``x86-64-v3`` (``HWAWARE_NATIVE_ARCH``): an AVX2-only CPU (hwaware's
            int8 pass on VPMADDWD, 8 lanes).

In each, interleaved at batch 2048: FP32 eager (the recipe's architecture; its weights do not change
speed), the artifact on its recorded kernels, the artifact re-timed there, and where hwaware's int8
pass has an engine there (AMX tiles; VNNI; VPMADDWD), the recorded artifact with it switched off; plus the AUROC of
both artifact variants on the recipe's validation split (the re-timed one may only pick
implementations that passed the export gate on their own, ``regression.by_impl``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results import WithEngines, cpu_device, write_json  # noqa: E402  (benchmarks/_results.py)

CPUS = {
    "this_cpu": {},
    "no_amx": {"HWAWARE_NO_AMX": "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "avx512_no_vnni": {"HWAWARE_NO_AMX": "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512",
                       "HWAWARE_NATIVE_ARCH": "skylake-avx512"},
    "avx2": {"HWAWARE_NO_AMX": "1", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "HWAWARE_NATIVE_ARCH": "x86-64-v3"},
}
# the recipe's defaults (recipes/qat_recsys.py): the same synthetic data, so the same validation split
NUM_SAMPLES, SEED = 400_000, 0


def child(path: str, batches: int, rounds: int, num_samples: int) -> dict:
    import hwaware
    from hwaware.export import read_manifest
    from hwaware.export.bench import compare_throughput
    from hwaware.export.exporter import model_class
    from hwaware.quant import native
    from hwaware.recsys import CriteoDataModule, evaluate_auroc

    manifest = read_manifest(path)
    # (the ISA caps do not show in /proc/cpuinfo: only a lost AMX pass can warn here)
    recorded = hwaware.load(path)
    measured = hwaware.load(path, kernels="measure")
    fp32 = model_class(manifest, path)(**(manifest["model"].get("hparams") or {})).eval()
    dm = CriteoDataModule(num_samples=num_samples, batch_size=2048, seed=SEED)
    dm.setup("fit")
    inputs = [(b["dense"], b["sparse"]) for _, b in zip(range(batches), dm.val_dataloader())]
    contenders = {"fp32": fp32, "recorded_kernels": recorded, "measured_here": measured}
    if native.int8_engine() is not None:  # what hwaware's int8 pass buys on this CPU: the same bits without it
        contenders["recorded_without_int8_engine"] = WithEngines(recorded)
    timing = compare_throughput(contenders, inputs, batch_size=2048, rounds=rounds)
    val = dm.val_dataloader()
    return {
        "native": native.native_status(), "amx_in_use": native.amx_available(), "int8_engine": native.int8_engine(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "kernels": {name: {"recorded": r["recorded"], "measured_here": r["op_kernel"],
                           "us": {c: e.get("us") for c, e in r["measured"].items()}}
                    for name, r in measured.hwaware_selection.items()},
        "throughput": timing,
        "auroc": {"recorded_kernels": evaluate_auroc(recorded, val), "measured_here": evaluate_auroc(measured, val)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", nargs="+", default=[os.path.join(ROOT, "out", "bench_export", f"int{b}") for b in (8, 4)])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "export_portability_cpu.json"))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="the recipe's --num-samples for its artifacts")
    p.add_argument("--child", nargs=2, metavar=("PATH", "CPU"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.batches, args.rounds, args.num_samples)))
        return
    for path in args.artifacts:
        if not os.path.exists(os.path.join(path, "manifest.json")):
            sys.exit(f"{path}: no artifact; run python benchmarks/bench_export_recsys.py first (it writes out/bench_export)")
    runs = []
    for path in args.artifacts:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        for cpu, env in CPUS.items():
            cmd = [sys.executable, os.path.abspath(__file__), "--child", path, cpu, "--batches", str(args.batches),
                   "--rounds", str(args.rounds), "--num-samples", str(args.num_samples)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=1800)
            if proc.returncode != 0:
                sys.exit(f"{cpu} child failed on {path}:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            models = r["throughput"]["models"]
            changes = ", ".join(f"{n} {k['recorded']}->{k['measured_here']}" for n, k in r["kernels"].items())
            print(f"{os.path.basename(path)} on {cpu}: FP32 1.00x, recorded kernels {models['recorded_kernels']['ratio']:.2f}x, "
                  f"re-timed here {models['measured_here']['ratio']:.2f}x"
                  + (f", without the {r['int8_engine']} engine {models['recorded_without_int8_engine']['ratio']:.2f}x"
                     if r["int8_engine"] else "") + f"; AUROC {r['auroc']['recorded_kernels']:.5f} / "
                  f"{r['auroc']['measured_here']:.5f}; {changes}")
            runs.append({"artifact": path, "cpu": cpu, "env": env, "exported_on": manifest.get("selection_cpu"),
                         "gate_by_impl": (manifest.get("regression") or {}).get("by_impl"), **r})
    write_json({"benchmark": "export_portability", "device": cpu_device(), "torch": torch.__version__,
                "note": "older CPUs emulated on this one by capping each library's instruction set (see the docstring)",
                "runs": runs}, args.out)


if __name__ == "__main__":
    main()
