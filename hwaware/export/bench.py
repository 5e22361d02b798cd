"""Side-by-side inference measurement: several models, the same inputs, interleaved rounds.

Interleaving (A, B, C, A, B, C, ...) makes machine drift hit every contender alike; the results
are ratios against the first model, from one run.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import nn

__all__ = ["compare_throughput", "UNSTABLE_SPREAD", "instability_warning"]

#: round ratios of one contender further apart than this (max / min - 1) make the comparison "unstable"
UNSTABLE_SPREAD = 0.25


def _percentile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def compare_throughput(
    models: Dict[str, nn.Module],
    inputs: Sequence[Any],
    *,
    run: Callable[[nn.Module, Any], Any] = lambda m, x: m(*x),
    batch_size: int,
    rounds: int = 5,
    warmup: int = 1,
) -> Dict[str, Any]:
    """Time ``run(model, x)`` for every ``x`` in ``inputs``, per model, interleaved over ``rounds``.

    Returns per model: samples/s (from the median batch latency), latency p50/p90/p99 in ms, and
    ``ratio``: its throughput over the first model's (the baseline). The spread across rounds, per
    model: ``round_samples_per_s`` (each round's median), ``round_ratios`` (each round's throughput
    over the baseline's in the same round), ``ratio_min``/``ratio_max`` and ``ratio_spread``
    (``ratio_max / ratio_min - 1``). ``unstable`` lists the models whose round ratios disagree by
    more than ``UNSTABLE_SPREAD`` (25%): timings a busy machine disturbed.
    """
    if not models:
        raise ValueError("compare_throughput needs at least one model")
    if rounds < 1 or not inputs:
        raise ValueError(f"rounds={rounds} and {len(inputs)} inputs; expected rounds >= 1 and at least one input")
    per_round: Dict[str, List[List[float]]] = {name: [[] for _ in range(rounds)] for name in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                for x in inputs:
                    run(m, x)
        for r in range(rounds):
            order = list(models.items()) if r % 2 == 0 else list(reversed(models.items()))
            for name, m in order:
                for x in inputs:
                    t0 = time.perf_counter()
                    run(m, x)
                    dt = time.perf_counter() - t0
                    per_round[name][r].append(dt)
    base = None
    base_rounds: List[float] = []
    out: Dict[str, Any] = {}
    for name, rounds_dt in per_round.items():
        xs = [dt for ys in rounds_dt for dt in ys]
        med = statistics.median(xs)
        thr = batch_size / med
        base = base or thr
        round_thr = [batch_size / statistics.median(ys) for ys in rounds_dt]
        base_rounds = base_rounds or round_thr
        round_ratios = [t / b for t, b in zip(round_thr, base_rounds)]
        out[name] = {
            "samples_per_s": thr, "ratio": thr / base, "latency_ms_p50": 1e3 * med,
            "latency_ms_p90": 1e3 * _percentile(xs, 0.9), "latency_ms_p99": 1e3 * _percentile(xs, 0.99), "batches": len(xs),
            "round_samples_per_s": round_thr, "round_ratios": round_ratios, "ratio_min": min(round_ratios),
            "ratio_max": max(round_ratios), "ratio_spread": max(round_ratios) / min(round_ratios) - 1,
        }
    unstable = [name for name, r in out.items() if r["ratio_spread"] > UNSTABLE_SPREAD]
    return {"batch_size": batch_size, "rounds": rounds, "baseline": next(iter(models)), "models": out,
            "torch_threads": torch.get_num_threads(), "unstable": unstable, "unstable_spread": UNSTABLE_SPREAD}


def instability_warning(result: Dict[str, Any]) -> str:
    """The warning line for a :func:`compare_throughput` result whose rounds disagree (or of one round,
    which nothing checks), else ``""``."""
    unstable = result.get("unstable") or []
    if result.get("rounds") == 1:
        # (a deployment trial: three one-round runs gave x1.97, x340.04 and x16.72, one FP32 batch a 208 ms hiccup)
        return ("warning: one round: the ratio is one measurement with no other round to check it against, so a busy "
                "machine cannot be told from a real difference; use --rounds 3 or more")
    if not unstable:
        return ""
    models = result["models"]
    spans = ", ".join(f"{n} x{models[n]['ratio_min']:.2f}..x{models[n]['ratio_max']:.2f}" for n in unstable)
    return (f"warning: timings unstable: the machine may be busy (round ratios vs {result['baseline']} differ by more "
            f"than {UNSTABLE_SPREAD:.0%}: {spans}); rerun on an idle machine or with more --rounds")


def read_inputs_file(path: str) -> tuple:
    """One batch of a model's positional inputs from a safetensors file whose tensors are named
    ``"0"``, ``"1"``, ... in forward's order (what ``hwaware bench --inputs`` times; never unpickled).
    Write one with ``safetensors.torch.save_file({"0": ids, "1": offsets}, "batch.safetensors")``.
    ``ValueError`` naming the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError, ValueError) as e:
        raise ValueError(f"--inputs {path}: not a readable safetensors file ({e})") from None
    want = [str(i) for i in range(len(tensors))]
    if not tensors or set(tensors) != set(want):
        raise ValueError(f"--inputs {path}: holds tensors named {sorted(tensors)[:8]}; expected '0', '1', ... (one per "
                         "positional input of the model's forward, in order)")
    return tuple(tensors[k] for k in want)

