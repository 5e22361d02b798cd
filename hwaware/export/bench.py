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

__all__ = ["compare_throughput"]


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
    ``ratio``: its throughput over the first model's (the baseline).
    """
    if not models:
        raise ValueError("compare_throughput needs at least one model")
    if rounds < 1 or not inputs:
        raise ValueError(f"rounds={rounds} and {len(inputs)} inputs; expected rounds >= 1 and at least one input")
    lat: Dict[str, List[float]] = {name: [] for name in models}
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
                    lat[name].append(time.perf_counter() - t0)
    base = None
    out: Dict[str, Any] = {}
    for name, xs in lat.items():
        med = statistics.median(xs)
        thr = batch_size / med
        base = base or thr
        out[name] = {
            "samples_per_s": thr, "ratio": thr / base, "latency_ms_p50": 1e3 * med,
            "latency_ms_p90": 1e3 * _percentile(xs, 0.9), "latency_ms_p99": 1e3 * _percentile(xs, 0.99), "batches": len(xs),
        }
    return {"batch_size": batch_size, "rounds": rounds, "baseline": next(iter(models)), "models": out,
            "torch_threads": torch.get_num_threads()}
