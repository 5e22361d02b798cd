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


class ServedTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)  # (nn.Embedding's init is normal_)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_loading_a_model_with_a_table_imports_neither_dynamo_nor_sympy(tmp_path):
    """Building the model's skeleton on the meta device ran nn.Embedding's normal_ init through torch's
    Python references, whose first use imports torch._dynamo and sympy: 143 MiB and 1.2 s of a
    server's load for a 5 KiB artifact. Skeletons skip random init (meta tensors hold no values)."""
    torch.manual_seed(0)
    hwaware.export(ServedTable(), tmp_path / "art", example_inputs=(torch.randint(0, 64, (8, 5)),))
    script = textwrap.dedent(f"""
        import sys, torch, hwaware
        from {ServedTable.__module__} import ServedTable
        served = hwaware.load({str(tmp_path / 'art')!r}, model=ServedTable)
        served(torch.randint(0, 64, (3, 5)))
        heavy = [m for m in ("torch._dynamo", "sympy") if m in sys.modules]
        assert not heavy, heavy
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": __import__("os").pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_meta_skeleton_skips_random_fills_on_meta_tensors_only():
    from hwaware.export.exporter import meta_device

    with meta_device():
        emb = nn.Embedding(10, 4)
        eye = nn.init.eye_(torch.empty(4, 4))  # (eye_ on meta went through torch's references too)
        cpu = torch.zeros(3, device="cpu")
        nn.init.normal_(cpu, mean=5.0)  # a real tensor a constructor makes: filled as usual
        cpu2 = torch.zeros(3, device="cpu").uniform_(1.0, 2.0)
    assert emb.weight.is_meta and emb.weight.shape == (10, 4) and eye.is_meta
    assert not torch.equal(cpu, torch.zeros(3)) and bool((cpu2 >= 1).all())
