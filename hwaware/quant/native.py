"""Native (C) row-wise passes: one call per tensor instead of ~10 eager ops.

A CTR model's QAT step runs row-wise fake quant once per embedding table and twice per Linear;
in eager torch each call is ~10 small ops, whose per-op overhead on small table slices made QAT
steps markedly slower than FP32 ones. ``_native/rowwise_fq.c`` does the same arithmetic in one
pass pair per row, bit-identical to the eager path (tests hold it to atol=0).

``_native/w8a8.c`` holds the two float passes of the W8A8 ``int_mm`` kernel (hwaware/ops):
per-token int8 quantization and the int32 -> float epilogue, bit-identical to the references; and,
the whole kernel (``hw_int8_mlp``): the same passes around an exact int8 product, a block of rows at
a time through every layer of an int8 MLP, the same bits, on the best engine the CPU has: AMX tiles
(AMX-INT8, where the OS allows it), VPDPBUSD (AVX-512 VNNI or AVX-VNNI), or VPMADDWD on int16 codes
(AVX2, AVX-512BW: the CPUs without VNNI). ``HWAWARE_NO_AMX=1``, ``HWAWARE_NO_VNNI=1`` and
``HWAWARE_NO_VPMADDWD=1`` turn them off.
``_native/bags.c`` bounds-checks embedding-bag calls; ``_native/interact.c`` is DLRM's dot
interaction (``hwaware::dot_interaction``) forward and backward.

The C files are compiled on first use with the system C compiler (gcc/cc; no torch headers needed)
into ``$HWAWARE_CACHE`` (default ``~/.cache/hwaware``), keyed by source, flags and CPU, and loaded
with ctypes. Without a compiler, or with ``HWAWARE_NO_NATIVE=1``, everything runs on the eager
path and :func:`native_status` says why. ``HWAWARE_NATIVE_ARCH`` (e.g. ``x86-64-v3``: AVX2 and FMA,
no AVX-512) builds for that ``-march`` instead of ``native``: how the tests run the C paths of CPUs
without AVX-512 on one that has it, and how a deployment builds for the oldest CPU of its fleet.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
from array import array
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["native_status", "fq_sym_rows", "fq_affine_rows", "quant_tokens_i8", "w8a8_epilogue", "w8a8_epilogue_quant", "check_bags", "rowwise_bags",
           "dot_interaction", "dot_interaction_backward", "dot_interaction_int8", "bags_interaction", "amx_available", "vnni_available", "vpmaddwd_available", "ENGINES", "engines_available", "int8_engine", "only_engines", "int8_pack", "int8_mlp"]

_SRCS = [Path(__file__).parent / "_native" / n for n in ("rowwise_fq.c", "w8a8.c", "bags.c", "interact.c")]
_HEADERS = [Path(__file__).parent / "_native" / n for n in ("rows.h", "tables.h")]  # included by the sources: part of the build key
# -ffp-contract=off: no fused multiply-add, so results equal torch's separate mul and add.
# -fopenmp: the `omp simd` loops vectorize and the W8A8 passes split rows over threads. libgomp is
# linked by soname, and torch's wheel has already loaded its own libgomp.so.1 by then, so the
# library runs on torch's OpenMP pool (one runtime, torch.set_num_threads applies). A compiler
# without OpenMP support builds with -fopenmp-simd instead: vectorized, single-threaded.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_ARCH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _flags() -> List[str]:
    """The compile flags, ``-march`` from ``HWAWARE_NATIVE_ARCH`` when it is set."""
    arch = os.environ.get("HWAWARE_NATIVE_ARCH")
    if not arch:
        return list(_FLAGS)
    if not set(arch.lower()) <= _ARCH_CHARS:
        raise ValueError(f"HWAWARE_NATIVE_ARCH={arch!r}: expected a -march name such as 'x86-64-v3' or 'skylake-avx512'")
    return [f"-march={arch}" if f == "-march=native" else f for f in _FLAGS]


_OPENMP_FLAGS = (["-fopenmp"], ["-fopenmp-simd"])  # tried in this order
_lib: Optional[ctypes.CDLL] = None
_status = "not loaded yet"
_tried = False  # set (under _LOAD_LOCK) only once _lib and _status hold the load's outcome
# Held through the first load (a compile can take seconds): a thread calling in meanwhile waits for
# it rather than seeing no library, and caching "no engine" from that for the life of the process.
_LOAD_LOCK = threading.Lock()


def _new_lock_in_child() -> None:  # a process forked mid-build (a DataLoader worker) would wait forever on the copy
    global _LOAD_LOCK
    _LOAD_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)

_amx: Optional[bool] = None
_vnni: Optional[bool] = None
_madd: Optional[bool] = None


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.system() + flags


def _build(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        for i, omp in enumerate(_OPENMP_FLAGS):
            try:
                subprocess.run([cc, *_flags(), *omp, "-o", tmp, *map(str, _SRCS)], check=True, capture_output=True,
                               text=True, timeout=120)
                break
            except subprocess.CalledProcessError:
                if i == len(_OPENMP_FLAGS) - 1:
                    raise
        os.replace(tmp, target)  # atomic: concurrent builders (DDP ranks) never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _status, _tried
    if _tried:  # the outcome is final once _tried is set: no lock on the per-call path
        return _lib
    if not os.environ.get("HWAWARE_NO_NATIVE"):
        _flags()  # a bad HWAWARE_NATIVE_ARCH raises its ValueError on every call, not once then silently eager
    with _LOAD_LOCK:
        if not _tried:
            _lib, _status = _open()
            _tried = True
    return _lib


def _open() -> Tuple[Optional[ctypes.CDLL], str]:
    """Build (when not cached) and load the library: ``(lib, status)``, lib None when unavailable."""
    if os.environ.get("HWAWARE_NO_NATIVE"):
        return None, "disabled by HWAWARE_NO_NATIVE"
    try:
        key = hashlib.sha256(b"".join(p.read_bytes() for p in _SRCS + _HEADERS) + repr((_flags(), _OPENMP_FLAGS)).encode()
                             + _cpu_fingerprint().encode()).hexdigest()[:16]
        target = Path(os.environ.get("HWAWARE_CACHE", Path.home() / ".cache" / "hwaware")) / f"native-{key}.so"
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
        f32p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.hw_fq_sym_rows.argtypes = [f32p, f32p, f32p, i64, i64, i32, i32]
        lib.hw_fq_affine_rows.argtypes = [f32p, f32p, f32p, f32p, i64, i64, i32, i32]
        lib.hw_quant_tokens_i8.argtypes = [f32p, i64, i64, f32p, f32p]
        lib.hw_w8a8_epilogue.argtypes = [f32p, i64, i64, f32p, f32p, f32p, i32, f32p]
        for fn in (lib.hw_fq_sym_rows, lib.hw_fq_affine_rows, lib.hw_quant_tokens_i8, lib.hw_w8a8_epilogue):
            fn.restype = None
        lib.hw_w8a8_epilogue_quant.argtypes = [f32p, i64, i64, f32p, f32p, f32p, i32, f32p, f32p]
        lib.hw_w8a8_epilogue_quant.restype = i32
        lib.hw_check_bags.argtypes = [f32p, i64, f32p, i64, i32, i64, i32, f32p]
        lib.hw_check_bags.restype = i32
        lib.hw_rowwise_bags.argtypes = [f32p, f32p, i64, i64, f32p, i32, i64, i64, i64, f32p, i64, i32, f32p, f32p]
        lib.hw_rowwise_bags.restype = i32
        lib.hw_dot_interaction_fwd.argtypes = [f32p, i64, i64, i64, i64, f32p]
        lib.hw_dot_interaction_bwd.argtypes = [f32p, f32p, i64, i64, i64, i64, f32p]
        lib.hw_dot_interaction_fwd.restype = lib.hw_dot_interaction_bwd.restype = i32
        lib.hw_amx_available.argtypes = []
        lib.hw_amx_available.restype = i32
        lib.hw_vnni_lanes.argtypes = []
        lib.hw_vnni_lanes.restype = i32
        lib.hw_madd_lanes.argtypes = []
        lib.hw_madd_lanes.restype = i32
        lib.hw_int8_pack_bytes.argtypes = [i64, i64]
        lib.hw_int8_pack_bytes.restype = i64
        lib.hw_int8_pack.argtypes = [f32p, i64, i64, f32p]
        lib.hw_int8_pack.restype = None
        lib.hw_int8_mlp.argtypes = [i32, f32p, f32p, f32p, i64, i32, f32p, f32p, f32p, f32p, f32p, f32p]
        lib.hw_dot_interaction_fwd_q.argtypes = [f32p, i64, i64, i64, i64, f32p, f32p]
        lib.hw_dot_interaction_fwd_q.restype = i32
        lib.hw_bags_interaction_fwd_q.argtypes = [f32p, f32p, f32p, i64, i64, f32p, i32, i64, i64, i64, i64, f32p, f32p, f32p]
        lib.hw_bags_interaction_fwd_q.restype = i32
        lib.hw_bags_interaction_fwd.argtypes = [f32p, f32p, f32p, i64, i64, f32p, i32, i64, i64, i64, i64, f32p, f32p]
        lib.hw_bags_interaction_fwd.restype = i32
        lib.hw_int8_mlp.restype = i32
        return lib, f"loaded {target}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        return None, f"unavailable ({type(e).__name__}: {e} {detail[-300:]}); using the eager path"


def native_status() -> str:
    """Whether the native kernel is in use, and if not, why."""
    _load()
    return _status


def _usable(x2d: Tensor) -> bool:
    # Not while torch.compile traces: a C call on data pointers is opaque to dynamo, and the
    # straight-through _Identity wrapped around its result lost the gradient to the weights
    # (QAT under torch.compile trained nothing but biases). The eager ops are traced instead.
    return (x2d.dtype == torch.float32 and x2d.device.type == "cpu" and x2d.is_contiguous() and x2d.numel() > 0
            and not torch.compiler.is_compiling() and _load() is not None)


def fq_sym_rows(x2d: Tensor, qmax: int, fp16_scale: bool) -> Optional[Tuple[Tensor, Tensor]]:
    """``(y, scale [rows])`` for narrow-range symmetric per-row fake quant, or None (use eager)."""
    if not _usable(x2d):
        return None
    x2d = x2d.detach()
    y = torch.empty_like(x2d)
    scale = torch.empty(x2d.shape[0], dtype=torch.float32)
    _lib.hw_fq_sym_rows(x2d.data_ptr(), y.data_ptr(), scale.data_ptr(), x2d.shape[0], x2d.shape[1], qmax, int(fp16_scale))
    return y, scale


def fq_affine_rows(x2d: Tensor, qmax: int, fp16: bool) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """``(y, scale [rows], offset [rows])`` for FBGEMM row-wise fake quant, or None (use eager)."""
    if not _usable(x2d):
        return None
    x2d = x2d.detach()
    y = torch.empty_like(x2d)
    scale = torch.empty(x2d.shape[0], dtype=torch.float32)
    offset = torch.empty(x2d.shape[0], dtype=torch.float32)
    _lib.hw_fq_affine_rows(x2d.data_ptr(), y.data_ptr(), scale.data_ptr(), offset.data_ptr(), x2d.shape[0], x2d.shape[1], qmax, int(fp16))
    return y, scale, offset


def quant_tokens_i8(x2d: Tensor, out: Optional[Tensor] = None) -> Optional[Tuple[Tensor, Tensor]]:
    """``(q int8 [M, K], scale float32 [M])``, equal to ``quantize_per_token_ref(x2d)``; None: use eager.
    ``out``: a contiguous int8 ``[M, K]`` tensor to write the codes into."""
    if not _usable(x2d):
        return None
    if out is not None and (out.shape != x2d.shape or out.dtype != torch.int8 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous int8 tensor of shape {list(x2d.shape)}, got {out.dtype} {list(out.shape)}")
    q = torch.empty(x2d.shape, dtype=torch.int8) if out is None else out
    scale = torch.empty(x2d.shape[0], dtype=torch.float32)
    _lib.hw_quant_tokens_i8(x2d.data_ptr(), x2d.shape[0], x2d.shape[1], q.data_ptr(), scale.data_ptr())
    return q, scale


def w8a8_epilogue(acc: Tensor, sx: Tensor, sw: Tensor, bias: Optional[Tensor], relu: bool = False,
                  out: Optional[Tensor] = None) -> Optional[Tensor]:
    """float32 ``acc * sx[:, None] * sw[None, :] + bias`` computed in float64 (as ``int8_linear_ref``),
    then ``torch.relu`` when ``relu``; ``acc`` int32 [M, N] contiguous, the rest contiguous float32.
    ``out``: a contiguous float32 ``[M, N]`` tensor to write into. None: use eager."""
    if acc.numel() == 0 or not acc.is_contiguous() or _load() is None:
        return None
    if out is not None and (out.shape != acc.shape or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {list(acc.shape)}, got {out.dtype} {list(out.shape)}")
    out = torch.empty(acc.shape, dtype=torch.float32) if out is None else out
    _lib.hw_w8a8_epilogue(acc.data_ptr(), acc.shape[0], acc.shape[1], sx.data_ptr(), sw.data_ptr(),
                          None if bias is None else bias.data_ptr(), int(relu), out.data_ptr())
    return out


def w8a8_epilogue_quant(acc: Tensor, sx: Tensor, sw: Tensor, bias: Optional[Tensor], relu: bool,
                        out: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """:func:`quant_tokens_i8` of :func:`w8a8_epilogue`'s output, bit for bit, in one pass that never
    writes that float output: ``(q int8 [M, N] (= out), scale float32 [M])``. ``out``: a contiguous
    int8 ``[M, N]`` tensor for the codes. None: use the two passes."""
    if acc.numel() == 0 or not acc.is_contiguous() or _load() is None:
        return None
    if out.shape != acc.shape or out.dtype != torch.int8 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int8 tensor of shape {list(acc.shape)}, got {out.dtype} {list(out.shape)}")
    scale = torch.empty(acc.shape[0], dtype=torch.float32)
    if _lib.hw_w8a8_epilogue_quant(acc.data_ptr(), acc.shape[0], acc.shape[1], sx.data_ptr(), sw.data_ptr(),
                                   None if bias is None else bias.data_ptr(), int(relu), out.data_ptr(),
                                   scale.data_ptr()) != 0:
        raise MemoryError(f"w8a8_epilogue_quant: no memory for a row buffer of {acc.shape[1]} floats")
    return out, scale


def amx_available() -> bool:
    """Whether :func:`int8_mlp` runs on AMX tiles here: the library was built with AMX support, and
    the CPU and OS have AMX-INT8 (``HWAWARE_NO_AMX=1`` says no, for comparisons)."""
    global _amx
    if _amx is None:
        _amx = _load() is not None and not os.environ.get("HWAWARE_NO_AMX") and bool(_lib.hw_amx_available())
    return _amx


def vnni_available() -> bool:
    """Whether :func:`int8_mlp` can run on VNNI here: the library was built for a CPU with AVX-512
    VNNI or AVX-VNNI (``HWAWARE_NO_VNNI=1`` says no, for comparisons)."""
    global _vnni
    if _vnni is None:
        _vnni = _load() is not None and not os.environ.get("HWAWARE_NO_VNNI") and _lib.hw_vnni_lanes() > 0
    return _vnni


def vpmaddwd_available() -> bool:
    """Whether :func:`int8_mlp` can run on VPMADDWD here: the library was built for a CPU with AVX2
    or AVX-512BW (``HWAWARE_NO_VPMADDWD=1`` says no, for comparisons)."""
    global _madd
    if _madd is None:
        _madd = _load() is not None and not os.environ.get("HWAWARE_NO_VPMADDWD") and _lib.hw_madd_lanes() > 0
    return _madd


# fastest first: what int8_engine picks, and how selection ranks a serving CPU against the export's
ENGINES = ("amx", "vnni", "vpmaddwd")


def engines_available() -> dict:
    """``{engine: whether int8_mlp may run on it here}`` for every engine of :data:`ENGINES`."""
    return dict(zip(ENGINES, (amx_available(), vnni_available(), vpmaddwd_available())))


def int8_engine() -> Optional[str]:
    """The engine :func:`int8_mlp` runs on here, the first this CPU has of :data:`ENGINES`:
    ``"amx"``, ``"vnni"``, ``"vpmaddwd"`` (AVX2 or AVX-512 without VNNI); None: no native pass
    (the ``torch._int_mm`` passes)."""
    return next((e for e, have in engines_available().items() if have), None)


_ENGINES = {e: i + 1 for i, e in enumerate(ENGINES)}  # w8a8.c's ENGINE_AMX = 1, ENGINE_VNNI = 2, ENGINE_MADD = 3


@contextlib.contextmanager
def only_engines(*names: str) -> Iterator[None]:
    """Inside the block, :func:`int8_mlp` may run only on the named engines (those of :data:`ENGINES`
    this CPU has); none named: the ``torch._int_mm`` passes. The output bits do not change, only the
    speed: for benchmarks and tests comparing engines in one process (process-wide, not per thread)."""
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise ValueError(f"only_engines: unknown engine(s) {unknown}; expected names from {ENGINES}")
    global _amx, _vnni, _madd
    saved = tuple(engines_available().values())  # resolved, so restoring them is exact
    _amx, _vnni, _madd = (have and name in names for have, name in zip(saved, ENGINES))
    try:
        yield
    finally:
        _amx, _vnni, _madd = saved


def int8_pack(qweight: Tensor) -> Tensor:
    """``qweight`` int8 ``[N, K]`` (any strides) in the layout :func:`int8_mlp` reads
    (``_native/w8a8.c``, ``hw_int8_pack``): a flat int8 tensor, 16-column x 64-code tiles (K padded
    to 64, N to 16), then the int32 column sums times 128 the VNNI engine subtracts."""
    if _load() is None:
        raise RuntimeError(f"int8_pack needs the native library: {_status}")
    n, k = qweight.shape
    w = qweight.contiguous()
    out = torch.empty(_lib.hw_int8_pack_bytes(n, k), dtype=torch.int8)
    _lib.hw_int8_pack(w.data_ptr(), n, k, out.data_ptr())
    return out


def _check_int8_mlp_args(x2d, packed, dims, w_scales, biases, relus, quantized) -> None:
    """The C pass reads every buffer at the sizes ``dims`` imply: check them (ValueError) first."""
    def flat(name, t, dtype, numel):
        if not (isinstance(t, Tensor) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
                and t.numel() == numel):
            got = f"{t.dtype} {list(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"int8_mlp: {name} must be a contiguous CPU {dtype} tensor of {numel} elements, got {got}")

    nl = len(packed)
    if nl < 1 or not (len(dims) == nl + 1 and len(w_scales) == len(biases) == len(relus) == nl):
        raise ValueError(f"int8_mlp: one packed weight, scale, bias and relu per layer and nlayers + 1 dims, got "
                         f"{nl}, {len(w_scales)}, {len(biases)}, {len(relus)} and dims {list(dims)}")
    from hwaware.ops.packing import INT8_MAX_K  # hwaware.quant imports hwaware.ops.packing: import at call time

    for i in range(nl):
        if not 1 <= dims[i] <= INT8_MAX_K or dims[i + 1] < 1:  # the C pass sums dims[i] int8 products in int32
            raise ValueError(f"int8_mlp: layer {i} is [N, K] = [{dims[i + 1]}, {dims[i]}]; expected N >= 1 and "
                             f"1 <= K <= {INT8_MAX_K} (the int32 accumulator of K int8 products)")
    if _load() is None:
        return
    for i in range(nl):
        flat(f"packed[{i}]", packed[i], torch.int8, _lib.hw_int8_pack_bytes(dims[i + 1], dims[i]))
        flat(f"w_scales[{i}]", w_scales[i], torch.float32, dims[i + 1])
        if biases[i] is not None:
            flat(f"biases[{i}]", biases[i], torch.float32, dims[i + 1])
    if quantized is not None:
        q, sx = quantized
        rows = q.shape[0] if isinstance(q, Tensor) and q.dim() == 2 else -1
        flat("codes", q, torch.int8, rows * dims[0])
        flat("scales", sx, torch.float32, rows)
    elif not (isinstance(x2d, Tensor) and x2d.dim() == 2 and x2d.shape[1] == dims[0]):
        raise ValueError(f"int8_mlp: x2d must be [M, {dims[0]}], got {getattr(x2d, 'shape', type(x2d).__name__)}")


def int8_mlp(x2d: Tensor, packed: Sequence[Tensor], dims: Sequence[int], w_scales: Sequence[Tensor],
             biases: Sequence[Optional[Tensor]], relus: Sequence[bool],
             quantized: Optional[Tuple[Tensor, Tensor]] = None, check: bool = True) -> Optional[Tensor]:
    """W8A8 layers in one C pass on :func:`int8_engine` (``hw_int8_mlp``), bit for bit the ``int_mm``
    passes: ``x2d`` contiguous float32 ``[M, dims[0]]`` -> float32 ``[M, dims[-1]]``; ``packed[i]``
    from :func:`int8_pack`, ``w_scales``/``biases`` contiguous float32. ``quantized``: instead of
    ``x2d`` (pass None), its per-token codes and scales, contiguous int8 ``[M, dims[0]]`` and float32
    ``[M]``. None: no engine here. ``check=False``: the caller has validated every buffer
    (``hwaware::int8_mlp`` checks its arguments and packs with :func:`int8_pack`), so the per-call
    Python checks are skipped on the serving path."""
    engine = int8_engine()
    if check:
        _check_int8_mlp_args(x2d, packed, dims, w_scales, biases, relus, quantized)
    if quantized is not None:
        q, sx = quantized
        if not (engine and q.numel() > 0):
            return None
        rows, args = q.shape[0], (None, q.data_ptr(), sx.data_ptr())
    else:
        if not (engine and _usable(x2d)):
            return None
        rows, args = x2d.shape[0], (x2d.data_ptr(), None, None)
    nl = len(packed)
    out = torch.empty(rows, dims[-1], dtype=torch.float32)
    dims_a, w_a, s_a, b_a, r_a = _i64s(dims), _ptrs(packed), _ptrs(w_scales), _optional_ptrs(biases), array("i", map(int, relus))
    rc = _lib.hw_int8_mlp(_ENGINES[engine], *args, rows, nl, _addr(dims_a), _addr(w_a), _addr(s_a), _addr(b_a), _addr(r_a),
                          out.data_ptr())
    if rc == -1:
        raise MemoryError(f"int8_mlp: no memory for the per-thread buffers (dims {list(dims)})")
    return out if rc == 0 else None


_BAG_INFO = threading.local()


def _bag_info() -> ctypes.Array:
    """This thread's two int64 slots the bag passes report a failing rule's values in."""
    info = getattr(_BAG_INFO, "buf", None)
    if info is None:
        info = _BAG_INFO.buf = (ctypes.c_int64 * 2)()
    return info


def check_bags(indices: Tensor, offsets: Tensor, rows: int, include_last_offset: bool) -> Optional[Tuple[int, int, int]]:
    """Bounds-check an embedding-bag call in C (``_native/bags.c``): ``(rule, a, b)`` where rule 0 is
    valid and 1/2/3 name the failing rule (see there) with its two values; None: check in Python.
    ``indices`` and ``offsets``: contiguous 1-D CPU tensors of one dtype, int64 or int32."""
    if _load() is None or indices.dtype != offsets.dtype or indices.dtype not in (torch.int64, torch.int32):
        return None
    info = _bag_info()
    rule = _lib.hw_check_bags(indices.data_ptr(), indices.numel(), offsets.data_ptr(), offsets.numel(),
                              int(indices.dtype == torch.int64), rows, int(include_last_offset), info)
    return rule, info[0], info[1]


def _table_args(weights: Sequence[Tensor], bits: Sequence[int]) -> Tuple[array, array]:
    """The row-wise tables as the C passes take them: their pointers, and meta = rows[T], cols[T], bits[T]."""
    if len(bits) != len(weights):  # C reads one width per table: never past the end of meta
        raise ValueError(f"bits must give one width per table: {len(weights)} weights, got {len(bits)} bits")
    shapes = [w.shape for w in weights]
    return _ptrs(weights), _i64s([s[0] for s in shapes] + [s[1] for s in shapes] + list(bits))


def rowwise_bags(weights: Sequence[Tensor], bits: Sequence[int], dim: int, indices: Tensor, offsets: Tensor,
                 mean: bool) -> Optional[Tuple[Tensor, Tuple[int, int, int]]]:
    """T row-wise tables' bags in one C pass (``_native/bags.c``, ``hw_rowwise_bags``):
    ``(out float32 [T, B, dim], (rule, a, b))``, rule 0 when the call was valid, else 1 (a = table,
    b = the id out of range) or 2 (a, b = first, last offset); None: use the per-table op.
    ``weights``: contiguous uint8 CPU tables; ``indices``: ``[T, N]`` with any strides;
    ``offsets``: contiguous ``[B]`` of ``indices``' dtype (int64 or int32); the caller checks shapes."""
    if _load() is None:
        return None
    ntab, n = indices.shape
    batch = offsets.shape[0]
    out = torch.empty(ntab, batch, dim, dtype=torch.float32)
    ptrs, meta = _table_args(weights, bits)
    info = _bag_info()
    rule = _lib.hw_rowwise_bags(_addr(ptrs), _addr(meta), ntab, dim, indices.data_ptr(), int(indices.dtype == torch.int64),
                                indices.stride(0), indices.stride(1), n, offsets.data_ptr(), batch, int(mean),
                                out.data_ptr(), info)
    return out, (rule, info[0], info[1])


def _ptrs(tensors: Sequence[Tensor]) -> array:
    """The tensors' data pointers as a C array of pointers: pass :func:`_addr` of it, and keep the
    array referenced until the call returns. (An ``array`` builds in about half the time of a ctypes
    array; per-call marshalling is a visible share of a small batch's forward.)"""
    return array("Q", [t.data_ptr() for t in tensors])


def _optional_ptrs(tensors: Sequence[Optional[Tensor]]) -> array:
    """:func:`_ptrs` where None is allowed (a NULL pointer: a layer without bias)."""
    return array("Q", [0 if t is None else t.data_ptr() for t in tensors])


def _i64s(values: Sequence[int]) -> array:
    return array("q", values)


def _addr(arr: array) -> int:
    return arr.buffer_info()[0]


def _interaction_usable(vectors: Sequence[Tensor]) -> bool:
    """Every vector float32, on CPU, contiguous, D >= 1 (an empty tensor's data pointer is NULL): the C
    pass reads raw pointers, so each one is checked."""
    return (len(vectors) > 0 and vectors[0].dim() == 2 and vectors[0].shape[1] > 0
            and all(v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous() for v in vectors)
            and _load() is not None)


def dot_interaction(vectors: Sequence[Tensor], pad: int) -> Optional[Tensor]:
    """``[B, D + V(V-1)/2 + pad]``: ``vectors[0]``, the pairwise dots of ``vectors`` (i < j, row-major),
    ``pad`` zeros (``_native/interact.c``); ``vectors``: V contiguous float32 CPU ``[B, D]`` tensors of
    one shape (the caller checks). None: use the eager path."""
    if not _interaction_usable(vectors):
        return None
    (batch, dim), nvec = vectors[0].shape, len(vectors)
    out = torch.empty(batch, dim + nvec * (nvec - 1) // 2 + pad, dtype=torch.float32)
    ptrs = _ptrs(vectors)
    if batch and _lib.hw_dot_interaction_fwd(_addr(ptrs), batch, nvec, dim, pad, out.data_ptr()) != 0:
        raise MemoryError(f"dot_interaction: no memory for the per-thread scratch (V={nvec}, D={dim})")
    return out


def dot_interaction_int8(vectors: Sequence[Tensor], pad: int) -> Optional[Tuple[Tensor, Tensor]]:
    """:func:`quant_tokens_i8` of :func:`dot_interaction`'s output, bit for bit for finite rows, in
    one pass that never writes the float rows (``hw_dot_interaction_fwd_q``): ``(codes int8 [B, W],
    scales float32 [B])``. None: use the two passes (no AVX-512, or no native library)."""
    if not _interaction_usable(vectors):
        return None
    (batch, dim), nvec = vectors[0].shape, len(vectors)
    codes = torch.empty(batch, dim + nvec * (nvec - 1) // 2 + pad, dtype=torch.int8)
    scales = torch.empty(batch, dtype=torch.float32)
    if batch == 0:
        return codes, scales
    ptrs = _ptrs(vectors)
    rc = _lib.hw_dot_interaction_fwd_q(_addr(ptrs), batch, nvec, dim, pad, codes.data_ptr(), scales.data_ptr())
    if rc == -1:
        raise MemoryError(f"dot_interaction_int8: no memory for the per-thread scratch (V={nvec}, D={dim})")
    return (codes, scales) if rc == 0 else None


def bags_interaction(x: Tensor, weights: Sequence[Tensor], bits: Sequence[int], indices: Tensor, pad: int,
                     quantized: bool) -> Optional[Tuple[Tuple[Tensor, ...], Tuple[int, int, int]]]:
    """:func:`dot_interaction` (``quantized``: :func:`dot_interaction_int8`) of ``[x] + `` the T tables'
    one-id bags (:func:`rowwise_bags` with offsets ``0 .. B-1``), bit for bit, in one pass that reads
    the table rows into the interaction's blocks and never writes the ``[T, B, dim]`` bags
    (``hw_bags_interaction_fwd`` / ``_fwd_q``): ``((rows float32 [B, W],) or (codes int8 [B, W],
    scales float32 [B]), (rule, table, id))``, rule 1 when ``indices[table]`` holds ``id`` outside that
    table (the output is then undefined), else 0. ``x``: contiguous float32 CPU ``[B, dim]``;
    ``weights``: contiguous uint8 CPU tables; ``indices``: ``[T, B]`` int64/int32, any strides; the
    caller checks shapes. None: not available here (no AVX-512 or no native library)."""
    if not _usable(x) or _load() is None:
        return None
    (batch, dim), ntab = x.shape, len(weights)
    width = dim + (ntab + 1) * ntab // 2 + pad
    if quantized:
        outs = (torch.empty(batch, width, dtype=torch.int8), torch.empty(batch, dtype=torch.float32))
    else:
        outs = (torch.empty(batch, width, dtype=torch.float32),)
    ptrs, meta = _table_args(weights, bits)
    info = _bag_info()
    args = (x.data_ptr(), _addr(ptrs), _addr(meta), ntab, dim, indices.data_ptr(), int(indices.dtype == torch.int64),
            indices.stride(0), indices.stride(1), batch, pad)
    if quantized:
        rc = _lib.hw_bags_interaction_fwd_q(*args, outs[0].data_ptr(), outs[1].data_ptr(), info)
    else:
        rc = _lib.hw_bags_interaction_fwd(*args, outs[0].data_ptr(), info)
    if rc == -2:
        return None
    if rc == -1:
        raise MemoryError(f"bags_interaction: no memory for the per-thread scratch (T={ntab}, D={dim})")
    return outs, (rc, info[0], info[1])


def dot_interaction_backward(grad: Tensor, vectors: Sequence[Tensor], pad: int) -> Optional[List[Tensor]]:
    """Gradients of :func:`dot_interaction`'s ``vectors`` given ``grad`` (contiguous float32
    ``[B, D + V(V-1)/2 + pad]``); None: use the eager path."""
    if not (_interaction_usable(vectors) and grad.dtype == torch.float32 and grad.is_contiguous()):
        return None
    (batch, dim), nvec = vectors[0].shape, len(vectors)
    grads = [torch.empty(batch, dim, dtype=torch.float32) for _ in vectors]
    ptrs, gptrs = _ptrs(vectors), _ptrs(grads)
    if batch and _lib.hw_dot_interaction_bwd(grad.data_ptr(), _addr(ptrs), batch, nvec, dim, pad, _addr(gptrs)) != 0:
        raise MemoryError(f"dot_interaction backward: no memory for the per-thread scratch (V={nvec}, D={dim})")
    return grads
