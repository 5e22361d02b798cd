"""``deploy.fuse_relu``: the ReLU after an int8 layer in an ``nn.Sequential`` runs in the layer's
epilogue when the Sequential runs the pair, and only then: a model that also calls the layer on its
own (a pre-activation tap) gets the linear's output, in memory, loaded, and in ``program.pt2``."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import hwaware.export.exporter as exporter
from hwaware.export import export, load
from hwaware.export.deploy import Int8Chain, Int8Linear


class PreActTap(nn.Module):
    """Uses ``mlp[0]`` twice: on its own (the pre-activation) and inside ``mlp`` (followed by its ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        pre = self.mlp[0](h)  # [B, 32], negative entries included
        return self.mlp(h) + pre[:, :4]


def _unchained(model: nn.Module) -> nn.Module:
    """``model`` with every Int8Chain a plain ``nn.Sequential`` again: each child called in turn."""
    for m in model.modules():
        if type(m) is Int8Chain:
            m.__class__ = nn.Sequential
    return model


@pytest.mark.parametrize("impl", ["int_mm", "dequant"])  # int_mm: the Sequential is one int8_mlp call
def test_a_directly_called_layer_returns_its_linear_in_memory_loaded_and_exported(tmp_path, monkeypatch, impl):
    real = exporter.select_int8_kernels

    def fixed(model, rows, device="cpu", allowed=None):  # the timing decides the implementation; fix it here
        records = real(model, rows, device, allowed)
        for name, rec in records.items():
            model.get_submodule(name).kernels[device] = rec["chosen"] = rec["op_kernel"] = impl
        return records

    monkeypatch.setattr(exporter, "select_int8_kernels", fixed)
    monkeypatch.setattr(exporter, "select_int8_chains", lambda model, records, device="cpu", allowed=None: records)
    torch.manual_seed(0)
    x = torch.randn(16, 12)
    art = export(PreActTap().eval(), tmp_path / "art", example_inputs=(x,))
    layers = art.manifest["layers"]
    assert layers["mlp.0"]["fused_relu"] == "mlp.1" and layers["mlp.2"]["fused_relu"] == "mlp.3"
    deploy = art.model

    with torch.no_grad():
        h = deploy.stem(x)
        lin = deploy.mlp[0]
        assert lin.kernels["cpu"] == impl
        unfused = torch.ops.hwaware.int8_linear(h, lin.qweight, lin.w_scale, lin.bias, impl, False)
        assert (unfused < 0).any()
        torch.testing.assert_close(lin(h), unfused, atol=0, rtol=0)  # the tap: the linear, no ReLU
        out = deploy(x)
        # the function the model defines: every child called in turn gives the same bits
        torch.testing.assert_close(out, _unchained(load(art.path, model=PreActTap))(x), atol=0, rtol=0)
        loaded = load(art.path, model=PreActTap)
        torch.testing.assert_close(loaded.mlp[0](h), unfused, atol=0, rtol=0)
        torch.testing.assert_close(loaded(x), out, atol=0, rtol=0)
        program = torch.export.load(os.path.join(art.path, "program.pt2"))
        torch.testing.assert_close(program.module()(x), out, atol=0, rtol=0)
    # the fusion lives in the Sequential's forward: its children are the layer and the ReLU as they were
    for m in (deploy, loaded):
        assert type(m.mlp) is Int8Chain and type(m.mlp[0]) is Int8Linear and not m.mlp[0].relu
        assert type(m.mlp[1]) is nn.ReLU
    if impl == "int_mm":  # the fused path still runs: the Sequential's int8 layers as one call
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert targets.count("hwaware.int8_mlp.default") == 1
