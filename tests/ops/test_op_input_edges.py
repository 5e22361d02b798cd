"""Edge inputs of the ops and the native library: views handed to C / fbgemm, empty and zero-width
shapes, K past the int32 accumulator, NaN codes, the library's first load from several threads.

Cases that crashed the process before their fix run in a subprocess, so a regression fails the test
instead of killing pytest."""
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hwaware.ops as ops
from hwaware.ops.packing import INT8_MAX_K, compress_24, quantize_rowwise
from hwaware.ops.reference import embedding_bag_rowwise_ref, int8_linear_ref, quantize_per_token_ref
from hwaware.quant import native
from tests.quant.test_native import _cpu_flags

ROOT = Path(__file__).resolve().parents[2]
NATIVE_DIR = ROOT / "hwaware" / "quant" / "_native"


def _isolated(code: str, env: dict = None, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter (one thread); its stdout. A crash fails the test here."""
    code = "import torch, hwaware\ntorch.set_num_threads(1)\n" + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


# -- embedding_bag_rowwise: per_sample_weights views, no bags ------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_per_sample_weights_of_any_strides_equal_their_contiguous_copy(bits):
    """fbgemm reads per_sample_weights as a dense [L] buffer: a [::2] view summed every other weight,
    an expanded (stride 0) one read past its one element."""
    torch.manual_seed(0)
    dim, ids, off = 8, torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 2, 4])
    w = quantize_rowwise(torch.randn(10, dim), bits)
    for psw in (torch.randn(12)[::2], torch.tensor([2.0]).expand(6), torch.randn(6, 2)[:, 1]):
        assert not psw.is_contiguous()
        got = torch.ops.hwaware.embedding_bag_rowwise(w, bits, dim, ids, off, 0, psw, False)
        dense = psw.contiguous()
        assert torch.equal(got, torch.ops.hwaware.embedding_bag_rowwise(w, bits, dim, ids, off, 0, dense, False))
        torch.testing.assert_close(got, embedding_bag_rowwise_ref(w, bits, dim, ids, off, 0, dense, False),
                                   atol=1e-5, rtol=1e-5)


def test_an_expanded_per_sample_weight_over_many_ids_reads_only_its_element():
    out = _isolated("""
        from hwaware.ops.packing import quantize_rowwise
        n, w = 200000, quantize_rowwise(torch.randn(10, 8), 8)
        ids, off = torch.randint(0, 10, (n,)), torch.tensor([0, n // 2])
        eb = torch.ops.hwaware.embedding_bag_rowwise
        got = eb(w, 8, 8, ids, off, 0, torch.tensor([0.5]).expand(n), False)
        print(torch.equal(got, eb(w, 8, 8, ids, off, 0, torch.full((n,), 0.5), False)))
    """)
    assert out.split() == ["True"]


def test_no_bags_give_an_empty_output_in_every_mode():
    """offsets [] (B = 0) with ids: torch's max embedding_bag crashed on it; every mode returns the
    fake kernel's [0, dim] float32, as sum and mean did."""
    out = _isolated("""
        from hwaware.ops.packing import quantize_rowwise
        eb = torch.ops.hwaware.embedding_bag_rowwise
        for bits in (8, 4):
            w = quantize_rowwise(torch.randn(10, 7), bits)
            for mode in (0, 1, 2):
                for ids, off, last in ((torch.tensor([1, 2, 3]), torch.zeros(0, dtype=torch.long), False),
                                       (torch.tensor([1, 2, 3]).int(), torch.zeros(0, dtype=torch.int32), False),
                                       (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), False),
                                       (torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long), True)):
                    y = eb(w, bits, 7, ids, off, mode, None, last)
                    print(bits, mode, tuple(y.shape), y.dtype)
    """)
    lines = out.strip().splitlines()
    assert len(lines) == 2 * 3 * 4 and all(l.split()[2:] == ["(0,", "7)", "torch.float32"] for l in lines), out
    w = quantize_rowwise(torch.randn(10, 7), 8)
    with FakeTensorMode() as mode:
        fake = torch.ops.hwaware.embedding_bag_rowwise(mode.from_tensor(w), 8, 7, mode.from_tensor(torch.tensor([1, 2])),
                                                       mode.from_tensor(torch.zeros(0, dtype=torch.long)), 2, None, False)
    assert tuple(fake.shape) == (0, 7)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 10\)"):  # ids are still checked without bags
        torch.ops.hwaware.embedding_bag_rowwise(w, 8, 7, torch.tensor([10]), torch.zeros(0, dtype=torch.long), 2, None, False)


# -- the interaction ops: zero-width vectors -----------------------------------------------------

def test_dot_interaction_refuses_zero_width_vectors_in_real_and_fake_kernels():
    """D = 0 with one vector: an empty output, whose NULL data pointer the C pass took for "write
    int8 codes" (a crash). Every interaction op refuses D < 1, as the embedding variants do."""
    out = _isolated("""
        ops = torch.ops.hwaware
        cases = [("dot_interaction", lambda vs: ops.dot_interaction(vs, 0)),
                 ("dot_interaction_int8", lambda vs: ops.dot_interaction_int8(vs, 0)),
                 ("dot_interaction_backward", lambda vs: ops.dot_interaction_backward(torch.zeros(3, len(vs) * (len(vs) - 1) // 2), vs, 0)),
                 ("embedding_interaction", lambda vs: ops.embedding_interaction(vs[0], [torch.zeros(5, 8, dtype=torch.uint8)] * (len(vs) - 1), [8] * (len(vs) - 1), torch.zeros(len(vs) - 1, 3, dtype=torch.long), 0)),
                 ("embedding_interaction_int8", lambda vs: ops.embedding_interaction_int8(vs[0], [torch.zeros(5, 8, dtype=torch.uint8)] * (len(vs) - 1), [8] * (len(vs) - 1), torch.zeros(len(vs) - 1, 3, dtype=torch.long), 0))]
        for name, call in cases:
            for nvec in (1, 2, 4):
                if name.startswith("embedding") and nvec == 1:
                    continue
                try:
                    call([torch.randn(3, 0) for _ in range(nvec)])
                    print(name, nvec, "returned")
                except ValueError as e:
                    print(name, nvec, "ValueError", "D >= 1" in str(e) or "dim=0 must be >= 1" in str(e))
    """)
    lines = out.strip().splitlines()
    assert len(lines) == 3 * 3 + 2 * 2 and all(l.endswith("ValueError True") for l in lines), out
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=r"D >= 1, got D = 0"):
        torch.ops.hwaware.dot_interaction([mode.from_tensor(torch.randn(3, 0))], 0)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=r"D >= 1, got D = 0"):
        torch.ops.hwaware.dot_interaction_int8([mode.from_tensor(torch.randn(3, 0))] * 2, 1)
    assert ops.dot_interaction([torch.randn(3, 1)], 0).shape == (3, 1)  # D = 1 still runs


def test_the_native_interaction_leaves_zero_width_vectors_to_the_eager_path():
    if native._load() is None:
        pytest.skip(native.native_status())
    out = _isolated("""
        from hwaware.quant import native
        print(native.dot_interaction([torch.randn(3, 0)], 0), native.dot_interaction_int8([torch.randn(3, 0)] * 2, 0),
              native.dot_interaction_backward(torch.zeros(3, 1), [torch.randn(3, 0)] * 2, 0))
    """)
    assert out.split() == ["None"] * 3, out


# -- int8: K past the int32 accumulator, zero-width layers ---------------------------------------

BIG_K = 140000  # 140000 * 127 * 127 > 2^31: the sums the reviewer saw wrap


def _big_k_layer(k, n=3):
    return torch.ones(2, k), torch.full((n, k), 127, dtype=torch.int8), torch.full((n,), 0.01)


@pytest.mark.parametrize("impl", ["int_mm", "fbgemm", "auto"])
def test_int8_linear_refuses_a_k_its_int32_accumulator_cannot_hold(impl):
    x, qw, s = _big_k_layer(BIG_K)
    limit = ops.FBGEMM_MAX_K if impl == "fbgemm" else INT8_MAX_K
    match = rf"K={BIG_K} .*only for K <= {limit}.*'dequant'"
    with pytest.raises(ValueError, match=match):
        torch.ops.hwaware.int8_linear(x, qw, s, None, impl)
    with native.only_engines(), pytest.raises(ValueError, match=match):  # the torch._int_mm passes too
        torch.ops.hwaware.int8_linear(x, qw, s, None, impl)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
        torch.ops.hwaware.int8_linear(mode.from_tensor(x), mode.from_tensor(qw), mode.from_tensor(s), None, impl)


def test_int8_linear_dequant_takes_any_k():
    x, qw, s = _big_k_layer(BIG_K)
    got = torch.ops.hwaware.int8_linear(x, qw, s, None, "dequant")
    torch.testing.assert_close(got, int8_linear_ref(x, qw, s), rtol=1e-3, atol=0)  # float32 sums of 140000 terms


@pytest.mark.parametrize("engines", [None, ()], ids=["engine", "int_mm-passes"])
def test_int_mm_is_exact_up_to_the_k_limit(engines):
    """At K = INT8_MAX_K the largest products (codes 127 and -128, and -128 codes handed in) still
    sum exactly: the limit refuses nothing that works."""
    k = INT8_MAX_K
    x, qw, s = torch.ones(2, k), torch.full((3, k), -128, dtype=torch.int8), torch.full((3,), 0.01)
    codes, sx = torch.full((2, k), -128, dtype=torch.int8), torch.full((2,), 0.5)
    with native.only_engines(*(native.ENGINES if engines is None else engines)):
        assert torch.equal(torch.ops.hwaware.int8_linear(x, qw, s, None, "int_mm"), int8_linear_ref(x, qw, s))
        got = torch.ops.hwaware.int8_mlp_quantized(codes, sx, [qw], [s], [None], [False])
    assert torch.equal(got, ops._int8_mlp_quantized_any(codes, sx, [qw], [s], [None], [False]))


def test_fbgemm_is_right_up_to_its_k_limit():
    k = ops.FBGEMM_MAX_K  # all-positive rows: fbgemm's uint8 codes up to 255, the worst case
    x, qw, s = torch.ones(2, k), torch.full((3, k), -128, dtype=torch.int8), torch.full((3,), 0.01)
    torch.testing.assert_close(torch.ops.hwaware.int8_linear(x, qw, s, None, "fbgemm"), int8_linear_ref(x, qw, s),
                               rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match=rf"K={k + 1} .*only for K <= {k}"):
        torch.ops.hwaware.int8_linear(torch.ones(2, k + 1), torch.ones(3, k + 1, dtype=torch.int8), s, None, "fbgemm")


def test_int8_mlp_refuses_a_k_its_int32_accumulator_cannot_hold_in_any_layer():
    x, qw, s = _big_k_layer(BIG_K)
    small = torch.ones(4, 3, dtype=torch.int8), torch.ones(4)
    wide = torch.ones(BIG_K, 3, dtype=torch.int8), torch.ones(BIG_K), torch.ones(5, BIG_K, dtype=torch.int8), torch.ones(5)
    for layers, bad in (([(qw, s), small], 0), ([(qw[:, :3], s), (wide[0], wide[1]), (wide[2], wide[3])], 2)):
        qws, ss = [l[0] for l in layers], [l[1] for l in layers]
        nones, falses = [None] * len(qws), [False] * len(qws)
        xin = torch.ones(2, qws[0].shape[1])
        match = rf"qweights\[{bad}\] has K={BIG_K} .*only for K <= {INT8_MAX_K}"
        with pytest.raises(ValueError, match=match):
            torch.ops.hwaware.int8_mlp(xin, qws, ss, nones, falses)
        with pytest.raises(ValueError, match=match):
            torch.ops.hwaware.int8_mlp_quantized(*quantize_per_token_ref(xin), qws, ss, nones, falses)
        with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
            torch.ops.hwaware.int8_mlp(mode.from_tensor(xin), [mode.from_tensor(q) for q in qws],
                                       [mode.from_tensor(t) for t in ss], nones, falses)
    if native._load() is not None:  # the C pass's own argument check
        with pytest.raises(ValueError, match=rf"layer 0 is \[N, K\] = \[3, {BIG_K}\].*K <= {INT8_MAX_K}"):
            native.int8_mlp(x, [torch.zeros(1, dtype=torch.int8)], [BIG_K, 3], [s], [None], [False])


def test_sparse24_int8_refuses_a_k_its_int32_accumulator_cannot_hold():
    k = 140004  # a multiple of 4
    w = torch.zeros(3, k)
    w[:, ::4] = 1.0
    values, meta = compress_24(w)
    qvalues, ws = (values * 127).to(torch.int8), torch.full((3,), 0.01)
    x = torch.ones(2, k)
    for kernel, limit in (("dense", INT8_MAX_K), ("fbgemm", ops.FBGEMM_MAX_K)):
        with pytest.raises(ValueError, match=rf"values has K={k} inputs; kernel='{kernel}' .* K <= {limit}"):
            torch.ops.hwaware.sparse24_linear(x, qvalues, meta, ws, None, kernel)
        with FakeTensorMode() as mode, pytest.raises(ValueError, match=rf"K={k} "):
            torch.ops.hwaware.sparse24_linear(mode.from_tensor(x), mode.from_tensor(qvalues), mode.from_tensor(meta),
                                              mode.from_tensor(ws), None, kernel)
    got = torch.ops.hwaware.sparse24_linear(x, qvalues, meta, ws, None, "dequant")  # float: any K
    torch.testing.assert_close(got, torch.full((2, 3), k / 4 * 1.27), rtol=1e-3, atol=0)  # float32 sums
    assert torch.equal(torch.ops.hwaware.sparse24_linear(x, values, meta, None, None, "dense"),
                       torch.full((2, 3), k / 4))  # float values: no int32 sum, any K


def test_int8_mlp_refuses_a_zero_width_layer_in_real_and_fake_kernels():
    """A [0, N] hidden layer passed the checks (only layer 0's width was checked): the fake kernel
    returned a shape, the CPU kernel a bare RuntimeError."""
    x = torch.randn(4, 8)
    for qws, bad in (([torch.ones(5, 8, dtype=torch.int8), torch.zeros(0, 5, dtype=torch.int8), torch.zeros(3, 0, dtype=torch.int8)], 1),
                     ([torch.ones(5, 8, dtype=torch.int8), torch.zeros(0, 5, dtype=torch.int8)], 1),
                     ([torch.ones(5, 8, dtype=torch.int8), torch.ones(6, 5, dtype=torch.int8), torch.zeros(0, 6, dtype=torch.int8)], 2)):
        ss = [torch.rand(q.shape[0]) for q in qws]
        nones, falses = [None] * len(qws), [False] * len(qws)
        match = rf"qweights\[{bad}\] describes a \[N, K\] = \[0, {qws[bad].shape[1]}\] weight; a packed layer needs N >= 1"
        for dtype in (torch.float32, torch.bfloat16):
            with pytest.raises(ValueError, match=match):
                torch.ops.hwaware.int8_mlp(x.to(dtype), qws, ss, nones, falses)
        with pytest.raises(ValueError, match=match):
            torch.ops.hwaware.int8_mlp_quantized(*quantize_per_token_ref(x), qws, ss, nones, falses)
        with pytest.raises(ValueError, match=match):
            ops._int8_mlp_quantized_any(*quantize_per_token_ref(x), qws, ss, nones, falses)
        with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
            torch.ops.hwaware.int8_mlp(mode.from_tensor(x), [mode.from_tensor(q) for q in qws],
                                       [mode.from_tensor(s) for s in ss], nones, falses)
        codes, sx = quantize_per_token_ref(x)
        with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
            torch.ops.hwaware.int8_mlp_quantized(mode.from_tensor(codes), mode.from_tensor(sx),
                                                 [mode.from_tensor(q) for q in qws], [mode.from_tensor(s) for s in ss],
                                                 nones, falses)


# -- the native library: its first load from two threads; NaN codes without undefined behaviour --

def test_a_thread_calling_during_the_first_build_waits_for_it(tmp_path):
    """The first _load() marked itself done before the library was built: another thread calling in
    meanwhile got no library, and int8_engine() cached "no engine" for the life of the process."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: nothing is built")
    out = _isolated("""
        import threading, time
        from hwaware.quant import native
        build, building = native._build, threading.Event()
        def slow_build(target):  # the other thread calls while this one is inside the build
            building.set()
            time.sleep(0.5)
            build(target)
        native._build = slow_build
        got = {}
        first = threading.Thread(target=lambda: got.setdefault("status", native.native_status()))
        def second():
            building.wait(60)
            got["engine"], got["lib"] = native.int8_engine(), native._load() is not None
        other = threading.Thread(target=second)
        first.start(); other.start(); first.join(); other.join()
        cached = native.int8_engine()
        native._amx = native._vnni = native._madd = None  # what the loaded library says, asked afresh
        print(got["status"].startswith("loaded"), got["lib"], got["engine"] == cached == native.int8_engine())
    """, env={"HWAWARE_CACHE": str(tmp_path)})
    assert out.split() == ["True", "True", "True"], out


def _nan_rows() -> torch.Tensor:
    x = torch.randn(4, 37, generator=torch.Generator().manual_seed(0)) * 3  # 37: 8-lane AVX2 blocks and a scalar tail
    x[1, 36], x[2, 5], x[3, 36] = float("nan"), float("nan"), float("inf")
    return x


_UBSAN_QUANT = """
import ctypes, json, sys, torch
from tests.ops.test_op_input_edges import _nan_rows
torch.set_num_threads(1)
lib = ctypes.CDLL(sys.argv[1])
lib.hw_quant_tokens_i8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
x = _nan_rows()
q, s = torch.zeros(4, 37, dtype=torch.int8), torch.zeros(4)
lib.hw_quant_tokens_i8(x.data_ptr(), 4, 37, q.data_ptr(), s.data_ptr())
print(json.dumps([q.tolist(), s.tolist()]))
"""


@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_nan_codes_convert_without_undefined_behaviour(tmp_path, arch):
    """quant_row's scalar loops (the AVX2 tail, the generic build) converted rint(NaN) to int32: UB in
    C. Built with UBSan's float-cast-overflow check, fatal: NaN now becomes -127 as in every SIMD lane
    (this machine's build gives the same codes), the finite rows keep the reference's codes bit for bit."""
    cc = os.environ.get("CC") or shutil.which("gcc")
    if platform.machine() not in ("x86_64", "AMD64") or cc is None or ("x86-64-v3" == arch and "avx2" not in _cpu_flags()):
        pytest.skip(f"needs gcc on an x86-64 CPU that runs a {arch} build")
    lib = tmp_path / f"w8a8_{arch}.so"
    build = subprocess.run([cc, "-O1", f"-march={arch}", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC",
                            "-fsanitize=float-cast-overflow", "-fno-sanitize-recover=float-cast-overflow",
                            f"-I{NATIVE_DIR}", "-o", str(lib), str(NATIVE_DIR / "w8a8.c")],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        pytest.skip(f"no UBSan build here: {build.stderr[-300:]}")
    run = subprocess.run([sys.executable, "-c", _UBSAN_QUANT, str(lib)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and "runtime error" not in run.stderr, run.stdout + run.stderr[-2000:]
    codes, scales = json.loads(run.stdout)
    q, s = torch.tensor(codes, dtype=torch.int8), torch.tensor(scales)
    x = _nan_rows()
    rq, rs = quantize_per_token_ref(x[:1])
    assert torch.equal(q[:1], rq) and torch.equal(s[:1], rs) and bool(s[1:].isnan().all())
    # the non-finite rows' codes: NaN (and inf * 0 in the inf row, whose scale is inf) -> -127, as a SIMD lane has it
    assert (q[1, 36].item(), q[2, 5].item(), q[3, 36].item()) == (-127, -127, -127)
    mine = native.quant_tokens_i8(x)  # this machine's build (AVX-512 here, or the same loops): the same codes
    if mine is not None:
        assert torch.equal(mine[0], q)
