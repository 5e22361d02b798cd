"""What every CPU benchmark here writes with its figures: the machine it ran on, and the JSON file."""
from __future__ import annotations

import json
import os
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The instruction sets the int8 ratios depend on, as /proc/cpuinfo names them, best first.
_ISA_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def _cpuinfo() -> tuple[str | None, list[str]]:
    """The CPU's model name and which of ``_ISA_FLAGS`` it reports (Linux; elsewhere: None, [])."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, []
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return name, [f for f in _ISA_FLAGS if f in flags]


def cpu_device() -> str:
    """The ``"device"`` entry of a CPU benchmark's JSON: the CPU, the int8-relevant instruction sets
    it has, cores and torch's thread count."""
    name, isa = _cpuinfo()
    what = name or platform.processor() or platform.machine()
    return (f"cpu: {what} ({', '.join(isa) or 'no ISA flags read'}), {os.cpu_count()} cores "
            f"(torch threads {torch.get_num_threads()})")


def code_version() -> dict:
    """Which code produced the figures: the git commit of this checkout and whether tracked files
    other than the results themselves differed from it (``dirty``; a benchmark writing its JSON
    twice, or an earlier run's uncommitted JSON, is not a code change); ``{"commit": None}``
    outside a git checkout. ``HWAWARE_CODE_COMMIT`` names the commit instead (``dirty: None``) for a
    copy of the tree run elsewhere, whose ``.git`` may be another commit's (a GPU machine's copy)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, check=True).stdout.strip()
    given = os.environ.get("HWAWARE_CODE_COMMIT")
    if given:  # a copy of the tree (a GPU machine's) whose .git, if any, is not the commit sent
        return {"commit": given, "dirty": None, "commit_from": "HWAWARE_CODE_COMMIT"}
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}


def write_json(result: dict, path: str) -> None:
    """Write ``result`` to ``path`` (creating its folder), with the code version it came from
    (``"code"``, see ``code_version``), and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**result, "code": code_version()}, f, indent=2)
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
