"""The ``hwaware`` command line.

    hwaware inspect out/ctr-int8          # verify, then print layers, sizes and the regression report
    hwaware inspect out/ctr-int8 --json   # verify, then print the manifest as JSON

``inspect`` verifies the artifact fully (format, version, manifest hash, every file's size and
sha256, the safetensors header) before printing anything; a refused artifact prints
``hwaware: error: <file>: <reason>`` on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["main"]

# Layer-entry keys shown first, in this order; with --wide any other keys follow alphabetically, except
# the measured kernel selection of int8 and 2:4 layers and the layers' notes (sentences), which get their own sections.
_LAYER_COLUMNS = ("scheme", "shape", "group_size", "bytes", "kernel", "activation")
_OWN_SECTION = ("selection", "note")


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-" if n is None else str(n)
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_cell(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "bytes":
        return _fmt_bytes(v)
    if key == "shape" and isinstance(v, (list, tuple)):
        return "x".join(str(d) for d in v) or "scalar"
    if isinstance(v, Mapping):  # kernel: {"cpu": "int8_mm", "cuda": "triton_w8"}
        return ",".join(f"{k}={_fmt_cell('', x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt_cell("", x) for x in v)
    return str(v)


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: a layer-table cell longer than this is shortened (to its head before `` [`` or ``:``, else cut with
#: ``...``) and marked ``[n]``; its full text follows the table once
_MAX_CELL = 40


def _short_cell(cell: str, n: int) -> str:
    mark = f" [{n}]"
    for sep in (" [", ":"):
        head = cell.split(sep, 1)[0]
        if head != cell and len(head) + len(mark) <= _MAX_CELL:
            return head + mark
    return cell[:_MAX_CELL - len(mark) - 3].rstrip() + "..." + mark


def _natural_order(entries: Mapping[str, Any]) -> Dict[str, Any]:
    """``entries`` by layer name with numbers read as numbers (``emb.2`` before ``emb.10``; the
    manifest's JSON keys are sorted as strings)."""
    def key(name: Any):
        parts = re.split(r"(\d+)", str(name))  # str, digits, str, ...: the same type at each position
        return [int(p) if i % 2 else p for i, p in enumerate(parts)]

    return {k: entries[k] for k in sorted(entries, key=key)}


def _layers_table(layers: Mapping[str, Any], wide: bool = False) -> str:
    """The layer table: the ``_LAYER_COLUMNS`` a layer has, and with ``wide`` every other field too
    (without it, a line after the table names the fields left out)."""
    entries = {name: (e if isinstance(e, Mapping) else {"value": e}) for name, e in layers.items()}
    present = {k for e in entries.values() for k in e} - set(_OWN_SECTION)
    more = sorted(present - set(_LAYER_COLUMNS))
    cols = [c for c in _LAYER_COLUMNS if c in present] + (more if wide else [])
    rows = [["layer"] + cols]
    rows += [[name] + [_kernels_cell(e) if c == "kernels" else
                       f"{_fmt_bytes(e['stored_bytes'] if isinstance(e.get('stored_bytes'), int) else 0)} (as {e['stored_as']})"
                       if c == "bytes" and isinstance(e.get("stored_as"), str) else
                       _fmt_cell(c, e.get(c)) for c in cols]
             for name, e in entries.items()]
    # long cells (a kernel's description runs to ~300 characters): shortened, the full text once below
    full: Dict[str, int] = {}
    for r in rows[1:]:
        for i, cell in enumerate(r):
            if i and len(cell) > _MAX_CELL:
                r[i] = _short_cell(cell, full.setdefault(cell, len(full) + 1))
    out = _table(rows)
    if full:
        out += "\n\n" + "\n".join(_wrap(text, f"  [{n}] ", "      ") for text, n in full.items())
    if more and not wide:
        out += "\n\n" + _wrap(f"more per-layer fields (--wide shows them, --json gives the manifest): {', '.join(more)}",
                              "", "  ")
    return out


def _kernels_cell(entry: Mapping[str, Any]) -> str:
    """The ``kernels`` cell: the op's kernel argument per device; for a 2:4 layer with int8 values also
    the ``int8_linear`` implementation it runs on the decompressed codes (its ``dense`` is ``int_mm``)."""
    kernels = entry.get("kernels")
    if entry.get("scheme") != "sparse24_int8" or not isinstance(kernels, Mapping):
        return _fmt_cell("kernels", kernels)
    from hwaware.export.selection import SPARSE24_INT8_IMPL as impl

    return ",".join(f"{d}={_fmt_cell('', k)}" + (f" (int8 {impl[k]})" if d == "cpu" and k in impl else "")
                    for d, k in kernels.items())


def _width() -> int:
    """Columns to wrap at: the terminal's (``COLUMNS`` first), at most 110 and at least 60."""
    import shutil

    return max(60, min(110, shutil.get_terminal_size(fallback=(110, 24)).columns))


def _wrap(text: str, first: str, rest: str) -> str:
    import textwrap

    return textwrap.fill(text, width=_width(), initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def _selection_lines(layers: Mapping[str, Any]) -> List[str]:
    """One line per measured layer and device: every candidate's time, the choice (*) and why."""
    out = []
    for name, e in layers.items():
        sel = e.get("selection") if isinstance(e, Mapping) else None
        if not isinstance(sel, Mapping):
            continue
        for device, rec in sel.items():
            if not isinstance(rec, Mapping):
                continue
            shape = "x".join(str(d) for d in rec.get("input_shape") or []) or "?"
            cands = []
            for c, m in (rec.get("measured") or {}).items():
                t = f"{m['us']:.1f}us" if isinstance(m, Mapping) and m.get("available") else "n/a"
                keeps = "" if isinstance(m, Mapping) and m.get("keeps_math") else " (other math)"
                cands.append(f"{c} {t}{'*' if c == rec.get('chosen') else ''}{keeps}")
            fp32 = rec.get("fp32_us")
            if isinstance(fp32, (int, float)) and not isinstance(fp32, bool):  # what the FP32 layer took there
                cands.append(f"(FP32 F.linear {fp32:.1f}us)")
            out.append(_wrap(f"{name} [{device}, input {shape}]: " + (" | ".join(cands) or "not measured"), "  ", "      "))
            if rec.get("why"):
                out.append(_wrap(f"-> {rec.get('chosen')}: {rec['why']}", "    ", "       "))
    return out


def _regression_line(reg: Mapping[str, Any]) -> str:
    def num(k: str) -> str:
        return _regression_num(reg, k)

    passed = reg.get("passed")
    verdict = "PASSED" if passed is True else "FAILED" if passed is False else "not judged"
    line = (f"regression: {reg.get('metric', '?')} reference {num('reference')} exported {num('exported')} "
            f"drop {num('drop')} (max_drop {num('max_drop')}): {verdict}")
    refs = reg.get("references")
    if isinstance(refs, Mapping) and refs and all(isinstance(v, (int, float)) for v in refs.values()):
        line += "\n  references (the better gates): " + ", ".join(f"{k} {float(v):.5f}" for k, v in refs.items())
    if isinstance(reg.get("target"), str):
        line += f"\n  targets: {reg['target']}"
    if "quantization_drop" in reg:
        line += (f"\n  final weights with quantization off {num('final_weights_fp32')}: the export costs "
                 f"{num('quantization_drop')} of them (not gated)")
    return line


def _inspect_text(path: str, manifest: Dict[str, Any], on_disk: int, wide: bool = False) -> str:
    from hwaware.export.artifact import unlisted_entries

    out = [
        f"artifact: {path}",
        f"format: {manifest.get('format')} v{manifest.get('format_version')}  "
        f"hwaware {manifest.get('hwaware_version', '?')}  torch {manifest.get('torch_version', '?')}",
        "files: "
        + ", ".join(f"{n} ({_fmt_bytes(e.get('bytes'))})" for n, e in sorted(manifest.get("files", {}).items())),
    ]
    from hwaware.export.exporter import quantized_how

    how = quantized_how(manifest)
    if how:
        out.append(how)
    extra = unlisted_entries(path, manifest) if os.path.isdir(path) else []
    if extra:
        out.append(f"not part of the artifact (unlisted in the manifest; never read, not counted): {', '.join(extra)}")
    program = manifest.get("program")
    if isinstance(program, Mapping) and isinstance(program.get("batch_range"), list):
        spans = [("-" if r is None else f"{r[0]}..{'any' if r[1] is None else r[1]}")
                 for r in program["batch_range"] if r is None or (isinstance(r, list) and len(r) == 2)]
        out.append("program.pt2: batch per input " + ", ".join(spans))
        checked = program.get("checked")
        if isinstance(checked, Mapping) and isinstance(checked.get("exact"), bool):
            out.append("  on example_inputs: " + ("the deploy model's outputs, bit for bit" if checked["exact"] else
                       f"the deploy model's outputs within {checked.get('max_abs_diff')!r} (rounding of the traced graph)"))
        inputs = manifest.get("inputs")
        if manifest.get("input_structure") is not None and isinstance(inputs, list):
            from hwaware.export.artifact import ArtifactError
            from hwaware.export.exporter import input_paths

            try:  # (an edited structure: load and bench refuse it with the reason)
                out.append("program.pt2 inputs: " + ", ".join(f"{i}={p}" for i, p in enumerate(
                    input_paths(manifest["input_structure"], len(inputs), "manifest.json"))))
            except ArtifactError as e:
                out.append(f"program.pt2 inputs: {e}")
        fixed = [("x".join(map(str, d["shape"][1:])) if isinstance(d, Mapping) and isinstance(d.get("shape"), list)
                  and len(d["shape"]) > 1 else None) for d in (inputs if isinstance(inputs, list) else [])]
        if any(fixed):  # torch.export specializes them: a sequence length other than the example's fails a guard
            out.append("  every other dimension as in example_inputs: " + ", ".join(f or "-" for f in fixed)
                       + " (export with the shapes you serve; hwaware.load serves any)")
    layers = manifest.get("layers")
    if isinstance(layers, Mapping) and layers:
        layers = _natural_order(layers)
        out += ["", _layers_table(layers, wide)]
        notes = [f"  {name}: {e['note']}" for name, e in layers.items() if isinstance(e, Mapping) and e.get("note")]
        if notes:
            out += ["", "notes:"] + notes
        selection = _selection_lines(layers)
        if selection:
            reg = manifest.get("regression")
            gated = isinstance(reg, Mapping) and isinstance(reg.get("by_impl"), Mapping)
            out += ["", _wrap("kernel selection (measured at export; * = chosen: the fastest that keeps the layer's math"
                              + (", int8 layers among the implementations that passed the gate on their own):" if gated
                                 else "):"), "", "  ")] + selection
    dense = manifest.get("dense_layers")
    if isinstance(dense, Mapping) and dense:
        dense = _natural_order(dense)
        out += ["", f"left dense ({len(dense)}):"] + [_wrap(f"{name}: {reason}", "  ", "      ") for name, reason in dense.items()]
    out.append("")
    fp32 = manifest.get("fp32_bytes")
    total = f"total: {_fmt_bytes(on_disk)} on disk ({on_disk} bytes)"
    if isinstance(fp32, (int, float)) and not isinstance(fp32, bool) and fp32 > 0:
        total += f" vs fp32 {_fmt_bytes(fp32)} ({fp32} bytes): {on_disk / fp32:.1%} of fp32"
    out.append(total)
    files = manifest.get("files")
    program = files.get("program.pt2") if isinstance(files, Mapping) else None
    if isinstance(program, Mapping) and isinstance(program.get("bytes"), int):
        # program.pt2 carries its own copy of the weights: what a deployment loads is one or the other
        served = sum(e.get("bytes", 0) for n, e in files.items() if n != "program.pt2" and isinstance(e, Mapping)
                     and isinstance(e.get("bytes"), int))
        line = f"  without program.pt2 ({_fmt_bytes(program['bytes'])}, its own copy of the weights): {_fmt_bytes(served)}"
        if isinstance(fp32, (int, float)) and not isinstance(fp32, bool) and fp32 > 0:
            line += f", {served / fp32:.1%} of fp32"
        out.append(line)
    slow = manifest.get("int8_vs_fp32")
    if isinstance(slow, Mapping) and all(isinstance(slow.get(k), (int, float)) for k in ("int8_us", "fp32_us", "layers")):
        out.append(_wrap(f"int8 layers outside chains, as timed at export: {slow['int8_us']:.1f} us against "
                         f"{slow['fp32_us']:.1f} us for the same {slow['layers']} layer(s) in FP32"
                         + (" (SLOWER than FP32 at that batch: hwaware bench PATH times the whole model)"
                            if slow["int8_us"] > 1.25 * slow["fp32_us"] else ""), "", "  "))
    reg = manifest.get("regression")
    out.append(_regression_line(reg) if isinstance(reg, Mapping) else "regression: not measured")
    by_impl = reg.get("by_impl") if isinstance(reg, Mapping) else None
    if isinstance(by_impl, Mapping) and by_impl:
        out.append(_wrap("every int8 layer on one implementation: " + ", ".join(
            f"{impl} {_regression_num(r, 'exported')} (drop {_regression_num(r, 'drop')}, "
            f"{'passed' if r.get('passed') is True else 'FAILED'})" for impl, r in by_impl.items() if isinstance(r, Mapping)),
            "  ", "    "))
    out += _cpu_lines(manifest.get("selection_cpu"))
    return "\n".join(out)


def _regression_num(rec: Mapping[str, Any], key: str) -> str:
    v = rec.get(key)
    return f"{v:.6g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ("-" if v is None else str(v))


def _engine_words(cpu: Mapping) -> str:
    engine = cpu.get("int8_engine", "amx" if cpu.get("amx_in_use") else "unknown")  # older artifacts: amx_in_use only
    return {"amx": "AMX tiles", "vnni": "VNNI", "vpmaddwd": "VPMADDWD", None: "none, torch._int_mm"}.get(engine, str(engine))


def _cpu_lines(cpu: Any) -> list:
    """Where the kernels were timed, and what this CPU lacks of it."""
    if not isinstance(cpu, Mapping):
        return []
    from hwaware.export.selection import cpu_profile, lost_features

    isa = cpu.get("isa") if isinstance(cpu.get("isa"), list) else []
    out = [_wrap(f"kernels timed on: {cpu.get('model', '?')} ({' '.join(map(str, isa)) or 'none of the listed ISAs'}; "
                 f"hwaware int8 pass: {_engine_words(cpu)})", "", "  ")]
    lost = lost_features(dict(cpu), cpu_profile())  # a malformed isa compares as unknown
    if lost:
        out.append(f"  this CPU lacks {', '.join(lost)}: the recorded kernels may be much slower here "
                   "(hwaware bench PATH --kernels measure; hwaware.load(PATH, kernels='measure'))")
    return out


def _cmd_inspect(args: argparse.Namespace) -> int:
    from hwaware.export.artifact import artifact_size_bytes, verify_artifact

    manifest = verify_artifact(args.path)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    try:
        text = _inspect_text(args.path, manifest, artifact_size_bytes(args.path), args.wide)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError, RecursionError) as e:
        # verified, so written (and hashed) as it is: by another hwaware version, or edited and re-hashed
        # (ArithmeticError: a byte count of 10**400 divided into a float; RecursionError: a value nested 400 deep)
        print(f"hwaware inspect: error: {os.path.join(args.path, 'manifest.json')}: a field holds what this hwaware does "
              f"not write ({type(e).__name__}: {e}); --json prints the manifest as stored", file=sys.stderr)
        return 2
    print(text)
    return 0


def _model_option(spec: Optional[str]) -> Optional[type]:
    """``--model module:Class`` imported (None without it), the current directory searched first as
    ``python -m`` would (a console script's path holds only its own directory)."""
    if spec is None:
        return None
    from hwaware.export.exporter import import_model_class

    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return import_model_class(spec)
    except (ValueError, TypeError) as e:
        raise type(e)(f"--model: {e}") from None
    finally:
        if added:
            sys.path.remove(cwd)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as JSON at ``path``. A regular file (or a new one) in a directory we can write is
    replaced atomically: a temp file beside it, renamed over it, so an interrupt (Ctrl-C, a
    scheduler's SIGTERM) leaves the previous file or the new one, never half. The file keeps its
    mode, a symlink its link (its target is replaced). Anything else (a pipe, ``/dev/stdout``, a
    file in a directory we cannot write) is written in place, as ``open(path, "w")`` would."""
    text = json.dumps(obj, indent=2) + "\n"
    real = os.path.realpath(os.fsdecode(path))
    parent = os.path.dirname(real)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        st = None
    if (st is not None and not stat.S_ISREG(st.st_mode)) or not os.access(parent, os.W_OK | os.X_OK):
        with open(path, "w") as f:
            f.write(text)
        return
    if st is not None:
        mode = stat.S_IMODE(st.st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # as open(path, "w") makes a new file (mkstemp's is 0600)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".hwaware-", suffix=".tmp")  # (short: any name fits)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def int_at_least(lo: int, hi: Optional[int] = None):
    """argparse type: an integer >= ``lo`` (and <= ``hi``, when given); the error names the value and
    the range (``argument --rounds: 0 is invalid; expected an integer >= 1``). The recipes use it too."""
    expected = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {expected}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is invalid; expected {expected}")
        return v
    parse.__name__ = expected
    return parse


def artifact_file_problem(path: str) -> Optional[str]:
    """Why a file of ours (a JSON report) may not be written at ``path``: it is inside an hwaware
    artifact, which holds only its own files (a deployment trial's ``--report`` replaced an
    artifact's ``manifest.json``, and nothing could load or re-export it), else None."""
    from hwaware.export import is_artifact

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent) and is_artifact(parent):
        return (f"is inside the hwaware artifact {parent}, which holds only its own files (writing there would replace "
                "one of them, or make the next export into it refuse); write it elsewhere")
    return None


def _json_target_problem(path: str) -> Optional[str]:
    """Why a JSON file cannot be written at ``path``, else None."""
    if os.path.isdir(path):
        return "is a directory; expected a file path"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"{parent} is not a directory (create it first)"
    inside = artifact_file_problem(path)
    if inside:
        return inside
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return "not writable"
    return None


def _samples_in(output, given) -> Tuple[int, str]:
    """The samples one batch of ``given`` inputs holds: the rows of the FP32 model's output (one per
    sample for a CTR or classification model, also when the inputs are flat ids + bag offsets,
    whose first input's rows are the ids): its first tensor with a batch dimension, looking into
    dicts (a multi-task model's heads), tuples and lists in order and past 0-d entries (a loss),
    else the first input's rows."""
    import torch

    def first_batched(o):
        if isinstance(o, torch.Tensor):
            return o if o.dim() >= 1 else None
        items = o.values() if isinstance(o, Mapping) else o if isinstance(o, (tuple, list)) else ()
        for item in items:
            found = first_batched(item)
            if found is not None:
                return found
        return None

    out = first_batched(output)
    if out is not None:
        return int(out.shape[0]), "the rows of the FP32 model's output on the batch"
    x = first_batched(given)  # (looking into a dict / list input too)
    return (int(x.shape[0]) if x is not None else 1), "the first input's rows (the output holds no batched tensor)"


def _input_bytes(description: list, batch_size: int, batches: int) -> int:
    """Bytes of the inputs bench generates from the recorded example shapes (ids are drawn through
    float64: 8 bytes an element at least)."""
    per_row = 0
    for d in description:
        n = 1
        for k in d["shape"][1:]:
            n *= int(k)
        per_row += n * 8
    return per_row * batch_size * batches


def _available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _cmd_bench(args: argparse.Namespace) -> int:
    """Artifact vs its FP32 architecture, same inputs, interleaved: throughput ratio and latencies;
    then the peak memory of serving each, one fresh process per model. With ``--json -`` the
    results are the only thing on stdout (the readable lines go to stderr)."""
    if args.json == "-":
        with contextlib.redirect_stdout(sys.stderr):
            code, result = _bench(args)
        if code == 0:
            print(json.dumps(result, indent=2))
        return code
    code, result = _bench(args)
    if code == 0 and args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return code


def _bench(args: argparse.Namespace) -> tuple:
    from hwaware.export import ArtifactError, load, read_manifest
    from hwaware.export.bench import compare_throughput, instability_warning, read_inputs_file
    from hwaware.export.exporter import (build_inputs, build_recorded, check_input_descriptions, float_bytes, given_inputs,
                                         is_factory, make_inputs, meta_device, model_class)
    import torch

    if args.json and args.json != "-":  # refused now, not after the benchmark ran
        problem = _json_target_problem(args.json)
        if problem:
            print(f"hwaware bench: error: --json {args.json}: {problem}", file=sys.stderr)
            return 2, None
    try:
        cls = _model_option(args.model)
        served = load(args.path, kernels=args.kernels, model=cls() if is_factory(cls) else cls)
        manifest = read_manifest(args.path)
        cls = cls or model_class(manifest, args.path)
    except (ArtifactError, ValueError, TypeError) as e:
        print(f"hwaware: error: {e}", file=sys.stderr)
        return 2, None
    given = None
    if args.inputs:
        try:
            given = given_inputs(read_inputs_file(args.inputs), manifest, args.path)
        except (ValueError, ArtifactError) as e:
            print(f"hwaware bench: error: {e}", file=sys.stderr)
            return 2, None
    elif not manifest.get("inputs"):
        print(f"hwaware: error: {args.path}/manifest.json records no example inputs; export with example_inputs=... to bench, "
              "or pass --inputs FILE.safetensors", file=sys.stderr)
        return 2, None
    if args.batch_size is None and given is None:  # (with --inputs: counted from the model's output below)
        args.batch_size = 2048
    if given is None:
        try:
            check_input_descriptions(manifest["inputs"], f"{args.path}/manifest.json")
            build_inputs(manifest.get("input_structure"), manifest["inputs"], f"{args.path}/manifest.json")
        except ArtifactError as e:
            print(f"hwaware bench: error: {e}", file=sys.stderr)
            return 2, None
    avail = _available_bytes()
    need = 0 if given is not None else _input_bytes(manifest["inputs"], args.batch_size, args.batches)
    if avail is not None and need > avail // 2:  # refused with a line, not killed by the kernel's OOM killer
        print(f"hwaware bench: error: --batch-size {args.batch_size} x --batches {args.batches}: the generated inputs alone "
              f"would take {need / 2**30:.1f} GiB, more than half the {avail / 2**30:.1f} GiB of memory available; "
              "pass a smaller --batch-size or --batches", file=sys.stderr)
        return 2, None
    # FP32 reference: the same architecture with dense float weights (their values do not change speed),
    # built on the meta device first: its size must be the exported model's, and must fit
    try:
        with meta_device():
            skeleton = build_recorded(cls, manifest, args.path)
    except ArtifactError as e:
        print(f"hwaware: error: {e}", file=sys.stderr)
        return 2, None
    got, want = float_bytes(skeleton), manifest.get("fp32_bytes")
    del skeleton
    if isinstance(want, int) and got != want:
        print(f"hwaware bench: error: {cls.__qualname__} built from {args.path}/manifest.json's hparams holds {got:,} bytes of "
              f"float weights, and the manifest says the exported FP32 model held {want:,}: not the exported architecture "
              "(an edited manifest, or a class changed since export); pass --model module:Class", file=sys.stderr)
        return 2, None
    if avail is not None and got > avail // 2:
        print(f"hwaware bench: error: the FP32 reference would take {got / 2**30:.1f} GiB, more than half the "
              f"{avail / 2**30:.1f} GiB of memory available", file=sys.stderr)
        return 2, None
    fp32 = build_recorded(cls, manifest, args.path)
    inputs = ([given] * args.batches if given is not None else
              [make_inputs(manifest["inputs"], args.batch_size, seed=i, structure=manifest.get("input_structure"))
               for i in range(args.batches)])
    outputs = {}
    for name, model in (("fp32", fp32), ("artifact", served)):
        try:  # generated from the recorded shapes: a model whose inputs are not one row per sample refuses them
            with torch.no_grad():
                outputs[name] = model.eval()(*inputs[0])
        except Exception as e:  # noqa: BLE001 (any refusal of the inputs: the message says what to do instead)
            if given is not None:
                print(f"hwaware bench: error: the {name} model refused the inputs in {args.inputs}: {type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}", file=sys.stderr)
                return 2, None
            print(f"hwaware bench: error: the {name} model refused the inputs bench generated from the recorded example "
                  f"shapes ({', '.join('x'.join(map(str, d['shape'])) for d in manifest['inputs'])}, with {args.batch_size} "
                  f"rows each): {type(e).__name__}: {' '.join(str(e).split())[:300]}. bench makes one row per sample per "
                  "input; for inputs that are not (e.g. EmbeddingBag ids + offsets), save one batch of your own and pass "
                  "--inputs FILE.safetensors (tensors '0', '1', ... in forward's order)", file=sys.stderr)
            return 2, None
    counted = ""
    if args.batch_size is None:  # --inputs: the samples a batch counts for, unless --batch-size says
        args.batch_size, counted = _samples_in(outputs["fp32"], given)
        counted = f" ({counted}; --batch-size N says otherwise)"
    print(f"batch size {args.batch_size}{counted}: {args.batches} batches x {args.rounds} rounds per model "
          f"({'the batch in ' + args.inputs if given is not None else 'generated inputs'})")
    result = compare_throughput({"fp32": fp32, "artifact": served}, inputs, batch_size=args.batch_size, rounds=args.rounds)
    result["artifact"] = args.path
    result["kernels"] = args.kernels
    if args.kernels == "measure":
        result["selection"] = served.hwaware_selection
        print("kernels re-timed on this CPU: " + ", ".join(f"{n} {r['recorded']}->{r['op_kernel']}"
                                                           for n, r in served.hwaware_selection.items()))
    for name, r in result["models"].items():
        rounds = f" (rounds x{r['ratio_min']:.2f}..x{r['ratio_max']:.2f})" if name != result["baseline"] and args.rounds > 1 else ""
        print(f"{name:10s} {r['samples_per_s']:>12,.0f} samples/s  x{r['ratio']:.2f}{rounds}  "
              f"p50 {r['latency_ms_p50']:.2f} ms  p90 {r['latency_ms_p90']:.2f} ms  p99 {r['latency_ms_p99']:.2f} ms")
    warning = instability_warning(result)
    if warning:
        print(warning)
    if not args.no_memory:
        from hwaware.export.memory import peak_memory

        # each model in its own fresh process: one process's RSS high-water mark would hold both
        mem: Dict[str, Any] = {}
        for name in ("fp32", "artifact"):
            try:
                mem[name] = peak_memory(args.path, name, args.batch_size, args.batches, kernels=args.kernels,
                                        model=args.model, inputs_file=args.inputs)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # the timing above still stands
                mem[name] = {"error": str(e)[-500:]}
        result["memory"] = {"method": "peak RSS over the imports, one fresh process per model (hwaware.export.memory)",
                            **mem}
        for name, m in mem.items():
            if m is None:
                print(f"{name:10s} peak memory: n/a (needs Linux /proc)")
            elif "error" in m:
                print(f"{name:10s} peak memory: n/a (the probe process failed: {m['error'].splitlines()[-1] if m['error'] else '?'})")
            else:
                print(f"{name:10s} peak memory {m['peak_mib']:.1f} MiB (load {m['load_peak_mib']:.1f} MiB, "
                      f"resident model {m['model_resident_mib']:.1f} MiB), over the process after its imports")
    return 0, result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hwaware", description="Inspect and benchmark hwaware artifacts.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ins = sub.add_parser("inspect", help="verify an artifact and print its layers, size and regression report")
    ins.add_argument("path", metavar="PATH", help="artifact directory")
    ins.add_argument("--json", action="store_true", help="print the verified manifest as JSON")
    ins.add_argument("--wide", action="store_true", help="every per-layer field of the manifest in the layer table")
    ins.set_defaults(func=_cmd_inspect)

    bench = sub.add_parser("bench", help="time an artifact against its FP32 architecture, side by side")
    bench.add_argument("path", metavar="PATH", help="artifact directory (exported with example_inputs)")
    bench.add_argument("--batch-size", type=int_at_least(1), default=None,
                       help="rows per batch (default 2048; with --inputs: the samples a batch counts for, default "
                            "the rows of the FP32 model's output on it)")
    bench.add_argument("--inputs", metavar="FILE", default=None,
                       help="time on this batch instead of generated ones: a safetensors file of tensors named '0', '1', "
                            "... (forward's positional inputs, e.g. ids and offsets); written with "
                            "safetensors.torch.save_file")
    bench.add_argument("--batches", type=int_at_least(1), default=8, help="batches per round (default 8)")
    bench.add_argument("--rounds", type=int_at_least(1), default=5, help="interleaved rounds (default 5)")
    bench.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                       help="also write the results as JSON to FILE; --json alone (or --json -): JSON on stdout, the "
                            "readable lines on stderr")
    bench.add_argument("--no-memory", action="store_true",
                       help="skip the peak-memory measurement (two child processes)")
    bench.add_argument("--kernels", choices=("recorded", "measure"), default="recorded",
                       help="recorded: the CPU kernels export timed fastest on its machine; measure: re-time them on "
                            "this CPU (among the implementations that passed the regression gate)")
    bench.add_argument("--model", metavar="MODULE:CLASS", default=None,
                       help="the model class to build, e.g. mypkg.models:CTR (default: the class recorded at export); "
                            "needed when it was defined in the exporting script (__main__). A class whose constructor "
                            "arguments the manifest does not record (a plain nn.Module) is named by a function of no "
                            "arguments that builds it as at export, e.g. mypkg.models:make_ctr. The module is imported "
                            "(its top-level code runs), searched from the current directory first")
    bench.set_defaults(func=_cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``hwaware`` command line; returns the exit status (0 ok, 2 refused artifact/usage)."""
    from hwaware.export.artifact import ArtifactError

    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ArtifactError as e:
        print(f"hwaware: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (hwaware inspect PATH | head): not an error to print
        try:  # the interpreter's final flush of stdout would raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a command its reader closed on


if __name__ == "__main__":
    sys.exit(main())
