"""``compare_throughput`` / ``hwaware bench``: the spread of the ratio across rounds, and the warning
when the rounds disagree (a busy machine)."""
from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hwaware.export.bench as bench
from hwaware.cli import main
from hwaware.export.bench import UNSTABLE_SPREAD, compare_throughput, instability_warning


@pytest.fixture
def clock(monkeypatch):
    """The benchmark's clock, advanced only by the tests' run functions: the timings are exactly
    what a test says, whatever else the machine is doing."""
    now = [0.0]
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def advance(seconds: float) -> None:
        now[0] += seconds
    return advance


def _pair():
    torch.manual_seed(0)
    return nn.Linear(8, 8), nn.Linear(8, 8)


def test_each_round_s_ratio_and_their_spread_are_recorded_and_a_disturbed_round_is_flagged(clock):
    base, other = _pair()
    calls = itertools.count()

    def run(m, x):  # other's first timed call is 20 ms late (as if the machine were busy then); 4 ms otherwise
        if m is other:
            clock(0.020 if next(calls) == 1 else 0.004)  # call 0 is the warmup
        else:
            clock(0.004)
        return m(*x)

    r = compare_throughput({"base": base, "other": other}, [(torch.randn(4, 8),)], run=run, batch_size=4, rounds=4)
    o = r["models"]["other"]
    assert len(o["round_ratios"]) == 4 and len(o["round_samples_per_s"]) == 4
    assert o["round_ratios"][0] < 0.5 and o["ratio_min"] == min(o["round_ratios"]) and o["ratio_max"] == max(o["round_ratios"])
    assert o["ratio_spread"] == o["ratio_max"] / o["ratio_min"] - 1 > UNSTABLE_SPREAD
    assert r["models"]["base"]["round_ratios"] == [1.0] * 4 and r["models"]["base"]["ratio_spread"] == 0
    assert r["unstable"] == ["other"] and r["unstable_spread"] == UNSTABLE_SPREAD
    # the keys from before are all still there
    assert {"samples_per_s", "ratio", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "batches"} <= set(o)
    line = instability_warning(r)
    assert line.startswith("warning: timings unstable: the machine may be busy") and "other x0." in line


def test_rounds_that_agree_are_not_flagged(clock):
    base, other = _pair()

    def run(m, x):  # a steady 10 ms each: the ratios stay near 1
        clock(0.010)
        return m(*x)

    r = compare_throughput({"base": base, "other": other}, [(torch.randn(4, 8),)], run=run, batch_size=4, rounds=3)
    assert r["unstable"] == [] and instability_warning(r) == ""
    assert r["models"]["other"]["round_ratios"] == pytest.approx([1.0] * 3)


def test_bench_prints_the_round_range_and_writes_the_spread(tmp_path, capsys):
    from hwaware.export import export
    from tests.helpers import TinyCTR

    torch.manual_seed(0)
    art = export(TinyCTR(), tmp_path / "tiny", example_inputs=(torch.randn(8, 4), torch.randint(0, 50, (8,))))
    out = tmp_path / "bench.json"
    assert main(["bench", art.path, "--model", "tests.helpers:TinyCTR", "--batch-size", "8", "--batches", "2", "--rounds", "3",
                 "--no-memory", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    a = r["models"]["artifact"]
    assert len(a["round_ratios"]) == 3 and a["ratio_min"] <= a["ratio_max"]
    assert isinstance(r["unstable"], list)
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("artifact "))
    assert f"(rounds x{a['ratio_min']:.2f}..x{a['ratio_max']:.2f})" in line
    assert ("timings unstable: the machine may be busy" in text) == bool(r["unstable"])


def test_one_round_is_said_to_be_unchecked(clock):
    """A deployment trial: three one-round benches gave x1.97, x340.04 and x16.72, with no warning."""
    base, other = _pair()

    def run(m, x):
        clock(0.010)
        return m(*x)

    r = compare_throughput({"base": base, "other": other}, [(torch.randn(4, 8),)], run=run, batch_size=4, rounds=1)
    assert r["unstable"] == [] and instability_warning(r).startswith("warning: one round: the ratio is one measurement")
