"""Measured kernel choice: time every implementation on the layer's own shape, keep the fastest
that computes the layer's math, and record all of it in the manifest.

int8 layers (:class:`Int8Linear`): ``hwaware::int8_linear``'s CPU implementations, all on the same
int8 weight codes: ``int_mm`` (the exact per-token W8A8 math: hwaware's C pass on AMX tiles or VNNI,
else ``torch._int_mm``), ``fbgemm``
(fbgemm's per-tensor dynamic GEMM on per-token pre-scaled rows, ~42 dB from the exact math) and
``dequant`` (the codes dequantized once to fp32, activations not quantized: the same weights at
higher activation precision, fp32 speed). Which is fastest depends on the CPU (AMX/VNNI vs AVX2)
and the layer's size (the per-token passes cost more than a tiny fp32 GEMM), so the export times
all of them; the regression gate then runs the chosen one.

2:4 layers:

Candidates (DESIGN.md: the CPU path picks kernels by measurement and the artifact says what was
measured), for a layer with ``M`` input rows as seen in a real forward:

``dense``     the decompressed weight in FP32 through ``F.linear``
``int8``      the decompressed weight as int8 codes through the exact W8A8 path (``int_mm``)
``int8_fbgemm`` the same codes through fbgemm's W8A8 path
``int8_dequant`` the same codes dequantized once to fp32, F.linear (W8A32, as int8_linear's ``dequant``)
``2:4``       a kernel that multiplies only the kept entries (CPU: ``torch.sparse`` CSR)
``2:4+int8``  the same with int8 values (no CPU kernel exists; recorded as unavailable)

A layer with FP32 values keeps its math under ``dense`` and ``2:4``; one with int8 values (QAT
int8) under ``int8``, ``int8_fbgemm`` and ``int8_dequant`` (its codes, as an int8 layer's
implementations) — an int8 2:4 kernel would be one more.
"""
from __future__ import annotations

import platform
import time
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hwaware.ops  # noqa: F401
from hwaware.export.deploy import Int8Chain, Int8Linear, Sparse24Linear, _int_mm_run, run_call
from hwaware.ops import FBGEMM_MAX_K, INT8_KERNELS, _int8_dequantized, packing
from hwaware.ops.packing import INT8_MAX_K
from hwaware.quant import native

__all__ = ["capture_rows", "select_sparse24_kernels", "select_int8_kernels", "time_us", "cpu_profile", "lost_features",
           "isa_list", "SPARSE24_INT8_CANDIDATE", "SPARSE24_INT8_KERNEL"]

# The CPU features that decide which int8 implementation is fast: AMX-INT8 and VNNI (hwaware's int8
# pass, oneDNN's _int_mm, fbgemm's 512-bit kernels), AVX-512 and AVX2/FMA (everything's width).
# A kernel timed on a CPU with one of them can be many times slower on a CPU without it, and each
# implementation's speed depends on the CPU, which is why the export times them (see
# benchmarks/results/export_portability_cpu.json: runs with cpu "avx2" against "this_cpu", kernels.*.us).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")

# an int8 2:4 layer's candidate (selection's name) and op kernel (sparse24_linear's) that run each
# int8_linear implementation on its decompressed codes
SPARSE24_INT8_CANDIDATE = {"int_mm": "int8", "fbgemm": "int8_fbgemm", "dequant": "int8_dequant"}
SPARSE24_INT8_KERNEL = {"int_mm": "dense", "fbgemm": "fbgemm", "dequant": "dequant"}
# its reverse: the int8_linear implementation a sparse24_linear kernel name runs
SPARSE24_INT8_IMPL = {k: i for i, k in SPARSE24_INT8_KERNEL.items()}


def cpu_profile() -> Dict[str, Any]:
    """The CPU kernels are timed on, as the manifest records it (``selection_cpu``): its model name,
    which of the instruction sets that decide the int8 kernels' speed it has, whether hwaware's
    AMX pass is in use (the CPU and OS allow it, ``HWAWARE_NO_AMX`` is unset), and the engine of
    hwaware's int8 pass (``native.int8_engine``: ``"amx"``, ``"vnni"``, ``"vpmaddwd"`` or None)."""
    name, flags = "", None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not name and line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif flags is None and line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if name and flags is not None:
                    break
    except OSError:
        pass
    # isa None: this CPU's flags could not be read (not Linux, a sandbox hiding /proc/cpuinfo)
    return {"model": name or platform.processor() or platform.machine(),
            "isa": None if flags is None else [f for f in _ISA_FLAGS if f in flags], "amx_in_use": bool(native.amx_available()),
            "int8_engine": native.int8_engine()}


def _lost_engine(then: Dict[str, Any], now: Dict[str, Any]) -> Optional[str]:
    """The engine of hwaware's int8 pass ``then`` ran on that ``now`` runs a slower one than (in the
    order of ``native.ENGINES``: AMX, VNNI, VPMADDWD, then none), or None. Profiles from before the
    VNNI engine say only ``amx_in_use``: of those, only a lost AMX is known."""
    rank = {e: i for i, e in enumerate(native.ENGINES)}
    was = then.get("int8_engine", "amx" if then.get("amx_in_use") is True else None)
    if was not in rank:
        return None
    if "int8_engine" in now:
        engine = now["int8_engine"]
    elif now.get("amx_in_use"):
        engine = "amx"
    else:
        return was if was == "amx" else None
    return was if rank.get(engine, len(rank)) > rank[was] else None


def isa_list(profile: Any) -> Optional[List[str]]:
    """A :func:`cpu_profile`'s ``isa`` when it is a list of names, else None (unknown or malformed)."""
    isa = profile.get("isa") if isinstance(profile, dict) else None
    return isa if isinstance(isa, list) and all(isinstance(f, str) for f in isa) else None


def lost_features(measured_on: Dict[str, Any], here: Dict[str, Any], amx_matters: bool = True) -> List[str]:
    """What the CPU of ``measured_on`` (a :func:`cpu_profile`) had that ``here`` lacks: the
    instruction sets (none when either side's are unknown), and ``"hwaware AMX pass"`` /
    ``"hwaware VNNI pass"`` / ``"hwaware VPMADDWD pass"`` when the int8 pass ran on that engine there and runs on a slower one (or
    none) here (only when ``amx_matters``: some layer runs ``int_mm``)."""
    then, now = isa_list(measured_on), isa_list(here)
    lost = [f for f in then if f not in now] if then is not None and now is not None else []
    engine = _lost_engine(measured_on, here) if amx_matters else None
    if engine is not None:
        lost.append(f"hwaware {engine.upper()} pass")
    return lost

_INT8_NOTES = {
    "int_mm": ("exact per-token W8A8, bit-identical to int8_linear_ref (one C pass on AMX tiles or VNNI where the "
               "CPU has them, else torch._int_mm)"),
    "fbgemm": "fbgemm dynamic linear on per-token pre-scaled rows (per-tensor uint8 inside; ~42 dB from exact)",
    "dequant": "int8 codes dequantized once to an fp32 weight, F.linear on unquantized activations "
               "(W8A32: higher precision than W8A8; an fp32 copy of the weight in memory)",
}
# rows to time a layer at when no forward pass sized it (export without val data or example inputs)
NOMINAL_ROWS = 256

_NO_INT8_24_CPU = "no CPU kernel multiplies int8 2:4 values (fbgemm and torch have none)"


def time_us(fn: Callable[[], Any], budget_s: float = 0.05, min_runs: int = 5, warmup: int = 2,
            give_up_us: Optional[float] = None) -> float:
    """Fastest wall time of ``fn()`` in microseconds (runs until ``budget_s`` or ``min_runs``).

    The minimum, not the median: on a machine busy with other work (another process, a second
    OpenMP thread descheduled for a scheduler tick) most runs of a multi-threaded kernel can take
    milliseconds longer than the kernel does, which chose a much slower implementation here under
    load; interference only ever adds time, so the fastest run is the kernel's own cost.

    With ``give_up_us``, a candidate whose first two runs are both slower than that returns the
    faster of them: a candidate 20x slower than the best so far cannot win, and timing it 7 times
    can take seconds on a big layer (two, so that one run delayed by the scheduler is not enough).
    """
    fn()  # the first call builds caches (decompressed / prepacked weights): never timed

    def once() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    times = []
    if give_up_us is not None:
        times.append(once())
        if times[-1] * 1e6 > give_up_us:
            times.append(once())
            if times[-1] * 1e6 > give_up_us:  # both over the limit
                return min(times) * 1e6
    for _ in range(warmup - 1 - len(times)):
        fn()
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget_s:
        times.append(once())
        if len(times) >= 200:
            break
    return min(times) * 1e6


#: ``_timed`` gives up on a candidate only when its first two runs each take longer than this too:
#: on a busy machine a multi-threaded kernel of ~100 us can wait a few scheduler ticks (ms each) at
#: an OpenMP barrier in both runs, and giving up on it then chose a 10x slower implementation; the
#: give-up is for candidates whose full timing would cost seconds.
GIVE_UP_FLOOR_US = 50_000.0


def _timed(fn: Callable[[], Any], note: str, measured: Dict[str, Any]) -> Dict[str, Any]:
    """``{"available", "us", "note"}`` for one candidate; two runs only when both are over 20x the
    fastest candidate in ``measured`` so far (it cannot win) and over ``GIVE_UP_FLOOR_US``."""
    best = min((e["us"] for e in measured.values() if "us" in e), default=None)
    limit = None if best is None else max(20 * best, GIVE_UP_FLOOR_US)
    us = time_us(fn, give_up_us=limit)
    if limit is not None and us > limit:
        note += f" (timed twice: both runs over 20x the fastest so far and over {GIVE_UP_FLOOR_US / 1e3:.0f} ms)"
    return {"available": True, "us": round(us, 2), "note": note}


#: ``_second_look`` times a candidate again when its first timing was over this many times the fastest's
SECOND_LOOK_RATIO = 3.0


def _second_look(measured: Dict[str, Any], fns: Dict[str, Callable[[], Any]]) -> None:
    """Time again each candidate of ``measured`` (timed by :func:`_timed`; ``fns``: their calls) whose
    time is over :data:`SECOND_LOOK_RATIO` times the fastest's, and keep its faster timing. On a busy
    machine every run of a candidate's timing budget can wait at an OpenMP barrier: in a user trial a
    ~13 us kernel was timed at 293 us (and another at 11 975 us), so two exports of the same weights
    chose differently and served different numbers. Candidates given up on as too slow (timed twice)
    are not timed again."""
    timed = {c: e["us"] for c, e in measured.items() if e.get("available") and e.get("keeps_math", True) and "us" in e}
    if len(timed) < 2:  # (only candidates that may be chosen: a 2:4 kernel that changes the math never is)
        return
    best = min(timed.values())
    for c, us in timed.items():
        entry = measured[c]
        if us <= SECOND_LOOK_RATIO * best or c not in fns or "timed twice" in entry.get("note", ""):
            continue
        # two runs both over the ratio again: it is that slow (a second full budget for each slow candidate of
        # every layer would cost seconds on a big model)
        again = time_us(fns[c], give_up_us=SECOND_LOOK_RATIO * best)
        if again < us:
            entry["us"] = round(again, 2)
            entry["note"] = entry.get("note", "") + f" (timed again: {us:.2f} us on a first look, over {SECOND_LOOK_RATIO:g}x the fastest)"


def capture_rows(model: nn.Module, run: Callable[[], Any]) -> Dict[str, int]:
    """``{name: rows of the input}`` for every :class:`Sparse24Linear` and :class:`Int8Linear`, from
    one call of ``run``."""
    rows: Dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (Sparse24Linear, Int8Linear)):
            def hook(mod, args, kwargs, name=name):
                x = args[0] if args else next(iter(kwargs.values()))  # F.linear's input, by position or keyword
                rows[name] = max(rows.get(name, 0), x.numel() // x.shape[-1])  # called twice: the larger
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return rows


def _candidates(layer: Sparse24Linear) -> Dict[str, Tuple[Optional[Callable[[Tensor], Tensor]], bool, Optional[str], str]]:
    """name -> (fn(x) or None, keeps the layer's math, op kernel name when chosen, note)."""
    op = torch.ops.hwaware.sparse24_linear
    values, meta, bias = layer.values, layer.metadata, layer.bias
    k = layer.in_features
    if layer.values.dtype == torch.int8:
        vq, sq = values, layer.w_scale
        vf = (values.float() * layer.w_scale[:, None]).contiguous()  # the dequantized values
    else:
        vf = values
        q, sq = packing.quantize_int8_weight(packing.decompress_24(values, meta, k))
        vq, mq = packing.compress_24(q)
    int8_meta = meta if layer.values.dtype == torch.int8 else mq
    is_int8 = layer.values.dtype == torch.int8
    return {
        "dense": (lambda x: op(x, vf, meta, None, bias, "dense"), not is_int8, "dense",
                  "decompressed once to an FP32 weight, F.linear"),
        "int8": (lambda x: op(x, vq, int8_meta, sq, bias, "dense"), is_int8, "dense",
                 "decompressed once to int8 codes, exact W8A8 (int8_linear's int_mm path)"),
        "int8_fbgemm": (lambda x: op(x, vq, int8_meta, sq, bias, "fbgemm"), is_int8, "fbgemm",
                        "decompressed once to int8 codes, W8A8 through fbgemm (per-tensor inside)"),
        "int8_dequant": (lambda x: op(x, vq, int8_meta, sq, bias, "dequant"), is_int8, "dequant",
                         "decompressed once to int8 codes, dequantized to fp32, F.linear on unquantized "
                         "activations (W8A32; an fp32 copy of the weight in memory)"),
        "2:4": (lambda x: op(x, vf, meta, None, bias, "csr"), not is_int8, "csr",
                "torch.sparse CSR over the kept entries"),
        "2:4+int8": (None, is_int8, None, _NO_INT8_24_CPU),
    }


WEIGHT_ONLY_WHY = ("weight-only layer (activation None: QAT trained it so, or post-training layer_specs asked it): it "
                   "runs dequant, the int8 implementation that keeps its input float; the others quantize its input "
                   "(not timed)")


def wide_k_why(k: int) -> str:
    """Why an int8 layer of ``k`` inputs is pinned to ``dequant``."""
    return (f"K={k} inputs: more int8 products than fbgemm's int32 sums hold exactly (K <= {FBGEMM_MAX_K}), near "
            f"int_mm's limit ({INT8_MAX_K}): it runs dequant (float32 on the dequantized weight, the input unquantized)")


def weight_only_record(layer: nn.Module, device: str) -> Dict[str, Any]:
    """The selection record of a layer pinned to ``dequant`` (``serve_weight_only``): nothing timed."""
    kernel = layer.kernels.get(device, "dequant")
    why = wide_k_why(layer.in_features) if layer.in_features > FBGEMM_MAX_K else WEIGHT_ONLY_WHY
    return {"chosen": "dequant", "op_kernel": kernel, "weight_only": True, "why": why}


def select_sparse24_kernels(model: nn.Module, rows: Dict[str, int], device: str = "cpu",
                            allowed: Optional[Collection[str]] = None, only: Optional[Collection[str]] = None
                            ) -> Dict[str, Dict[str, Any]]:
    """Measure, choose and set ``layer.kernels[device]`` for every :class:`Sparse24Linear` (those
    named in ``only``, when given).

    Returns ``{name: selection record}`` for the manifest. Layers missing from ``rows`` (no input
    to size them) run ``dense`` and say so. ``allowed``: the ``int8_linear`` implementations an
    int8 layer may run (:data:`SPARSE24_INT8_CANDIDATE`); the others are recorded as not allowed.
    """
    records: Dict[str, Dict[str, Any]] = {}
    barred = set() if allowed is None else {c for impl, c in SPARSE24_INT8_CANDIDATE.items() if impl not in allowed}
    for name, layer in model.named_modules():
        if not isinstance(layer, Sparse24Linear) or (only is not None and name not in only):
            continue
        if layer.weight_only:
            records[name] = weight_only_record(layer, device)
            continue
        cands = _candidates(layer)
        if name not in rows:
            kernel, why = "dense", "not measured: export got neither val_dataloader nor example_inputs to size the layer"
            if layer.values.dtype == torch.int8 and allowed is not None and "int_mm" not in allowed:
                impl = next(i for i in INT8_KERNELS[device] if i in allowed)  # int_mm ("dense") failed its gate
                kernel, why = SPARSE24_INT8_KERNEL[impl], why + f"; runs {impl}, an implementation that passed the gate"
            layer.kernels[device] = kernel
            records[name] = {"chosen": "int8" if layer.values.dtype == torch.int8 else "dense", "op_kernel": kernel, "why": why}
            continue
        m = rows[name]
        x = torch.randn(m, layer.in_features, generator=torch.Generator().manual_seed(0))
        measured: Dict[str, Any] = {}
        with torch.no_grad():
            for cname, (fn, keeps, kernel, note) in cands.items():
                entry: Dict[str, Any] = {"keeps_math": keeps, "note": note}
                if fn is None:
                    entry["available"] = False
                elif cname in barred:
                    entry.update(available=False, note=note + " (not allowed: its regression gate did not pass, or export's int8_impls left it out)")
                else:
                    entry.update(_timed(lambda: fn(x), note, measured))
                measured[cname] = entry
            _second_look(measured, {c: (lambda fn=fn: fn(x)) for c, (fn, *_rest) in cands.items() if fn is not None})
        eligible = {c: e["us"] for c, e in measured.items() if e["available"] and e["keeps_math"]}
        chosen = min(eligible, key=eligible.get)
        layer.kernels[device] = cands[chosen][2]
        fastest = min((e["us"], c) for c, e in measured.items() if e["available"])
        sparse_name = "2:4+int8" if layer.values.dtype == torch.int8 else "2:4"
        sp = measured[sparse_name]
        if chosen == sparse_name:
            why = f"{sparse_name} is the fastest kernel that keeps the layer's math"
        elif sp["available"]:
            why = (f"{sparse_name} measured {sp['us'] / eligible[chosen]:.2f}x the time of {chosen} at M={m}: no 2:4 kernel "
                   f"beats dense on {device}; the artifact keeps the compressed form (fewer bytes) and runs {chosen}")
        else:
            why = f"{sparse_name}: {sp['note']}; the artifact keeps the compressed form (fewer bytes) and runs {chosen}"
        records[name] = {"input_shape": [m, layer.in_features], "measured": measured, "chosen": chosen,
                         "op_kernel": cands[chosen][2], "fastest_any": fastest[1], "why": why}
    return records


def select_int8_kernels(model: nn.Module, rows: Dict[str, int], device: str = "cpu",
                        allowed: Optional[Collection[str]] = None, only: Optional[Collection[str]] = None,
                        fp32_reference: bool = True) -> Dict[str, Dict[str, Any]]:
    """Time every ``INT8_KERNELS[device]`` implementation (those in ``allowed``, when given) on each
    :class:`Int8Linear`'s input shape (those named in ``only``, when given), set
    ``layer.kernels[device]`` to the fastest and return ``{name: selection record}``. With
    ``fp32_reference`` (export's; a load re-timing kernels needs none), each record also gets
    ``fp32_us``: the layer's FP32 ``F.linear`` there.

    A layer missing from ``rows`` is timed at :data:`NOMINAL_ROWS` rows, and its record says so.
    """
    op = torch.ops.hwaware.int8_linear
    impls = [i for i in INT8_KERNELS[device] if allowed is None or i in allowed]
    barred = [i for i in INT8_KERNELS[device] if i not in impls]
    if not impls:
        raise ValueError(f"allowed={sorted(allowed or ())!r} leaves no int8_linear implementation; expected some of "
                         f"{INT8_KERNELS[device]}")
    records: Dict[str, Dict[str, Any]] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, Int8Linear) or (only is not None and name not in only):
            continue
        if layer.weight_only:
            records[name] = weight_only_record(layer, device)
            continue
        m = rows.get(name, NOMINAL_ROWS)
        x = torch.randn(m, layer.in_features, generator=torch.Generator().manual_seed(0))
        measured: Dict[str, Any] = {}
        with torch.no_grad():
            calls = {impl: (lambda impl=impl: op(x, layer.qweight, layer.w_scale, layer.bias, impl, layer.relu)) for impl in impls}
            for impl in impls:
                measured[impl] = {"keeps_math": True, **_timed(calls[impl], _INT8_NOTES.get(impl, impl), measured)}
            _second_look(measured, calls)
        chosen = min(measured, key=lambda c: measured[c]["us"])
        layer.kernels[device] = chosen
        fp32_us = None
        if fp32_reference:
            # what the layer cost as the FP32 model ran it: a small layer's int8 op (its per-call overhead)
            # can take longer than its F.linear did, and export says so (manifest int8_vs_fp32)
            w32 = _int8_dequantized(layer.qweight, layer.w_scale)  # (dequant's cached fp32 weight)
            with torch.no_grad():
                fp32_us = round(time_us(lambda: F.linear(x, w32, layer.bias), budget_s=0.02), 2)
        others = ", ".join(f"{c} {measured[c]['us'] / measured[chosen]['us']:.2f}x its time"
                           for c in measured if c != chosen)
        for impl in barred:
            measured[impl] = {"keeps_math": True, "available": False,
                              "note": _INT8_NOTES.get(impl, impl) + " (not allowed: its regression gate did not pass, or export's int8_impls left it out)"}
        why = f"fastest at M={m}" + (f" ({others})" if others else "")
        if name not in rows:
            why += (f"; M={m} is nominal: " + ("the model's forward on the batch that sized the layers did not call this "
                                               "one (a layer only training uses?)" if rows else
                                               "export got neither val_dataloader nor example_inputs to size the layer"))
        records[name] = {"input_shape": [m, layer.in_features], "measured": measured, "chosen": chosen,
                         "op_kernel": chosen, "why": why, **({"fp32_us": fp32_us} if fp32_us is not None else {})}
    return records


def _int_mm_choice(layer: nn.Module) -> Tuple[str, str]:
    """The selection record's ``chosen`` name and the layer's CPU kernel for int_mm: an
    :class:`Int8Linear`'s ``int_mm``; an int8 :class:`Sparse24Linear`'s candidate ``int8`` (kernel
    ``dense``: int_mm on the decompressed codes)."""
    if isinstance(layer, Sparse24Linear):
        return SPARSE24_INT8_CANDIDATE["int_mm"], SPARSE24_INT8_KERNEL["int_mm"]
    return "int_mm", "int_mm"


def select_int8_chains(model: nn.Module, records: Dict[str, Dict[str, Any]], device: str = "cpu",
                       allowed: Optional[Collection[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Second pass over the per-layer ``records`` of :func:`select_int8_kernels` (and of
    :func:`select_sparse24_kernels` for the int8 2:4 layers): a run of int8 layers in an
    ``nn.Sequential`` that would be one ``hwaware::int8_mlp`` call (``int8_mlp24`` with 2:4 layers
    in it) if every layer ran ``int_mm`` (``deploy.chain_int8``) is timed as that call, against the
    sum of its layers' chosen times. Timed one by one, each ``int_mm`` layer pays for quantizing its
    float input and writing its float output, which the chain does not (its epilogues write the next
    layer's codes), so a per-layer choice can miss the faster whole. When the chain is faster, every
    layer of the run switches to ``int_mm``. Each timed run's layers get ``records[name]["chain"]``
    (the run, both times, the outcome). Returns ``records``."""
    if device != "cpu" or "int_mm" not in INT8_KERNELS[device] or (allowed is not None and "int_mm" not in allowed):
        return records
    for seq_name, seq in model.named_modules():
        if type(seq) not in (nn.Sequential, Int8Chain):
            continue
        names, mods = list(seq._modules), list(seq._modules.values())
        prefix = f"{seq_name}." if seq_name else ""
        i = 0
        while i < len(mods):
            run, relus, end = _int_mm_run(mods, i, any_impl=True)
            if len(run) < 2:
                i += 1
                continue
            i = end
            layer_names = [prefix + names[j] for j in run]
            if not all("measured" in records.get(n, {}) for n in layer_names):
                continue
            layers = [mods[j] for j in run]
            int_mm = [_int_mm_choice(layer) for layer in layers]  # (record name, kernel) per layer
            chosen = [records[n]["chosen"] for n in layer_names]
            already = all(c == i8 for c, (i8, _) in zip(chosen, int_mm))
            per_layer = sum(records[n]["measured"][c]["us"] for n, c in zip(layer_names, chosen))
            m = records[layer_names[0]]["input_shape"][0]
            x = torch.randn(m, layers[0].in_features, generator=torch.Generator().manual_seed(0))
            op, args = run_call(layers, relus)
            op_name = op._schema.name.split("::")[1]
            with torch.no_grad():
                us = time_us(lambda: op(x, *args))
            faster = us < per_layer and not already
            info = {"layers": layer_names, "op": f"hwaware::{op_name}", "int8_mlp_us": round(us, 2),
                    "per_layer_choices": dict(zip(layer_names, chosen)), "per_layer_us": round(per_layer, 2),
                    "chosen": "int8_mlp" if faster or already else "per_layer"}
            for name, layer, (i8, kernel) in zip(layer_names, layers, int_mm):
                rec = records[name]
                rec["chain"] = info
                if faster and rec["chosen"] != i8:
                    layer.kernels[device] = kernel
                    rec["why"] = (f"int_mm as one {op_name} call with {', '.join(n for n in layer_names if n != name)}: "
                                  f"{us:.0f} us for the run at M={m}, against {per_layer:.0f} us for the per-layer "
                                  f"choices ({rec['chosen']} here: {rec['why']})")
                    rec["chosen"], rec["op_kernel"] = i8, kernel
    return records
