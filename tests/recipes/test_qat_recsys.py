"""The headline recipe, run as a user runs it: a subprocess on the command line."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "qat_recsys.py")


def _run(*args, timeout=300):
    # this checkout's hwaware, whichever checkout an editable install points at
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    return subprocess.run([sys.executable, RECIPE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_fast_recipe_writes_the_report(tmp_path):
    report_path = tmp_path / "out" / "report.json"
    proc = _run("--fast", "--no-progress", "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FP32 (at QAT start)" in proc.stdout and "output KL" in proc.stdout
    r = json.loads(report_path.read_text())
    assert 0.0 < r["fp32"]["auroc"] < 1.0 and 0.0 < r["qat"]["auroc"] < 1.0
    assert abs(r["auroc_drop"] - (r["fp32"]["auroc"] - r["qat"]["auroc"])) < 1e-12
    assert [p["phase"] for p in r["phases"]] == ["fp32", "calibrate", "qat", "validate", "done"]
    assert isinstance(r["fallback_layers"], list)
    assert set(r["kl"]) == {*(f"embeddings.{i}" for i in range(26)), "bottom_mlp.0", "bottom_mlp.2", "top_mlp.0", "top_mlp.2", "top_mlp.4"}
    assert all(isinstance(v, float) and v >= 0 for v in r["kl"].values())
    assert r["config"]["fast"] is True


def test_missing_data_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.tsv"
    proc = _run("--fast", "--no-progress", "--data", str(missing), timeout=120)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("bad", "message"), [
    (["0"] + ["3"] * 13 + ["a1b2"] * 25, "expected 40 tab-separated fields (label, I1-I13, C1-C26), got 39"),
    (["0"] + ["3"] * 4 + ["1" * 30] + ["3"] * 8 + ["a1b2"] * 26,  # I5 does not fit int64
     f"I5 must be an integer in the int64 range [{-2**63}, {2**63 - 1}] or empty, got '{'1' * 30}'"),
])
def test_malformed_data_file_names_file_and_line(tmp_path, bad, message):
    good = "\t".join(["1"] + ["3"] * 13 + ["a1b2"] * 26)
    path = tmp_path / "day_0.tsv"
    path.write_text("\n".join([good, good, "\t".join(bad), good]) + "\n")
    proc = _run("--fast", "--no-progress", "--data", str(path), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"qat_recsys.py: error: --data: {path}, line 3: {message}" in proc.stderr


def test_fast_recipe_with_2_4_sparsity(tmp_path):
    report_path = tmp_path / "report.json"
    proc = _run("--fast", "--no-progress", "--sparsity", "2:4", "--export-dir", str(tmp_path / "art"),
                "--max-drop", "0.05", "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2:4 + int8 drop vs dense" in proc.stdout
    r = json.loads(report_path.read_text())
    sp = r["sparsity"]
    # every MLP layer with K % 4 == 0 is 2:4 (the top MLP input padded 367 -> 368); bottom_mlp.0 has K=13
    assert sp["layers"] == {"bottom_mlp.2": 0.5, "top_mlp.0": 0.5, "top_mlp.2": 0.5, "top_mlp.4": 0.5}
    assert sp["verified_24"] and "K=13" in sp["skipped"]["bottom_mlp.0"]
    assert abs(sp["auroc_drop"] - (sp["dense_fp32_auroc"] - sp["auroc"])) < 1e-12 and sp["auroc"] == r["qat"]["auroc"]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    for name in sp["layers"]:
        meta = manifest["layers"][name]
        sel = meta["selection"]["cpu"]
        eligible = {c: e["us"] for c, e in sel["measured"].items() if e["available"] and e["keeps_math"]}
        assert meta["scheme"] == "sparse24_int8" and set(eligible) == {"int8", "int8_fbgemm", "int8_dequant"}
        assert sel["chosen"] == min(eligible, key=eligible.get)  # the int8 codes, whichever kernel timed fastest
    assert manifest["layers"]["bottom_mlp.0"]["scheme"] == "int8"
    assert r["export"]["auroc"] > 0.5


def _small_tsv(path, rows):
    """A learnable Criteo-format file of ``rows`` lines."""
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(rows):
        dense = [str(rng.randint(0, 50)) for _ in range(13)]
        cats = [f"{rng.randint(0, 40):08x}" for _ in range(26)]
        label = int(int(dense[0]) + int(cats[0], 16) > 45)
        lines.append("\t".join([str(label)] + dense + cats))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_small_data_file_reports_the_batch_it_timed(tmp_path):
    """A validation split smaller than --infer-batch-size: the report's batch_size is the rows timed."""
    path = _small_tsv(tmp_path / "small.tsv", 1500)
    report_path = tmp_path / "r.json"
    proc = _run("--fast", "--no-progress", "--data", str(path), "--batch-size", "64", "--max-drop", "1.0",
                "--export-dir", str(tmp_path / "art"), "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report_path.read_text())["export"]
    assert 0 < r["batch_size"] < 2048 and f"batches of {r['batch_size']} rows" in proc.stdout
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"][0] == r["batch_size"]


def test_a_schedule_that_cannot_reach_qat_is_refused_before_training(tmp_path):
    """2000 rows at --batch-size 1024 are 2 training batches per epoch: --fast's 8 calibration batches
    cannot fit in its 1 QAT epoch. Said before the Trainer exists, with the numbers and the fixes."""
    path = _small_tsv(tmp_path / "small.tsv", 2000)
    proc = _run("--fast", "--no-progress", "--data", str(path), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (f"QAT cannot start with this data and these flags: --data {path} gives 2000 rows, 1600 of them for "
            "training, which at --batch-size 1024 is 2 batch(es) per epoch; after 1 FP32 epoch(s), --qat-epochs 1 "
            "leaves 1 x 2 = 2 batch(es), but the schedule needs 9: 8 to calibrate (--fast) and at least 1 to train "
            "with QAT. Expected --qat-epochs 5 or more, or --batch-size 199 or less, or a --data file of 10242 rows "
            "or more") in proc.stderr
    assert "GPU available" not in proc.stderr and "calibrating" not in proc.stderr  # no Trainer was built


def test_the_largest_batch_size_the_refusal_names_runs_qat(tmp_path):
    """The bound is exact: --batch-size 200 gives 8 batches (refused: calibration would leave QAT none),
    199 gives 9 and QAT trains."""
    path = _small_tsv(tmp_path / "small.tsv", 2000)
    refused = _run("--fast", "--no-progress", "--data", str(path), "--batch-size", "200", timeout=120)
    assert refused.returncode != 0 and "is 8 batch(es) per epoch" in refused.stderr
    assert "Expected --qat-epochs 2 or more, or --batch-size 199 or less" in refused.stderr
    report_path = tmp_path / "r.json"
    proc = _run("--fast", "--no-progress", "--data", str(path), "--batch-size", "199", "--no-export",
                "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads(report_path.read_text())["phases"]
    assert [p["phase"] for p in phases] == ["fp32", "calibrate", "qat", "validate", "done"]
    qat = phases[2]
    assert qat["end_step"] - qat["start_step"] == 1  # 9 batches: 8 calibrate, 1 trains with QAT


def test_plateau_start_is_not_refused_up_front(tmp_path):
    """With --start plateau when FP32 ends is not known before training: no up-front refusal; the
    after-training check still says that QAT never started."""
    path = _small_tsv(tmp_path / "small.tsv", 2000)
    proc = _run("--fast", "--no-progress", "--data", str(path), "--start", "plateau", "--fp32-epochs", "1",
                "--batch-size", "512", "--no-export", timeout=300)
    assert proc.returncode != 0
    assert "QAT cannot start" not in proc.stderr and "GPU available" in proc.stderr  # it trained
    assert "QAT never started (phase 'fp32'); raise the epoch budget" in proc.stderr
