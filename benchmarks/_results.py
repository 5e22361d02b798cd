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
