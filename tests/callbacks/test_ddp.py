"""ProgressiveQuantization + SemiStructuredSparsity under 2-process DDP with the gloo backend on CPU."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_quant_script.py")


def test_ddp_gloo_two_ranks_agree(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["backend"] == "gloo" and r0["phase"] == "done"
    assert [p["phase"] for p in r0["report_phases"]] == ["fp32", "calibrate", "qat", "validate", "done"]
    # observers were synchronised: static activation scales identical on both ranks (they saw different shards)
    assert r0["act_scales"] and r0["act_scales"] == r1["act_scales"]
    assert r0["weight_scales"] == r1["weight_scales"]
    assert r0["kl"] == r1["kl"] and r0["fallbacks"] == r1["fallbacks"]
    # the report too: each rank measured its own shard; SQNR, output KL and the per-epoch KL were rank-local
    assert r0["sqnr_db"] == r1["sqnr_db"] and r0["output_kl"] == r1["output_kl"] and r0["kl_history"] == r1["kl_history"]
    assert r0["kl_history"] and r0["output_kl"] is not None
    assert r0["weights"] == r1["weights"]
    # 2:4 masks: identical on both ranks, recomputed (and moving) every step under SR-STE
    assert r0["sparse_phase"] == "sparse" and set(r0["masks"]) == {"mlp.0", "mlp.2"}
    assert r0["masks"] == r1["masks"] and r0["dense"] == r1["dense"]
    assert sum(r0["mask_changes"]) > 0


def test_ddp_a_layer_only_one_rank_calls_in_calibration_does_not_hang(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "branch"], capture_output=True, text=True, timeout=240,
                          env=env, cwd=str(tmp_path), start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "branch0.json").read_text())
    r1 = json.loads((tmp_path / "branch1.json").read_text())
    assert "aux" in r0["act_scales"] and r0["act_scales"] == r1["act_scales"]  # rank 1 took rank 0's statistics


def test_ddp_resume_mid_qat_with_observers_still_observing_matches_the_uninterrupted_run(tmp_path):
    """Static observers synced only at QAT start and at freezing: a checkpoint mid-QAT held rank 0's
    unsynced statistics, so a resume lost rank 1's and ended with other weights (a DDP trial)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for which in ("full", "resume"):
        proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "resume", which], capture_output=True, text=True,
                              timeout=300, env=env, cwd=str(tmp_path), start_new_session=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
    full, resumed = (json.loads((tmp_path / f"{w}0.json").read_text()) for w in ("full", "resume"))
    assert full["act_scales"] and resumed["act_scales"] == full["act_scales"]
    assert resumed["weights"] == full["weights"]
    assert json.loads((tmp_path / "full1.json").read_text())["act_scales"] == full["act_scales"]  # the ranks agree


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_multiprocessing_launched_ddp_is_refused_with_the_reason(tmp_path, strategy):
    """Under ddp_spawn the callbacks' state stays in the children: the model exported afterwards
    would silently be post-training. The callbacks refuse it in setup (which runs in each child,
    whose error reaches the parent), naming strategy='ddp'."""
    import multiprocessing

    import pytorch_lightning as pl

    from hwaware import ProgressiveQuantization, SemiStructuredSparsity
    from tests.helpers import TinyCTR

    if strategy == "ddp_fork" and "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here")
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False, default_root_dir=str(tmp_path),
                         max_epochs=2)
    for cb in (ProgressiveQuantization(start_epoch=1), SemiStructuredSparsity(start_epoch=1)):
        with pytest.raises(ValueError, match=r"launched by multiprocessing .* Use strategy='ddp'"):
            cb.setup(trainer, TinyCTR(), "fit")
