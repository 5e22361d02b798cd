"""Peak resident memory of serving a model: an artifact or its FP32 architecture, each in a fresh process.

RSS is per process and its high-water mark only rises, so two models measured in one process would
each see the other's pages. ``peak_memory`` therefore runs this module as a child process per model
(``python -m hwaware.export.memory PATH fp32|artifact ...``): after the imports it resets the
high-water mark (``/proc/self/clear_refs``), builds the model (``hwaware.load`` for the artifact;
the recorded class from its hyperparameters for FP32, as ``hwaware bench`` times it), runs the
recorded inputs through it once per batch under ``torch.inference_mode()``, and reads
``/proc/self/status``. Reported in MiB, over what the process held after its imports:

- ``load_peak``: the high-water mark while building it (a load that copies the weights shows here);
- ``model_resident``: resident once every weight has been read (a page of each touched; an
  artifact's weights are read into memory at load, so this adds little for it; an FP32 model's
  lazily zeroed pages are resident only once touched);
- ``peak``: the high-water mark after the batches too (weights, activations, workspaces).

Linux only (``/proc``); elsewhere :func:`peak_memory` returns None.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional

__all__ = ["peak_memory"]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _probe(path: str, which: str, batch_size: int, batches: int, kernels: str = "recorded",
           model: Optional[str] = None, inputs_file: Optional[str] = None) -> Dict[str, float]:
    import torch

    from hwaware.export import load, read_manifest
    from hwaware.export.exporter import (build_recorded, given_inputs, import_model_class, is_factory, make_inputs,
                                         meta_device, model_class)

    manifest = read_manifest(path)
    # the model's class is imported before the baseline: its module's imports (Lightning, for a
    # LightningModule) are the process's, not the cost of loading the weights
    cls = import_model_class(model) if model else model_class(manifest, path)
    if inputs_file:
        from hwaware.export.bench import read_inputs_file

        inputs = [given_inputs(read_inputs_file(inputs_file), manifest, path)] * batches
    else:
        inputs = [make_inputs(manifest["inputs"], batch_size, seed=i, structure=manifest.get("input_structure"))
                  for i in range(batches)]
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    if which == "artifact":
        if is_factory(cls):  # the caller's function: its FP32 weights are not the artifact's cost
            with meta_device():
                cls = cls()
        net = load(path, kernels=kernels, model=cls)  # "measure": the load peak includes re-timing the kernels
    else:
        net = build_recorded(cls, manifest, path)
    net.eval()
    load_peak = _status_kib("VmHWM")
    with torch.no_grad():  # every weight read once, as serving traffic eventually does: lazily
        for t in list(net.parameters()) + list(net.buffers()):  # allocated pages are resident only once touched
            if t.numel():
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()  # one element per page
    resident = _status_kib("VmRSS")
    with torch.inference_mode():
        for x in inputs:
            net(*x)
    peak = _status_kib("VmHWM")
    mib = 1024.0
    return {"load_peak_mib": (load_peak - base) / mib, "model_resident_mib": (resident - base) / mib,
            "peak_mib": (peak - base) / mib, "process_peak_mib": peak / mib}


_RESULT_MARK = "hwaware-memory-probe: "


def peak_memory(path: str, which: str, batch_size: int, batches: int, timeout: float = 600,
                kernels: str = "recorded", model: Optional[str] = None,
                inputs_file: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Memory of serving ``which`` (``"artifact"`` or ``"fp32"``) for the artifact at ``path``, measured
    in a child process (see the module docstring); None where ``/proc`` is missing (not Linux).
    ``kernels``: :func:`hwaware.load`'s, for the artifact (its kernels decide which derived weights
    are cached, e.g. ``dequant``'s fp32 copy). ``model``: ``"module:Class"`` to build instead of the class
    recorded at export (``hwaware bench --model``), imported in the child (from its working directory,
    this process's). ``inputs_file``: serve the batch in that file (``hwaware bench --inputs``)
    instead of batches generated from the recorded example shapes."""
    if which not in ("artifact", "fp32"):
        raise ValueError(f"which={which!r}; expected 'artifact' or 'fp32'")
    if kernels not in ("recorded", "measure"):
        raise ValueError(f"kernels={kernels!r}; expected 'recorded' or 'measure'")
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, "-m", "hwaware.export.memory", os.fspath(path), which, str(batch_size), str(batches), kernels,
           model or "", os.path.abspath(inputs_file) if inputs_file else ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {which} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    # the result is the last line that starts with the marker: the model may print too (without a newline)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_MARK)]
    if not lines:
        raise RuntimeError(f"memory probe of {which} printed no result: {proc.stdout[-500:]!r} {proc.stderr[-1500:]}")
    return json.loads(lines[-1][len(_RESULT_MARK):])


if __name__ == "__main__":
    path_, which_, batch_, batches_ = sys.argv[1:5]
    result = _probe(path_, which_, int(batch_), int(batches_), sys.argv[5], sys.argv[6] or None, sys.argv[7] or None)
    print("\n" + _RESULT_MARK + json.dumps(result), flush=True)
