"""The native row-wise fake quant equals the eager torch path bit for bit, and really is in use."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hwaware.quant.primitives as P
from hwaware.quant import native
from hwaware.quant.fake_quant import FakeQuantizer
from hwaware.quant.spec import QuantSpec

SPECS = [
    QuantSpec(granularity="per_row", dynamic=True),
    QuantSpec(granularity="per_row", dynamic=True, scale_dtype="float16"),
    QuantSpec(granularity="per_row", symmetric=False, dynamic=True),
    QuantSpec(bits=4, granularity="per_row", symmetric=False, dynamic=True, scale_dtype="float16"),
    QuantSpec(granularity="per_channel"),  # weight scales tracked each step
]


def _eager(monkeypatch, x, spec):
    with monkeypatch.context() as m:
        m.setattr(native, "fq_sym_rows", lambda *a: None)
        m.setattr(native, "fq_affine_rows", lambda *a: None)
        return P.fake_quantize_dynamic(x, spec)


def test_native_kernel_is_in_use_where_a_compiler_exists():
    if shutil.which("cc") or shutil.which("gcc"):
        assert native.native_status().startswith("loaded"), native.native_status()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short() + "/" + s.scale_dtype)
@pytest.mark.parametrize("shape", [(1024, 16), (37, 367), (5, 1), (1, 129)])
def test_native_equals_eager_exactly(monkeypatch, spec, shape):
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    x = torch.randn(*shape, generator=g) * 4
    x[0, 0] = 0.0  # a row with a zero, and an all-constant row below
    if shape[0] > 2:
        x[2] = 1.5
    y, s, z, _ = P.fake_quantize_dynamic(x, spec)
    ye, se, ze, _ = _eager(monkeypatch, x, spec)
    torch.testing.assert_close(y, ye, atol=0, rtol=0)
    torch.testing.assert_close(s.reshape(-1), se.reshape(-1), atol=0, rtol=0)
    if z is not None:
        torch.testing.assert_close(z.reshape(-1), ze.reshape(-1).float(), atol=0, rtol=0)


def test_native_gradient_is_straight_through():
    x = torch.randn(8, 16, requires_grad=True)
    y, *_ = P.fake_quantize_dynamic(x, SPECS[2])
    (y * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(16.0).expand(8, 16), atol=0, rtol=0)


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: s.short())
def test_nan_row_is_reported_by_check_finite(spec):
    fq = FakeQuantizer(spec.replace(dynamic=True) if spec.granularity == "per_row" else spec, "t.0", "activation" if spec.granularity == "per_row" else "weight")
    fq.quantize = True
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    fq(x)
    with pytest.raises(ValueError, match="'t.0'.*NaN/inf"):
        fq.check_finite()


def test_builds_from_scratch_in_an_empty_cache(tmp_path):
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the eager path is used (tested above)")
    env = {**os.environ, "HWAWARE_CACHE": str(tmp_path)}
    code = "from hwaware.quant import native; print(native.native_status())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith(f"loaded {tmp_path}"), out.stdout + out.stderr
    assert len(list(tmp_path.glob("native-*.so"))) == 1 and not list(tmp_path.glob("*.tmp"))


def test_disabled_by_environment(tmp_path):
    env = {**os.environ, "HWAWARE_NO_NATIVE": "1"}
    code = "from hwaware.quant import native; print(native.native_status())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "disabled by HWAWARE_NO_NATIVE"


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((l for l in f if l.startswith("flags")), "").split())
    except OSError:
        return set()


# the test files whose kernels have a C path per instruction set (AVX-512 blocks vs AVX2 loops)
_NATIVE_TESTS = ["tests/quant/test_native.py", "tests/ops/test_dot_interaction.py", "tests/ops/test_embedding_bags.py",
                 "tests/ops/test_embedding_interaction.py", "tests/ops/test_quantized_interaction.py",
                 "tests/ops/test_int8_mlp.py", "tests/ops/test_ops.py"]


def test_the_c_paths_of_cpus_without_avx512_pass_the_native_tests(tmp_path):
    # The C files have AVX-512 blocks with plain loops for other CPUs (AVX2 deployments). On a CPU
    # with AVX-512 only the first would ever be tested: build for x86-64-v3 (AVX2 + FMA) and run the
    # native tests against that library, which must load (test_native checks it is in use).
    if platform.machine() not in ("x86_64", "AMD64") or "avx2" not in _cpu_flags():
        pytest.skip("not an x86-64 CPU with AVX2")
    if "avx512f" not in _cpu_flags():
        pytest.skip("this CPU has no AVX-512: the native library is already the AVX2 build")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the eager path is used (tested above)")
    # oneDNN capped at AVX2 as well: such a CPU's torch._int_mm saturates (tests/ops/test_int8_linear_exact.py),
    # and the int_mm tests in test_ops must still see the exact product
    env = {**os.environ, "HWAWARE_CACHE": str(tmp_path), "HWAWARE_NATIVE_ARCH": "x86-64-v3", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    root = Path(__file__).resolve().parents[2]
    # (and not the tests that build or launch other configurations themselves: they run on their own)
    skip = ("not from_scratch and not disabled_by_environment and not without_avx512 and not torch_compile "
            "and not int8_engine_of_other and not avx2_build_gives and not capped_below_vnni")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", skip, *_NATIVE_TESTS],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.splitlines()[-1], out.stdout[-500:]
    code = "from hwaware.quant import native; print(native.native_status()); print(native.amx_available())"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    status, amx = probe.stdout.split("\n")[:2]
    assert status.startswith(f"loaded {tmp_path}") and amx == "False", probe.stdout + probe.stderr


@pytest.mark.parametrize("arch,needs,engine,lanes", [
    ("icelake-server", {"avx512_vnni", "avx512bw", "avx512vl"}, "vnni", 16),
    ("alderlake", {"avx_vnni", "avx2", "fma"}, "vnni", 8),
    ("skylake-avx512", {"avx512bw", "avx512vl", "avx512dq", "avx512cd"}, "vpmaddwd", 16),
    ("x86-64-v3", {"avx2", "fma"}, "vpmaddwd", 8)])
def test_the_int8_engine_of_other_cpus_equals_the_int_mm_passes(tmp_path, arch, needs, engine, lanes):
    # A CPU with AMX runs int8_mlp on AMX, and its own build has the AVX-512 engines: built for
    # icelake-server (AVX-512 VNNI, no AMX), alderlake (AVX-VNNI, no AVX-512), skylake-avx512
    # (AVX-512 without VNNI) and x86-64-v3 (AVX2 alone), the engine tests run the engine those CPUs
    # get (VPDPBUSD or VPMADDWD, 16 or 8 lanes wide) against the _int_mm passes.
    if platform.machine() not in ("x86_64", "AMD64") or not needs <= _cpu_flags():
        pytest.skip(f"this CPU cannot run a build for {arch} (needs {sorted(needs)})")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the eager path is used (tested above)")
    env = {**os.environ, "HWAWARE_CACHE": str(tmp_path), "HWAWARE_NATIVE_ARCH": arch}
    lanes_fn = "hw_vnni_lanes" if engine == "vnni" else "hw_madd_lanes"
    code = ("from hwaware.quant import native; print(native.native_status()); print(native.amx_available(), "
            f"native.int8_engine(), native._lib.{lanes_fn}())")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    status, found = probe.stdout.split("\n")[:2]
    assert status.startswith(f"loaded {tmp_path}") and found == f"False {engine} {lanes}", probe.stdout + probe.stderr
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/test_int8_engines.py",
                          "-k", f"{engine} or tile_layout"], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.splitlines()[-1] and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-500:]


_INTERACTION_BITS = """
import sys, torch
import hwaware.ops
from hwaware.ops.packing import quantize_rowwise
g = torch.Generator().manual_seed(0)
out = {}
for batch, ntab, dim, pad in [(2048, 26, 16, 1), (33, 5, 7, 0), (17, 3, 20, 3), (1, 1, 16, 0)]:
    vecs = [torch.randn(batch, dim, generator=g) for _ in range(ntab + 1)]
    out[f"float{batch}"] = torch.ops.hwaware.dot_interaction(vecs, pad)
    out[f"codes{batch}"], out[f"scales{batch}"] = torch.ops.hwaware.dot_interaction_int8.default(vecs, pad)
    bits = [8 if t % 2 else 4 for t in range(ntab)]
    w = [quantize_rowwise(torch.randn(50, dim, generator=g), b) for b in bits]
    ids = torch.randint(0, 50, (ntab, batch), generator=g)
    out[f"fused{batch}"] = torch.ops.hwaware.embedding_interaction.default(vecs[0], w, bits, ids, pad)
    out[f"fused_codes{batch}"], out[f"fused_scales{batch}"] = torch.ops.hwaware.embedding_interaction_int8.default(
        vecs[0], w, bits, ids, pad)
torch.save(out, sys.argv[1])
"""


def test_the_avx2_build_gives_the_avx512_build_s_interaction_bits(tmp_path):
    # the 8-lane (AVX2) and 16-lane (AVX-512) blocks compute every dot as the same fma chain: a model
    # serves the same interaction (and int8 codes) on either CPU
    if "avx512f" not in _cpu_flags() or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("needs an AVX-512 CPU to compare its build with the AVX2 one")
    script = tmp_path / "bits.py"
    script.write_text(_INTERACTION_BITS)
    root = Path(__file__).resolve().parents[2]
    results = {}
    for arch in ("native", "x86-64-v3"):
        env = {**os.environ, "HWAWARE_CACHE": str(tmp_path / arch), "HWAWARE_NATIVE_ARCH": arch, "PYTHONPATH": str(root)}
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / f"{arch}.pt")], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[arch] = torch.load(tmp_path / f"{arch}.pt")
    assert results["native"].keys() == results["x86-64-v3"].keys()
    for key, value in results["native"].items():
        assert torch.equal(value, results["x86-64-v3"][key]), key


def test_a_bad_native_arch_is_refused(monkeypatch):
    monkeypatch.setenv("HWAWARE_NATIVE_ARCH", "native; rm -rf /")
    with pytest.raises(ValueError, match="HWAWARE_NATIVE_ARCH"):
        native._flags()
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    for _ in range(2):  # on every call, not once and then the eager path in silence
        with pytest.raises(ValueError, match="HWAWARE_NATIVE_ARCH"):
            native._load()
    monkeypatch.setenv("HWAWARE_NATIVE_ARCH", "x86-64-v3")
    assert "-march=x86-64-v3" in native._flags() and "-march=native" not in native._flags()


@pytest.mark.parametrize("spec", [SPECS[2], SPECS[3]], ids=lambda s: s.short() + "/" + s.scale_dtype)
def test_decayed_rows_flush_to_exact_zero_on_both_paths(monkeypatch, spec):
    # a rarely seen embedding row after weight decay: ~3e-38; its products would be denormal
    x = torch.randn(3, 16)
    x[1] = torch.linspace(3e-38, 9e-38, 16)
    y, s, off, _ = P.fake_quantize_dynamic(x, spec)
    ye, _, offe, _ = _eager(monkeypatch, x, spec)
    assert float(off.reshape(-1)[1]) == 0.0 and torch.count_nonzero(y[1]) == 0
    torch.testing.assert_close(y, ye, atol=0, rtol=0)
    torch.testing.assert_close(off.reshape(-1), offe.reshape(-1), atol=0, rtol=0)


@pytest.mark.parametrize("cols", [1, 13, 15, 16, 17, 31, 32, 33, 367, 1024])
def test_per_token_int8_codes_equal_the_reference(cols):
    from hwaware.ops.reference import quantize_per_token_ref

    g = torch.Generator().manual_seed(cols)
    x = torch.randn(37, cols, generator=g) * torch.logspace(-3, 3, 37)[:, None]
    x[0] = 0.0  # all-zero row: eps scale, zero codes
    halves = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5])[:cols]
    x[1, : halves.numel()] = halves  # scale 1 exactly (max 127): exact halves round to even
    x[1, halves.numel():] = 0.25
    got = native.quant_tokens_i8(x)
    assert got is not None, native.native_status()
    q, s = quantize_per_token_ref(x)
    assert torch.equal(got[0], q) and torch.equal(got[1], s)


def test_per_token_int8_marks_non_finite_rows_with_a_nan_scale():
    x = torch.randn(4, 20)
    x[1, 19], x[2, 3], x[3, 0] = float("nan"), float("inf"), -float("inf")
    q, s = native.quant_tokens_i8(x)
    assert torch.isnan(s[1:]).all() and torch.isfinite(s[0])


@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_epilogue_is_the_float64_reference_arithmetic(bias):
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-2**24, 2**24, (9, 37), generator=g, dtype=torch.int32)
    sx, sw = torch.rand(9, generator=g) * 1e-2, torch.rand(37, generator=g) * 1e-2
    b = torch.randn(37, generator=g) if bias else None
    out = native.w8a8_epilogue(acc, sx, sw, b)
    ref = acc.double() * sx.double()[:, None] * sw.double()[None, :]
    ref = (ref if b is None else ref + b.double()).float()
    assert torch.equal(out, ref)


def test_w8a8_epilogue_relu_is_torch_relu_of_the_epilogue():
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-2**20, 2**20, (300, 130), generator=g, dtype=torch.int32)  # over the threading cut
    acc[0, :5] = 0
    sx, sw, b = torch.rand(300, generator=g), torch.rand(130, generator=g), torch.randn(130, generator=g)
    sx[1] = float("nan")  # a non-finite input row stays NaN through the ReLU, as torch.relu keeps NaN
    b[0] = -0.0  # -0.0 passes unchanged, as torch.relu(-0.0) is -0.0
    out = native.w8a8_epilogue(acc, sx, sw, b, relu=True)
    ref = torch.relu(native.w8a8_epilogue(acc, sx, sw, b))
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))  # bitwise: NaN payloads and signed zeros


def test_threaded_passes_equal_one_thread():
    # above PAR_MIN elements both passes split rows over torch's OpenMP threads; rows are independent
    x = torch.randn(1024, 200)
    sw = torch.rand(96)
    acc = torch.randint(-2**20, 2**20, (1024, 96), dtype=torch.int32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (*native.quant_tokens_i8(x), native.w8a8_epilogue(acc, x[:, 0].abs(), sw, None, relu=True))
        torch.set_num_threads(max(2, threads))
        many = (*native.quant_tokens_i8(x), native.w8a8_epilogue(acc, x[:, 0].abs(), sw, None, relu=True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_library_shares_torchs_openmp_runtime():
    # two OpenMP runtimes in one process would each keep spinning workers on the same cores
    native._load()
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(gomp) <= 1, gomp


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("include_last", [False, True])
def test_bag_check_agrees_with_the_numpy_rules(dtype, include_last):
    def numpy_rule(idx, off, rows):
        n = idx.numel()
        if n and (int(idx.min()) < 0 or int(idx.max()) >= rows):
            return 1, int(idx.min()), int(idx.max())
        if off.numel():
            first, last = int(off[0]), int(off[-1])
            if first != 0 or last > n or bool((off[1:] < off[:-1]).any()):
                return 2, first, last
            if include_last and last != n:
                return 3, first, last
        return 0
    idx = torch.tensor([3, 0, 9, 4, 4], dtype=dtype)
    off = torch.tensor([0, 2, 2, 5] if include_last else [0, 2, 2], dtype=dtype)
    cases = [(idx, off), (idx - 1, off), (idx + 1, off), (idx, off + 1), (idx, off.flip(0)),
             (idx, torch.tensor([0, 2, 6], dtype=dtype)), (idx, torch.tensor([0, 2, 4], dtype=dtype)),
             (idx[:0], torch.tensor([0] if include_last else [], dtype=dtype))]
    for i, o in cases:
        got = native.check_bags(i, o, 10, include_last)
        assert (got[0] if got[0] == 0 else got) == numpy_rule(i, o, 10), (i, o)


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, granularity="per_channel", symmetric=True),
                                  QuantSpec(bits=8, granularity="per_row", symmetric=False, scale_dtype="float32")],
                         ids=["symmetric", "rowwise"])
def test_compiled_fake_quant_passes_the_gradient_and_the_values(spec):
    """Under torch.compile the C call on data pointers is opaque to dynamo: the weights got no
    gradient (QAT under torch.compile trained only the biases, silently). The eager ops are traced."""
    torch._dynamo.reset()
    x = torch.randn(6, 40, requires_grad=True)
    g = torch.randn(6, 40)

    def step(t):
        return P.fake_quantize_dynamic(t, spec)[0]

    y = torch.compile(step, backend="aot_eager")(x)  # (the row-wise path breaks the graph once: a data check)
    (y * g).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, g)
    assert torch.equal(y.detach(), step(x.detach()))  # the same values as the native call


@pytest.mark.parametrize("fp16", [True, False])
def test_a_saturated_fp16_scale_clamps_on_both_paths(monkeypatch, fp16):
    # max|x| past 127 * 65504: the fp16 scale saturates, so round(x / s) leaves +-127 (it was not clamped)
    spec = QuantSpec(granularity="per_row", dynamic=True, scale_dtype="float16" if fp16 else "float32")
    x = torch.tensor([[1e7, -3e7, 1.0, 0.0], [1e3, -2.0, 0.5, 0.0]])
    y, s, _, _ = P.fake_quantize_dynamic(x, spec)
    ye, se, _, _ = _eager(monkeypatch, x, spec)
    torch.testing.assert_close(y, ye, atol=0, rtol=0)
    zp = torch.zeros(2, dtype=torch.int32)
    torch.testing.assert_close(y, P.fake_quantize(x, s, zp, spec.replace(dynamic=False)), atol=0, rtol=0)
    assert bool((y.abs() <= 127 * s.reshape(-1, 1)).all())
