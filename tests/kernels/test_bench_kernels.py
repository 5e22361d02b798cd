"""benchmarks/bench_kernels.py measures on a GPU only: without one it says so and exits 2, never
writing estimated numbers."""
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_kernels.py")


def test_help_lists_the_options():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--out" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr + proc.stdout
    assert not out.exists()
