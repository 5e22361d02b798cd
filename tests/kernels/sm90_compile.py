"""Compile the Triton kernels for an H100 (sm90) without a GPU: Triton lowers to PTX and runs its
bundled ptxas for a ``GPUTarget``; nothing is launched. Run by test_sm90_compile.py in a fresh
process (the test session has Triton in interpreter mode). Prints one JSON line per compile:
kernel, variant, shared memory bytes, and which matmul instructions the kernel lowered to.

This catches what the interpreter cannot: dtype rules of ``tl.dot`` on tensor cores, tile sizes
below the MMA minimum, shared memory over the sm90 limit, ops that do not lower.
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import hwaware.kernels._launch as launch  # noqa: E402
import hwaware.kernels.embedding_bag_rowwise as eb  # noqa: E402
import hwaware.kernels.int4_linear as i4  # noqa: E402
import hwaware.kernels.int8_linear as i8  # noqa: E402
import hwaware.kernels.sparse24_linear as sp  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory per block on an H100 (227 KiB)
_DTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}


def compile_one(kernel, pointers, constexprs, num_warps, num_stages, **options):
    """Scalars are i32 and pointers and strides 16-divisible (the usual runtime specialisation)."""
    names = kernel.arg_names
    const_names = {names[i] for i in kernel.constexprs}
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in const_names:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("stride") and not name.endswith(("k", "sg", "mk", "vk", "ak")) or name in ("K", "N"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=SM90, options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    ttgir = compiled.asm["ttgir"]
    mma = "wgmma" if "warp_group_dot" in ttgir else "mma" if ("#mma" in ttgir and "tt.dot" in ttgir) else \
        "fma" if "tt.dot" in ttgir else "none"
    return {"shared": compiled.metadata.shared, "mma": mma}


def _split(cfg):
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")


def jobs():
    # the first config of each shape class (the default without autotuning), the one that needs the
    # most shared memory, and the first split-K one (it stores partial sums: another epilogue)
    def pick(configs):
        big = max(configs, key=lambda c: (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * c["num_stages"])
        split = [c for c in configs if c.get("SPLIT_K", 1) > 1][:1]
        return [c for i, c in enumerate([configs[0], big] + split) if all(c is not d for d in [configs[0], big][:i])]

    for xt in ("fp16", "bf16", "fp32"):
        yield "quantize_per_token", xt, i8._quantize_per_token_kernel, \
            {"x_ptr": xt, "q_ptr": "i8", "scale_ptr": "fp32"}, {"BLOCK_K": 1024}, 4, 3, {"enable_fp_fusion": False}
    for cfg in pick(i8._CONFIGS_SMALL_M) + pick(i8._CONFIGS_LARGE_M):
        c, w, s = _split(cfg)
        yield "int8_gemm", f"fp16 {c}", i8._int8_gemm_kernel, \
            {"q_ptr": "i8", "w_ptr": "i8", "xs_ptr": "fp32", "ws_ptr": "fp32", "bias_ptr": "fp16", "out_ptr": "fp16"}, \
            dict(HAS_BIAS=True, APPLY_RELU=True, EVEN_K=False, **c), w, s, {}
    for xt in ("fp16", "bf16"):
        for cfg in pick(i4._CONFIGS_SMALL_M) + pick(i4._CONFIGS_LARGE_M) if xt == "fp16" else \
                [i4._CONFIGS_SMALL_M[0], i4._CONFIGS_LARGE_M[0]]:
            c, w, s = _split(cfg)
            out = xt if c["SPLIT_K"] == 1 else "fp32"
            yield "int4_gemm", f"{xt} g128 {c}", i4._int4_gemm_kernel, \
                {"x_ptr": xt, "w_ptr": "u8", "s_ptr": "fp32", "z_ptr": "i8", "bias_ptr": xt, "out_ptr": out}, \
                dict(GROUP_SIZE=128, HAS_ZEROS=True, HAS_BIAS=True, DOT_DTYPE=_DTYPES[xt], INPUT_PRECISION="tf32", **c), w, s, {}
    for vt in ("fp16", "i8", "fp32"):
        for cfg in pick(sp._CONFIGS_SMALL_M) + pick(sp._CONFIGS_LARGE_M) if vt != "fp32" else pick(sp._CONFIGS_SMALL_M):
            c, w, s = _split(cfg)
            out = "fp16" if vt == "i8" else vt
            target = out if c["SPLIT_K"] == 1 else "i32" if vt == "i8" else "fp32"  # split-K stores partials
            yield "sparse24_gemm", f"{vt} {c}", sp._sparse24_gemm_kernel, \
                {"a_ptr": vt, "v_ptr": vt, "meta_ptr": "u8", "xs_ptr": "fp32", "ws_ptr": "fp32", "bias_ptr": out, "out_ptr": target}, \
                dict(INT8=vt == "i8", HAS_BIAS=True, DOT_DTYPE=_DTYPES.get(vt, tl.float32),
                     INPUT_PRECISION="ieee" if vt == "fp32" else "tf32", **c), w, s, {}
    for part, scaled in (("i32", True), ("fp32", False)):  # the second pass of int4's and 2:4's split-K
        yield "splitk_reduce", part, launch._splitk_reduce_kernel, \
            {"part_ptr": part, "xs_ptr": "fp32", "ws_ptr": "fp32", "bias_ptr": "fp16", "out_ptr": "fp16"}, \
            dict(SPLIT_K=4, SCALED=scaled, HAS_BIAS=True, BLOCK=1024), 4, 3, {}
    for vt in ("fp16", "i8"):
        yield "decompress24", vt, sp._decompress24_kernel, {"v_ptr": vt, "meta_ptr": "u8", "out_ptr": vt}, \
            dict(BLOCK_N=32, BLOCK_K=128), 4, 3, {}
    for bits, mode, it in ((8, 0, "i64"), (4, 1, "i32"), (4, 2, "i64")):
        yield "embedding_bag_rowwise", f"{bits}-bit mode {mode} {it}", eb._embedding_bag_rowwise_kernel, \
            {"w_ptr": "u8", "idx_ptr": it, "off_ptr": it, "psw_ptr": "fp32", "out_ptr": "fp32"}, \
            dict(BITS=bits, MODE=mode, HAS_PSW=mode == 0, BLOCK_L=16, BLOCK_D=128), 4, 3, {"enable_fp_fusion": False}


def run(index: int) -> dict:
    name, variant, kernel, pointers, constexprs, w, s, options = list(jobs())[index]
    try:
        result = compile_one(kernel, pointers, constexprs, w, s, **options)
    except Exception as e:  # reported, not raised: the test names every failure
        result = {"error": f"{type(e).__name__}: {str(e)[-400:]}"}
    return {"kernel": name, "variant": variant, **result}


def main() -> int:
    import multiprocessing

    with multiprocessing.Pool(min(2, os.cpu_count() or 1)) as pool:  # ~1 s per compile
        for result in pool.imap(run, range(len(list(jobs())))):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
