"""Compiles the Triton kernels for an NVIDIA target without a GPU (Triton's bundled LLVM and
ptxas), so that CI catches errors the interpreter cannot see (types that differ between the
branches of an ``if``, layouts, shared-memory use) and reports register spills.

    python -m fg_kernels.triton._compile_check [--arch 90] [--quick] [--ptxas-report]

Run it in a process where TRITON_INTERPRET is unset. Exit status 0 when every variant compiles.
The signatures mimic what a launch on contiguous CUDA tensors specialises (unit strides as
constants, 16-divisible pointers and sizes), so the generated code is the one a GPU would run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from ._launch import F64_GMM_CONFIG, F64_MTM_CONFIG, kernels

UNIT_STRIDES = {
    "gmm_kernel": ("stride_ak", "stride_bk", "stride_on", "stride_tr", "stride_lbr", "stride_xk"),
    "mtm_kernel": ("stride_ap", "stride_bq", "stride_oq"),
    "colsum_kernel": ("stride_dn", "stride_yn"),
}
NOT_DIVISIBLE = {"r_lora", "rows_per_split", "n0", "n1"}
INT_PTRS = ("idx", "cnt", "order", "n_out", "n_brow")
F32_PTRS = ("val", "part", "vals")


def _jit(k) -> JITFunction:
    while not isinstance(k, JITFunction):
        k = k.fn
    return k


def _types(dt: str, name: str) -> str:
    if name.endswith("_ptr"):
        if any(s in name for s in INT_PTRS):
            return "*i32"
        if any(s in name for s in F32_PTRS):  # gate values and partial sums: the accumulation dtype
            return "*fp64" if dt == "fp64" else "*fp32"
        return "*" + dt
    if name == "alpha":
        return "fp32"
    return "i32"


def compile_variant(kernel, dt: str, consts: dict, target: GPUTarget, num_warps: int, num_stages: int = 3):
    """``consts`` may carry launch options (``num_warps``, ``num_stages``) as a launch config does."""
    fn = _jit(kernel)
    consts = dict(consts)
    num_warps = consts.pop("num_warps", num_warps)
    num_stages = consts.pop("num_stages", num_stages)
    for name in UNIT_STRIDES.get(fn.__name__, ()):
        consts.setdefault(name, 1)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in consts else _types(dt, name)
        if sig[name].startswith("*") or (sig[name] == "i32" and name not in NOT_DIVISIBLE):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def variants(quick: bool):
    """(label, kernel name, dtype, constexprs, num_warps)."""
    out = []
    for dt in (("bf16",) if quick else ("bf16", "fp16", "fp32")):
        bk = 32 if dt == "fp32" else 64
        prec = "tf32" if dt == "fp32" else "ieee"
        gated = dict(K_GATHER_A=True, K_GATHER_B=True, K_DYN=True, K_IDENT_CHECK=True, N_GATHER=True,
                     N_IDENT_CHECK=True, HAS_KVAL=True, HAS_NVAL=True, HAS_BIAS=True, HAS_LORA=True, HAS_AUX=False,
                     STORE_OUT=True, IDX64=False, DOT_PREC=prec, BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, BLOCK_R=16,
                     GROUP_M=8)
        out.append((f"gated forward {dt}", "gmm_kernel", dt, gated, 8))
        out.append((f"gated dx+dgc {dt}", "gmm_kernel", dt, dict(gated, HAS_BIAS=False, HAS_AUX=True), 8))
        if not quick:
            out.append((f"lora pre-pass {dt}", "gmm_kernel", dt,
                        dict(gated, N_GATHER=False, N_IDENT_CHECK=False, HAS_NVAL=False, HAS_BIAS=False,
                             HAS_LORA=False, BLOCK_N=16), 4))
            out.append((f"gathered {dt}", "gmm_kernel", dt,
                        dict(gated, K_GATHER_B=False, K_DYN=False, K_IDENT_CHECK=False, N_IDENT_CHECK=False,
                             HAS_KVAL=False, HAS_NVAL=False, HAS_LORA=False), 8))
            out.append((f"gated forward int64 {dt}", "gmm_kernel", dt, dict(gated, IDX64=True), 8))
        out.append((f"weight grad {dt}", "mtm_kernel", dt,
                    dict(P_GATHER=True, Q_GATHER=True, HAS_PVAL=True, HAS_QVAL=True, IDX64=False, DOT_PREC=prec,
                         BLOCK_P=128, BLOCK_Q=128, BLOCK_K=bk, GROUP_P=8), 8))
        out.append((f"bias/row-gate sums {dt}", "colsum_kernel", dt,
                    dict(NEED_B=True, NEED_G=True, IDX64=False, BLOCK_M=32, BLOCK_N=128), 4))
    # float64 (gradcheck): products on the FMA units, in the tiles the launcher uses.
    f64 = dict(gated, DOT_PREC="ieee", **F64_GMM_CONFIG)
    out.append(("gated forward fp64", "gmm_kernel", "fp64", f64, 4))
    out.append(("gated dx+dgc fp64", "gmm_kernel", "fp64", dict(f64, HAS_BIAS=False, HAS_AUX=True), 4))
    out.append(("weight grad fp64", "mtm_kernel", "fp64",
                dict(P_GATHER=True, Q_GATHER=True, HAS_PVAL=True, HAS_QVAL=True, IDX64=False, DOT_PREC="ieee",
                     **F64_MTM_CONFIG), 4))
    out.append(("bias/row-gate sums fp64", "colsum_kernel", "fp64",
                dict(NEED_B=True, NEED_G=True, IDX64=False, BLOCK_M=32, BLOCK_N=128), 4))
    out.append(("gate metadata", "gate_meta_kernel", "fp32", dict(BLOCK=1024), 4))
    return out


def _ptxas_report(ptx: str, arch: int) -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for exe in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bindir, exe)
        if not os.path.exists(path):
            continue
        tmp = f"/tmp/fg_compile_check_{os.getpid()}.ptx"
        with open(tmp, "w") as f:
            f.write(ptx)
        r = subprocess.run([path, f"-arch=sm_{arch}{'a' if arch >= 90 else ''}", "-v", tmp, "-o", "/dev/null"],
                           capture_output=True, text=True)
        os.unlink(tmp)
        if r.returncode == 0:
            lines = [ln.strip() for ln in r.stderr.splitlines() if "registers" in ln or "spill" in ln]
            return "; ".join(lines)
    return "(no ptxas report)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ptxas-report", action="store_true")
    args = ap.parse_args(argv)
    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET to compile kernels", file=sys.stderr)
        return 2
    km = kernels(False)
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for label, name, dt, consts, warps in variants(args.quick):
        t = time.time()
        try:
            c = compile_variant(getattr(km, name), dt, consts, target, warps)
        except Exception as err:  # report every failure, not only the first
            failures += 1
            print(f"FAIL {label}: {type(err).__name__}: {str(err)[-2000:]}", flush=True)
            continue
        extra = ""
        if args.ptxas_report:
            extra = " | " + _ptxas_report(c.asm["ptx"], args.arch)
        print(f"ok   {label}: sm_{args.arch}, shared {c.metadata.shared} B, {time.time() - t:.1f}s{extra}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
