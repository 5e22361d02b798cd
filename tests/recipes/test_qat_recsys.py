"""The headline recipe, run as a user runs it: a subprocess on the command line. The cases that stop
before training (usage errors, bad paths and data) call its ``main`` in this process instead
(``_main``): the same code and messages without an interpreter and torch start-up per case; one of
them also runs as a subprocess, for the exit status and the absence of a traceback."""
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


def _load_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qat_recsys_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


@pytest.fixture
def run_main(capsys, monkeypatch):
    """``run_main(*args)`` -> (exit status, stdout, stderr) of the recipe's ``main`` in this process,
    where building a Trainer fails the test (these cases must stop before training)."""
    import pytorch_lightning as pl

    def no_trainer(*a, **k):
        raise AssertionError("the recipe built a Trainer: the error came after training started")

    monkeypatch.setattr(pl, "Trainer", no_trainer)
    monkeypatch.setattr(sys, "argv", [RECIPE])  # argparse names the program from it: qat_recsys.py
    recipe = _load_recipe()

    def run(*args):
        capsys.readouterr()
        code, tail = 0, ""
        try:
            recipe.main(list(args))
        except SystemExit as e:  # argparse: status 2 after printing; SystemExit("message"): status 1
            code = e.code if isinstance(e.code, int) else 1
            tail = e.code if isinstance(e.code, str) else ""
        out, err = capsys.readouterr()
        return code, out, err + tail
    return run


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


def test_missing_data_file_names_the_file(tmp_path, run_main):
    missing = tmp_path / "nope.tsv"
    code, _, err = run_main("--fast", "--no-progress", "--data", str(missing))
    assert code != 0 and str(missing) in err


def test_data_directory_is_called_a_directory(tmp_path, run_main):
    code, _, err = run_main("--fast", "--no-progress", "--data", str(tmp_path))
    assert code != 0
    assert f"qat_recsys.py: error: --data: {str(tmp_path)!r} is a directory; expected a Criteo TSV file" in err


@pytest.mark.parametrize(("bad", "message"), [
    (["0"] + ["3"] * 13 + ["a1b2"] * 25, "expected 40 tab-separated fields (label, I1-I13, C1-C26), got 39"),
    (["0"] + ["3"] * 4 + ["1" * 30] + ["3"] * 8 + ["a1b2"] * 26,  # I5 does not fit int64
     f"I5 must be an integer in the int64 range [{-2**63}, {2**63 - 1}] or empty, got '{'1' * 30}'"),
])
def test_malformed_data_file_names_file_and_line(tmp_path, run_main, bad, message):
    good = "\t".join(["1"] + ["3"] * 13 + ["a1b2"] * 26)
    path = tmp_path / "day_0.tsv"
    path.write_text("\n".join([good, good, "\t".join(bad), good]) + "\n")
    code, _, err = run_main("--fast", "--no-progress", "--data", str(path))
    assert code != 0
    assert f"qat_recsys.py: error: --data: {path}, line 3: {message}" in err


def test_compressed_data_file_is_called_compressed(tmp_path, run_main):
    import gzip

    path = tmp_path / "day_0.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\t".join(["1"] + ["3"] * 13 + ["a1b2"] * 26) + "\n")
    code, _, err = run_main("--fast", "--no-progress", "--data", str(path))
    assert code != 0
    assert (f"qat_recsys.py: error: --data: {path}: the file is gzip-compressed; expected an uncompressed Criteo TSV "
            f"(tab-separated text): decompress it first, e.g. `gunzip -k {path}`") in err


def test_data_from_a_pipe_is_not_called_missing(tmp_path, run_main):
    """`--data <(zcat day_0.gz)` hands the recipe /dev/fd/63, which exists but is a pipe."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = run_main("--fast", "--no-progress", "--data", str(fifo))
    assert code != 0 and "not found" not in err
    assert f"qat_recsys.py: error: --data: {str(fifo)!r} is not a regular file (a pipe, FIFO or device)" in err


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
    # the sparse FP32 model at QAT start is not the dense one pruning started from (export's gate reference)
    assert sp["sparse_fp32_auroc"] != sp["dense_fp32_auroc"]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    refs = manifest["regression"]["references"]  # the gate measured both FP32 models and took the better
    assert refs == {"dense at 2:4 pruning start": sp["dense_fp32_auroc"], "fp32 at QAT start": sp["sparse_fp32_auroc"]}
    assert manifest["regression"]["reference"] == max(refs.values())
    for name in sp["layers"]:
        meta = manifest["layers"][name]
        sel = meta["selection"]["cpu"]
        eligible = {c: e["us"] for c, e in sel["measured"].items() if e["available"] and e["keeps_math"]}
        assert meta["scheme"] == "sparse24_int8" and set(eligible) == {"int8", "int8_fbgemm", "int8_dequant"}
        # the int8 codes, whichever kernel timed fastest, or int_mm ("int8") for a run of them timed
        # faster as one int8_mlp24 call than the per-layer choices
        chain = sel.get("chain")
        if chain is not None and chain["chosen"] == "int8_mlp":
            assert sel["chosen"] == "int8" and chain["op"] == "hwaware::int8_mlp24"
        else:
            assert sel["chosen"] == min(eligible, key=eligible.get)
    assert manifest["layers"]["bottom_mlp.0"]["scheme"] == "int8"
    assert r["export"]["auroc"] > 0.5
    # epoch 0 FP32, epoch 1 trained 2:4 before QAT: labelled sparse, not fp32
    assert [e["phase"] for e in r["val_auroc_by_epoch"]][:2] == ["fp32", "sparse"]
    assert "(sparse)" in proc.stdout


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
    (tmp_path / "art").mkdir()  # a previous artifact there: replaced, and said so
    (tmp_path / "art" / "manifest.json").write_text(json.dumps({"format": "hwaware-artifact"}))
    proc = _run("--fast", "--no-progress", "--data", str(path), "--batch-size", "64", "--max-drop", "1.0",
                "--table-sizes", "97", "--cache-dir", str(tmp_path / "cache"),
                "--export-dir", str(tmp_path / "art"), "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report_path.read_text())["export"]
    assert 0 < r["batch_size"] < 2048 and f"batches of {r['batch_size']} rows" in proc.stdout
    config = json.loads(report_path.read_text())["config"]
    assert config["num_samples"] is None and config["rows"] == 1500  # the file's rows; --num-samples does not apply
    assert config["table_sizes"] == [97] * 26 and any((tmp_path / "cache").iterdir())  # the tables and cache asked for
    on_disk = sum(f.stat().st_size for f in (tmp_path / "art").iterdir())  # with program.pt2
    assert r["artifact_bytes_on_disk"] == on_disk > r["size_bytes"]
    # the timing's stability is reported with the ratio
    assert isinstance(r["throughput_unstable"], bool) and r["throughput_rounds"] == 2
    assert 0 < r["throughput_ratio_min"] <= r["throughput_ratio_max"] and r["throughput_ratio"] > 0
    assert len(r["throughput_round_ratios"]) == 2 and r["throughput_unstable_spread"] == 0.25
    assert abs(r["throughput_ratio_spread"] - (r["throughput_ratio_max"] / r["throughput_ratio_min"] - 1)) < 1e-9
    assert f"replacing the artifact at {tmp_path / 'art'}" in proc.stdout
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"][0] == r["batch_size"]
    # the FP32 baseline's subnormal weights are counted (and said, when there are any)
    assert isinstance(r["fp32_subnormal_weights"], int) and r["fp32_subnormal_weights"] >= 0
    assert ("subnormal weights" in proc.stdout) == (r["fp32_subnormal_weights"] > 0)


def test_int4_tables_and_unstable_timings_are_said(tmp_path, monkeypatch, capsys):
    """--embedding-bits 4: the table names int4 tables, not int8 everywhere. Throughput rounds that disagree
    (a busy machine, forced here): a warning, and the flag and the rounds' spread in the report's export."""
    import signal

    recipe = _load_recipe()
    real = recipe.compare_throughput

    def busy(*a, **k):
        result = real(*a, **k)
        ratios = result["models"]["exported"]
        ratios.update(round_ratios=[1.0, 2.0], ratio_min=1.0, ratio_max=2.0, ratio_spread=1.0)
        return {**result, "unstable": ["exported"]}

    monkeypatch.setattr(recipe, "compare_throughput", busy)
    path = _small_tsv(tmp_path / "small.tsv", 1500)
    report_path = tmp_path / "r.json"
    old = signal.getsignal(signal.SIGINT)
    try:
        report = recipe.main(["--fast", "--no-progress", "--data", str(path), "--batch-size", "64", "--embedding-bits",
                              "4", "--max-drop", "1.0", "--export-dir", str(tmp_path / "art"), "--report", str(report_path)])
    finally:
        signal.signal(signal.SIGINT, old)
    out, err = capsys.readouterr()
    assert "QAT (int8, int4 tables)" in out and "QAT (int8, validated)" not in out
    assert ("warning: throughput timings unstable: the exported/FP32 ratio ran x1.00..x2.00 over 2 rounds, more "
            "than 25% apart") in err
    assert "(UNSTABLE: see the warning)" in out
    e = json.loads(report_path.read_text())["export"]
    assert e["throughput_unstable"] is True and e["throughput_ratio_spread"] == 1.0
    assert e["throughput_round_ratios"] == [1.0, 2.0] and "throughput_ratio" in e and "latency_ms_p50" in e
    assert report["export"]["throughput_unstable"] is True


def test_a_schedule_that_cannot_reach_qat_is_refused_before_training(tmp_path, run_main):
    """2000 rows at --batch-size 1024 are 2 training batches per epoch: --fast's 8 calibration batches
    cannot fit in its 1 QAT epoch. Said before the Trainer exists, with the numbers and the fixes."""
    path = _small_tsv(tmp_path / "small.tsv", 2000)
    code, _, err = run_main("--fast", "--no-progress", "--data", str(path))
    assert code != 0
    assert (f"QAT cannot start with this data and these flags: --data {path} gives 2000 rows, 1600 of them for "
            "training, which at --batch-size 1024 is 2 batch(es) per epoch; after 1 FP32 epoch(s), --qat-epochs 1 "
            "leaves 1 x 2 = 2 batch(es), but the schedule needs 9: 8 to calibrate (--fast) and at least 1 to train "
            "with QAT. Expected --qat-epochs 5 or more, or --batch-size 199 or less, or a --data file of 10242 rows "
            "or more") in err  # (and run_main fails the test had a Trainer been built)


def test_the_largest_batch_size_the_refusal_names_runs_qat(tmp_path, run_main):
    """The bound is exact: --batch-size 200 gives 8 batches (refused: calibration would leave QAT none),
    199 gives 9 and QAT trains."""
    path = _small_tsv(tmp_path / "small.tsv", 2000)
    code, _, err = run_main("--fast", "--no-progress", "--data", str(path), "--batch-size", "200")
    assert code != 0 and "is 8 batch(es) per epoch" in err
    assert "Expected --qat-epochs 2 or more, or --batch-size 199 or less" in err
    report_path = tmp_path / "r.json"
    proc = _run("--fast", "--no-progress", "--data", str(path), "--batch-size", "199", "--no-export",
                "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads(report_path.read_text())["phases"]
    assert [p["phase"] for p in phases] == ["fp32", "calibrate", "qat", "validate", "done"]
    qat = phases[2]
    assert qat["end_step"] - qat["start_step"] == 1  # 9 batches: 8 calibrate, 1 trains with QAT


def test_plateau_schedule_that_cannot_fit_is_refused_before_training(tmp_path, run_main):
    """--start plateau: calibration begins at epoch 2 at the earliest, so 2000 rows at --batch-size 512 (4
    batches per epoch) under --fp32-epochs 2 + --qat-epochs 1 leave at most 4 batches for the 9 that
    calibration and QAT need, whenever val_auroc stops improving: refused before the Trainer exists."""
    path = _small_tsv(tmp_path / "small.tsv", 2000)
    code, _, err = run_main("--fast", "--no-progress", "--data", str(path), "--start", "plateau", "--fp32-epochs", "2",
                            "--batch-size", "512", "--no-export")
    assert code != 0
    assert (f"QAT cannot start with this data and these flags: --data {path} gives 2000 rows, 1600 of them for "
            "training, which at --batch-size 512 is 4 batch(es) per epoch; under --start plateau calibration begins "
            "at epoch 2 at the earliest (one validation sets the best val_auroc, one more that does not improve on "
            "it reaches the plateau), so --fp32-epochs 2 + --qat-epochs 1 = 3 epochs leave at most 1 x 4 = 4 "
            "batch(es), but the schedule needs 9: 8 to calibrate (--fast) and at least 1 to train with QAT. Expected "
            "--qat-epochs 3 or more, or --batch-size 199 or less, or a --data file of 5122 rows or more (enough only "
            "if val_auroc stops improving at once: a later plateau needs more)") in err


def test_plateau_that_never_comes_says_so_after_training(tmp_path):
    """A schedule that fits but whose val_auroc keeps improving: the after-training check says QAT never
    started and why (one line, no traceback)."""
    path = _small_tsv(tmp_path / "small.tsv", 2000)
    proc = _run("--fast", "--no-progress", "--data", str(path), "--start", "plateau", "--fp32-epochs", "2",
                "--batch-size", "128", "--no-export", timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "QAT cannot start" not in proc.stderr and "GPU available" in proc.stderr  # it trained
    assert ("qat_recsys.py: error: QAT never started: the run ended in phase 'fp32': val_auroc did not stop "
            "improving before the last of the 3 epochs (--fp32-epochs 2 + --qat-epochs 1), so calibration never "
            "began") in proc.stderr


def _saturating_tsv(path, rows=3000):
    """The label is I1 > 25, flipped for 10% of rows: val_auroc rises for 3 epochs at --lr 0.01 and
    --batch-size 400, then falls back."""
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(rows):
        dense = [str(rng.randint(0, 50)) for _ in range(13)]
        cats = [f"{rng.randint(0, 40):08x}" for _ in range(26)]
        label = int(int(dense[0]) > 25)
        if rng.random() < 0.1:
            label = 1 - label
        lines.append("\t".join([str(label)] + dense + cats))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plateau_reached_too_late_to_calibrate_says_what_happened(tmp_path):
    """The plateau came after epoch 3; calibration began at epoch 4 and the last epoch gave 6 of its 8
    batches: the message names the phase, the batches seen and needed, and the fix, which works."""
    path = _saturating_tsv(tmp_path / "sat.tsv")
    flags = ["--fast", "--no-progress", "--data", str(path), "--start", "plateau", "--fp32-epochs", "4",
             "--batch-size", "400", "--lr", "0.01", "--no-export"]
    proc = _run(*flags, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "did not stop improving" not in proc.stderr
    assert ("qat_recsys.py: error: QAT never started: the run ended in phase 'calibrate'. val_auroc stopped "
            "improving after epoch 3 and calibration began at epoch 4, but the 5 epochs (--fp32-epochs 4 + "
            "--qat-epochs 1) ran out after 6 of its 8 calibration batches (--fast; 6 training batch(es) per epoch "
            "at --batch-size 400); it needed 3 more: 2 to finish calibrating and 1 to train with QAT. Expected "
            "--qat-epochs 2 or more, or a smaller --batch-size, or more rows") in proc.stderr
    report_path = tmp_path / "r.json"
    proc = _run(*flags, "--qat-epochs", "2", "--report", str(report_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads(report_path.read_text())["phases"]
    assert [(p["phase"], p["start_epoch"]) for p in phases][:3] == [("fp32", 0), ("calibrate", 4), ("qat", 5)]


def test_qat_never_started_message_counts_calibration_batches():
    """The message's arithmetic, on the trial's case: 32 calibration batches, 3 per epoch, calibration from
    epoch 6 (step 18) and the run ending at step 27 (9 seen): 24 more, 8 more epochs."""
    from types import SimpleNamespace

    recipe = _load_recipe()
    args = recipe.parse_args(["--data", "x.tsv", "--no-export"])
    qat = SimpleNamespace(phase="calibrate", calibration_batches=32, report={"phases": [
        {"phase": "fp32", "start_epoch": 0, "start_step": 0},
        {"phase": "calibrate", "start_epoch": 6, "start_step": 18}]})
    message = recipe.qat_never_started(args, qat, 3, 27)
    assert ("the 9 epochs (--fp32-epochs 8 + --qat-epochs 1) ran out after 9 of its 32 calibration batches "
            "(without --fast; 3 training batch(es) per epoch at --batch-size 1024); it needed 24 more: 23 to finish "
            "calibrating and 1 to train with QAT. Expected --qat-epochs 9 or more") in message


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-size", "0"], "argument --batch-size: 0 is invalid; expected an integer >= 1"),
    (["--num-samples", "-5"], "argument --num-samples: -5 is invalid; expected an integer >= 2"),
    (["--num-samples", "1"], "argument --num-samples: 1 is invalid; expected an integer >= 2"),  # (a traceback before)
    (["--seed", "-1"], "argument --seed: -1 is invalid; expected an integer from 0 to 4294967295"),
    (["--seed", "4294967296"], "argument --seed: 4294967296 is invalid; expected an integer from 0 to 4294967295"),
    (["--kl-threshold", "-1"], "argument --kl-threshold: -1 is invalid; expected a finite number in (0, inf)"),
    (["--max-drop", "-0.5"], "argument --max-drop: -0.5 is invalid; expected a finite number in [0, inf)"),
    (["--fp32-epochs", "-1"], "argument --fp32-epochs: -1 is invalid; expected an integer >= 0"),
    (["--sparsity-method", "magnitude"], "--sparsity-method only applies with --sparsity 2:4"),
    (["--sparse-epochs", "2", "--sparsity-skip", "top_mlp.4"], "--sparsity-skip, --sparse-epochs only apply with --sparsity 2:4"),
    (["--start", "plateau", "--fp32-epochs", "1"], "--fp32-epochs 1 is too small for --start plateau"),
    (["--start", "plateau", "--sparsity", "2:4"], "--start plateau cannot be combined with --sparsity 2:4"),
    (["--embedding-dim", "0"], "argument --embedding-dim: 0 is invalid; expected an integer >= 1"),
    (["--data", "day_0.tsv", "--num-samples", "5000"],
     "--num-samples 5000 only applies to the synthetic data; --data uses every row of its file"),
    (["--top-mlp", "256,0"], "argument --top-mlp: '256,0' is invalid; expected comma-separated positive ints, e.g. 512,256"),
    (["--bottom-mlp", "64x"], "argument --bottom-mlp: '64x' is invalid; expected comma-separated positive ints"),
])
def test_bad_flags_are_usage_errors(run_main, args, message):
    code, _, err = run_main("--fast", "--no-progress", *args)
    assert code == 2 and f"qat_recsys.py: error: {message}" in err


def test_too_few_samples_for_a_validation_split_names_num_samples_not_data(run_main):
    code, _, err = run_main("--fast", "--no-progress", "--no-export", "--num-samples", "2")
    assert code != 0 and "qat_recsys.py: error: --num-samples 2: val_fraction=0.2 of 2 rows gives 0 validation rows" in err


def test_an_interrupted_report_write_leaves_the_previous_report(tmp_path, monkeypatch):
    # the report was opened (truncated) and then written: a Ctrl-C in between left half a JSON file
    import json as _json

    from hwaware import cli

    path = tmp_path / "report.json"
    cli.write_json(str(path), {"old": 1})

    def interrupted(fd, mode):  # after the new text is written, before it is renamed into place
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.os, "fchmod", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.write_json(str(path), {"new": 2})
    assert _json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["report.json"]


def test_a_report_path_keeps_its_link_and_mode_and_any_name_length(tmp_path):
    import json as _json

    from hwaware import cli

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "123.json").write_text("{}")
    os.chmod(runs / "123.json", 0o600)
    (tmp_path / "latest.json").symlink_to(runs / "123.json")
    cli.write_json(str(tmp_path / "latest.json"), {"v": 1})
    assert (tmp_path / "latest.json").is_symlink() and _json.loads((runs / "123.json").read_text()) == {"v": 1}
    assert os.stat(runs / "123.json").st_mode & 0o777 == 0o600
    long = tmp_path / ("r" * 250)  # the temp name beside it must fit NAME_MAX too
    cli.write_json(str(long), [1])
    assert _json.loads(long.read_text()) == [1] and sorted(os.listdir(tmp_path)) == sorted(["latest.json", "runs", long.name])


def test_a_usage_error_is_exit_status_2_without_a_traceback():
    proc = _run("--fast", "--no-progress", "--batch-size", "0", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "qat_recsys.py: error: argument --batch-size: 0 is invalid; expected an integer >= 1" in proc.stderr


def test_bad_output_paths_are_refused_before_training(tmp_path, run_main):
    afile = tmp_path / "afile"
    afile.write_text("x")
    notart = tmp_path / "notart"
    notart.mkdir()
    (notart / "keep.txt").write_text("mine")
    from hwaware.export import export
    from tests.helpers import TinyCTR

    prod = export(TinyCTR(), tmp_path / "prod").path  # a deployed artifact: the report replaced its manifest.json
    before = open(os.path.join(prod, "manifest.json")).read()
    cases = [
        (["--report", os.path.join(prod, "manifest.json")], f"--report {os.path.join(prod, 'manifest.json')}: is inside "
                                                            f"the hwaware artifact {prod}, which holds only its own files"),
        (["--report", os.path.join(prod, "r.json")], f"--report {os.path.join(prod, 'r.json')}: is inside the hwaware artifact"),
        (["--export-dir", str(tmp_path / "new"), "--report", str(tmp_path / "new" / "manifest.json")],
         f"--report {tmp_path / 'new' / 'manifest.json'}: is inside --export-dir {tmp_path / 'new'}, where the artifact is written"),
        (["--export-dir", str(afile)], f"--export-dir {afile}: exists and is not a directory"),
        (["--export-dir", str(notart)], f"--export-dir {notart}: exists, is not empty and is not an hwaware artifact"),
        (["--report", str(tmp_path)], f"--report {tmp_path}: is a directory; expected a file path"),
    ]
    for args, message in cases:
        code, _, err = run_main("--fast", "--no-progress", *args)
        assert code == 2 and f"qat_recsys.py: error: {message}" in err, err[-2000:]
    assert (notart / "keep.txt").read_text() == "mine"
    assert open(os.path.join(prod, "manifest.json")).read() == before and sorted(os.listdir(prod)) == [
        "manifest.json", "weights.safetensors"]


@pytest.mark.parametrize(("fp32_epochs", "shape"), [
    ("0", []), ("1", ["--embedding-dim", "8", "--bottom-mlp", "32,16", "--top-mlp", "64"])])
def test_fast_with_explicit_fp32_epochs_runs_that_epoch_schedule(tmp_path, fp32_epochs, shape):
    report_path = tmp_path / "r.json"
    proc = _run("--fast", "--no-progress", "--fp32-epochs", fp32_epochs, "--num-samples", "6000",
                "--batch-size", "256", "--no-export", "--report", str(report_path), *shape)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report_path.read_text())
    assert r["config"]["start"] == "epoch" and r["config"]["fp32_epochs"] == int(fp32_epochs)
    qat = next(p for p in r["phases"] if p["phase"] == "calibrate")
    assert qat["start_epoch"] == int(fp32_epochs)
    model = {k: r["config"][k] for k in ("embedding_dim", "bottom_mlp", "top_mlp")}
    assert model == ({"embedding_dim": 8, "bottom_mlp": [32, 16], "top_mlp": [64]} if shape else
                     {"embedding_dim": 16, "bottom_mlp": [64], "top_mlp": [256, 128]})
    # the layers the flags asked for: 13 -> 32 -> 16 -> 8; 8 + 27*26/2 -> 64 -> 1
    assert {n for n in r["kl"] if "mlp" in n} == ({"bottom_mlp.0", "bottom_mlp.2", "bottom_mlp.4", "top_mlp.0", "top_mlp.2"}
                                                  if shape else {"bottom_mlp.0", "bottom_mlp.2", "top_mlp.0", "top_mlp.2", "top_mlp.4"})


def test_fast_honours_start_plateau():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qat_recsys_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = recipe.parse_args(["--fast", "--start", "plateau", "--no-export"])
    assert (args.start, args.fp32_epochs) == ("plateau", 4)
    assert recipe.build_callback(args).start == "plateau"
    assert recipe.parse_args(["--fast", "--no-export"]).start == "epoch"
    assert recipe.default_export_dir(recipe.parse_args(["--fast", "--sparsity", "2:4"])).endswith("qat_recsys-int8-24")
    assert recipe.default_export_dir(recipe.parse_args(["--fast"])).endswith("qat_recsys-int8")


def test_sparsity_skip_pattern_matching_no_layer_is_refused(run_main):
    code, _, err = run_main("--fast", "--no-progress", "--sparsity", "2:4", "--sparsity-skip", "nomatch",
                            "--num-samples", "3000", "--no-export")
    assert code == 2
    assert ("qat_recsys.py: error: --sparsity-skip: skip pattern 'nomatch' matches no layer of DLRM; the "
            "Linear/Conv layers are: bottom_mlp.0, bottom_mlp.2, top_mlp.0, top_mlp.2, top_mlp.4") in err


@pytest.mark.parametrize(("previous", "written", "message"), [
    (False, False, "interrupted; no artifact was written"),
    (True, False, "interrupted; no artifact was written; the previous artifact at {path} is intact"),
    (True, True, "interrupted; the artifact at {path} was written"),
])
def test_ctrl_c_after_fit_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys, previous, written, message):
    recipe = _load_recipe()
    art = tmp_path / "art"
    if previous:
        art.mkdir()
        (art / "manifest.json").write_text(json.dumps({"format": "hwaware-artifact"}))

    def interrupted_run(args, state):
        state["written"] = written
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "run", interrupted_run)
    import signal

    old = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            recipe.main(["--fast", "--export-dir", str(art)])
    finally:
        signal.signal(signal.SIGINT, old)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err == message.format(path=art)


@pytest.mark.parametrize(("signame", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_during_training_exits_nonzero_with_one_line(tmp_path, signame, status):
    """A scheduler's preemption (SIGTERM) or Ctrl-C (SIGINT) while Lightning trains: Lightning would exit
    0 (SIGTERM) or 1 (SIGINT) on its own. The recipe exits 128 + signal with one line, and exports nothing."""
    import signal
    import threading
    import time

    art = tmp_path / "art"
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, RECIPE, "--fast", "--no-progress", "--num-samples", "3000", "--batch-size", "64",
         "--fp32-epochs", "1", "--qat-epochs", "200", "--embedding-dim", "4", "--bottom-mlp", "8", "--top-mlp", "8",
         "--export-dir", str(art)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        # a background job's SIGINT is ignored, and the child would inherit that: the recipe honours it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        # printed at the start of epoch 1, inside fit: training is under way
        while not any("ProgressiveQuantization: calibrating" in line for line in lines):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.1)
        proc.send_signal(getattr(signal, signame))
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == status, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted by {signame}; no artifact was written"
    assert not art.exists()


@pytest.mark.parametrize("message", ["auroc dropped 0.2 > max_drop 0.001;\nnothing was written",
                                     "export refused: auroc dropped 0.2 > max_drop 0.001;\nnothing was written"])
def test_regression_error_is_one_line(tmp_path, monkeypatch, capsys, message):
    # export's own message starts "export refused:", which the recipe printed twice
    recipe = _load_recipe()

    def refused(*a, **k):
        raise recipe.hwaware.RegressionError(message, {})

    monkeypatch.setattr(recipe, "export_and_bench", refused)
    import signal

    old = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            recipe.main(["--fast", "--no-progress", "--num-samples", "6000", "--batch-size", "256",
                         "--export-dir", str(tmp_path / "art")])
    finally:
        signal.signal(signal.SIGINT, old)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "qat_recsys.py: error: export refused: auroc dropped 0.2 > max_drop 0.001; nothing was written"


def test_table_sizes_take_one_int_or_26(capsys):
    recipe = _load_recipe()
    assert recipe.parse_args(["--table-sizes", "1000"]).table_sizes == (1000,) * 26
    assert recipe.parse_args(["--table-sizes", ",".join(map(str, range(1, 27)))]).table_sizes == tuple(range(1, 27))
    for bad in ("0", "1,2,3", "x"):
        with pytest.raises(SystemExit):
            recipe.parse_args(["--table-sizes", bad])
        assert f"'{bad}' is invalid; expected one positive int (every table) or 26" in capsys.readouterr().err
