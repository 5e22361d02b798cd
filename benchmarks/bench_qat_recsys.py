"""QAT cost and quality on the recsys recipe, measured side by side in one run; writes JSON.

    python benchmarks/bench_qat_recsys.py                       # step-time ratio + full recipe AUC drop
    python benchmarks/bench_qat_recsys.py --skip-recipe         # step-time ratio only (~1 min)
    python benchmarks/bench_qat_recsys.py --out benchmarks/results/qat_recsys_cpu.json

Step time: the recipe's DLRM and batch size, one training step = forward + BCE + backward + Adam.
FP32 and QAT run on the *same* model object (quantization attached with the callback's default
specs, toggled per layer), interleaved in alternating blocks so drift on the machine hits both;
the ratio of medians is reported. Targets (issue 2): ratio <= 1.3, recipe AUROC drop <= 0.001.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from hwaware import ProgressiveQuantization  # noqa: E402
from hwaware.quant import attach_quantization, find_quantizable  # noqa: E402
from hwaware.recsys import DLRM, CriteoDataModule  # noqa: E402

from _results import cpu_device, write_json  # noqa: E402  (benchmarks/_results.py)


def step_time(batch_size: int, steps: int, rounds: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    dm = CriteoDataModule(num_samples=batch_size * steps * 2, batch_size=batch_size, seed=seed, val_fraction=0.1)
    dm.setup("fit")
    batches = [b for _, b in zip(range(steps), dm.train_dataloader())]
    model = DLRM(table_sizes=dm.table_sizes)
    model.train()
    opt = model.configure_optimizers()  # the optimizer the recipe trains with (fused Adam)
    cb = ProgressiveQuantization()  # the defaults the recipe's QAT uses: int8 weights, dynamic int8 activations, int8 tables
    plan, _ = find_quantizable(model, weight_spec=cb.weight_spec, activation_spec=cb.activation_spec, embedding_spec=cb.embedding_spec)
    states = attach_quantization(model, plan)
    for st in states.values():
        for q in st.quantizers():
            q.observe, q.quantize = True, True

    def run(quantized: bool) -> list:
        for st in states.values():
            st.enabled = quantized
        times = []
        for b in batches:
            t0 = time.perf_counter()
            loss = F.binary_cross_entropy_with_logits(model(b["dense"], b["sparse"]), b["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return times

    run(False), run(True)  # warm-up both paths
    fp32, qat = [], []
    for r in range(rounds):
        for quantized in ((False, True) if r % 2 == 0 else (True, False)):
            (qat if quantized else fp32).extend(run(quantized))
    f, q = statistics.median(fp32), statistics.median(qat)
    return {
        "batch_size": batch_size, "steps_each": len(fp32), "fp32_ms": 1e3 * f, "qat_ms": 1e3 * q,
        "ratio": q / f, "target_max_ratio": 1.3, "passed": q / f <= 1.3,
        # min per step is the estimator least disturbed by other load (timeit's choice); the
        # verdict above stays on the medians
        "fp32_min_ms": 1e3 * min(fp32), "qat_min_ms": 1e3 * min(qat), "ratio_of_min": min(qat) / min(fp32),
        "quantized_layers": len(states),
    }


def recipe_drop(argv: list) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    import qat_recsys  # noqa: E402

    report = qat_recsys.main(argv)
    return {
        "command": "python recipes/qat_recsys.py " + " ".join(argv),
        "fp32_auroc": report["fp32"]["auroc"], "qat_auroc": report["qat"]["auroc"],
        "auroc_drop": report["auroc_drop"], "target_max_drop": 0.001, "passed": report["auroc_drop"] <= 0.001,
        "fallback_layers": report["fallback_layers"], "output_kl": report["output_kl"], "seconds": report["seconds"],
        # the QAT weights evaluated with quantization off: how much of the drop is quantization itself
        "qat_weights_fp32_auroc": report["qat_weights_fp32_auroc"], "quantization_cost": report["quantization_cost"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "qat_recsys_cpu.json"))
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--rounds", type=int, default=4, help="alternating FP32/QAT blocks of each")
    p.add_argument("--skip-recipe", action="store_true", help="only the step-time ratio")
    args = p.parse_args()
    result = {
        "benchmark": "qat_recsys",
        "device": cpu_device(),
        "torch": torch.__version__,
        "step_time": step_time(args.batch_size, args.steps, args.rounds),
    }
    print(json.dumps(result["step_time"], indent=2))
    if not args.skip_recipe:
        result["recipe"] = recipe_drop(["--no-progress", "--batch-size", str(args.batch_size)])
        print(json.dumps(result["recipe"], indent=2))
    write_json(result, args.out)


if __name__ == "__main__":
    main()
