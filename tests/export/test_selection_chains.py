"""Kernel selection of a run of int8 layers that would be one ``hwaware::int8_mlp`` call: timed as
that call against the sum of the per-layer choices (``selection.select_int8_chains``). The records'
times are set by hand here, so the outcome is fixed: the test checks the decision and the records,
never a wall-clock figure."""
import torch
from torch import nn

from hwaware.export.deploy import Int8Linear, chain_int8
from hwaware.export.selection import select_int8_chains, select_int8_kernels
from hwaware.ops.packing import quantize_int8_weight


def _mlp(*dims):
    g = torch.Generator().manual_seed(0)
    mods = []
    for k, n in zip(dims, dims[1:]):
        qw, s = quantize_int8_weight(torch.randn(n, k, generator=g) / k**0.5)
        mods += [Int8Linear(qw, s, torch.randn(n, generator=g), {"cpu": "dequant"}, relu=True), nn.Identity()]
    return nn.Sequential(nn.Linear(4, dims[0]), *mods[:-1])


def _records(model, us):
    """select_int8_kernels' records, then every candidate's time replaced by ``us`` (chosen: dequant)."""
    recs = select_int8_kernels(model, {"1": 64, "3": 64, "5": 64})
    for name, rec in recs.items():
        for entry in rec["measured"].values():
            entry["us"] = us
        rec["chosen"] = rec["op_kernel"] = "dequant"
        model.get_submodule(name).kernels["cpu"] = "dequant"
    return recs


def test_a_run_faster_as_one_call_switches_every_layer_to_int_mm():
    model = _mlp(16, 32, 24, 8)
    recs = select_int8_chains(model, _records(model, 1e9))  # per-layer: 3e9 us, the chain can only be faster
    assert [model.get_submodule(n).kernels["cpu"] for n in ("1", "3", "5")] == ["int_mm"] * 3
    for n in ("1", "3", "5"):
        assert recs[n]["chosen"] == recs[n]["op_kernel"] == "int_mm"
        assert recs[n]["chain"]["layers"] == ["1", "3", "5"] and recs[n]["chain"]["chosen"] == "int8_mlp"
        assert "as one int8_mlp call" in recs[n]["why"]
    assert chain_int8(model) == {"": [["1", "3", "5"]]}  # and load / export then run it as one call


def test_a_run_slower_as_one_call_keeps_the_per_layer_choices():
    model = _mlp(16, 32, 24, 8)
    recs = select_int8_chains(model, _records(model, 1e-6))
    assert [model.get_submodule(n).kernels["cpu"] for n in ("1", "3", "5")] == ["dequant"] * 3
    assert recs["1"]["chain"]["chosen"] == "per_layer" and recs["1"]["chain"]["int8_mlp_us"] > 0
    assert recs["1"]["why"] != "" and "int8_mlp" not in recs["1"]["why"]


def test_int_mm_not_allowed_leaves_the_choices_alone():
    model = _mlp(16, 32, 24)
    recs = _records(model, 1e9)
    select_int8_chains(model, recs, allowed=["dequant", "fbgemm"])
    assert all("chain" not in r for r in recs.values())
    assert [model.get_submodule(n).kernels["cpu"] for n in ("1", "3")] == ["dequant"] * 2


def test_a_candidate_timed_far_slower_than_the_fastest_is_timed_again():
    """A trial on a busy machine: every run of a ~13 us kernel's timing budget waited at a barrier
    (293 us), so two exports of the same weights chose different kernels and served different numbers."""
    import time

    from hwaware.export.selection import _second_look

    calls = {"fast": 0, "never": 0}

    def fast():
        calls["fast"] += 1

    def never():
        calls["never"] += 1

    def slow():
        time.sleep(0.004)

    measured = {
        "best": {"available": True, "us": 10.0, "note": "best"},
        "busy": {"available": True, "us": 500.0, "note": "busy"},    # interfered with: fast when timed again
        "close": {"available": True, "us": 25.0, "note": "close"},   # within 3x: kept as timed
        "slow": {"available": True, "us": 3000.0, "note": "slow"},   # really slower: keeps the faster of both
        "gave_up": {"available": True, "us": 90000.0, "note": "x (timed twice: both runs over 20x ...)"},
        "absent": {"available": False, "note": "no kernel"},
    }
    _second_look(measured, {"best": never, "busy": fast, "close": never, "slow": slow, "gave_up": never})
    assert calls["never"] == 0 and calls["fast"] >= 5
    assert measured["busy"]["us"] < 500.0 and "timed again: 500.00 us on a first look" in measured["busy"]["note"]
    assert measured["close"] == {"available": True, "us": 25.0, "note": "close"}
    assert measured["slow"]["us"] == 3000.0 and measured["slow"]["note"] == "slow"  # (4 ms a run: the first timing kept)
    assert measured["gave_up"]["us"] == 90000.0
