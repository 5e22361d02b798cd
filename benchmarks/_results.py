"""What every CPU benchmark here writes with its figures: the machine it ran on, and the JSON file."""
from __future__ import annotations

import json
import os
import platform

import torch


def cpu_device() -> str:
    """The ``"device"`` entry of a CPU benchmark's JSON: architecture, cores, torch's thread count."""
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})"


def write_json(result: dict, path: str) -> None:
    """Write ``result`` to ``path`` (creating its folder) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


class WithEngines(torch.nn.Module):
    """A served model whose calls run with hwaware's int8 pass limited to the named engines
    (``native.only_engines``; none named: the ``torch._int_mm`` passes). The output bits do not
    change, only the speed."""

    def __init__(self, served: torch.nn.Module, *engines: str) -> None:
        super().__init__()
        self.served, self.engines = served, engines

    def forward(self, *args):
        from hwaware.quant import native

        with native.only_engines(*self.engines):
            return self.served(*args)
