"""The package's import surface: a serving process pays only for what serving uses."""
import subprocess
import sys
import textwrap

import torch
from torch import nn

import hwaware


class Served(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


def test_loading_and_serving_an_artifact_imports_no_lightning(tmp_path):
    """`import hwaware` pulled in Lightning and torchmetrics (about 5 s and 180 MiB per server
    process) through the callbacks; they now load on first use."""
    torch.manual_seed(0)
    hwaware.export(Served(), tmp_path / "art", example_inputs=(torch.randn(8, 16),))
    script = textwrap.dedent(f"""
        import sys, torch, hwaware
        from {Served.__module__} import Served  # load builds only hwaware's own classes unasked
        served = hwaware.load({str(tmp_path / 'art')!r}, model=Served)
        served(torch.randn(3, 16))
        torch.export.load({str(tmp_path / 'art' / 'program.pt2')!r}).module()(torch.randn(3, 16))
        heavy = [m for m in ("pytorch_lightning", "lightning_fabric", "torchmetrics") if m in sys.modules]
        assert not heavy, heavy
        from hwaware import ProgressiveQuantization, SemiStructuredSparsity  # still importable, on first use
        assert "pytorch_lightning" in sys.modules and ProgressiveQuantization.__module__.startswith("hwaware.callbacks")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": __import__("os").pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr[-3000:]


def test_subpackages_are_attributes_without_importing_them_first():
    run = subprocess.run([sys.executable, "-c", "import hwaware; print(hwaware.callbacks.ProgressiveQuantization.__name__, "
                          "hwaware.sparsity.__name__, hwaware.recsys.__name__)"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["ProgressiveQuantization", "hwaware.sparsity", "hwaware.recsys"]


def test_lazy_names_are_listed_and_unknown_names_raise():
    assert {"ProgressiveQuantization", "SemiStructuredSparsity", "export", "load"} <= set(dir(hwaware))
    assert set(hwaware.__all__) <= set(dir(hwaware))
    try:
        hwaware.NoSuchThing
    except AttributeError as e:
        assert "no attribute 'NoSuchThing'" in str(e)
    else:
        raise AssertionError("hwaware.NoSuchThing did not raise")
