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
import re
import subprocess
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import torch

from ._launch import PACK_CONFIG, _gmm_fixed_config, _mtm_fixed_config, kernels

UNIT_STRIDES = {
    "gmm_full_kernel": ("stride_ak", "stride_bk", "stride_on", "stride_tr", "stride_lbr", "stride_xk"),
    "gmm_compact_kernel": ("stride_ak", "stride_bk", "stride_on", "stride_tr", "stride_lbr", "stride_xk"),
    "mtm_kernel": ("stride_ap", "stride_bq", "stride_oq"),
    "colsum_kernel": ("stride_dn", "stride_yn"),
    "pack_kernel": ("stride_sc", "stride_dc"),
}
NOT_DIVISIBLE = {"r_lora", "rows_per_split", "n0", "n1", "k_len"}
INT_PTRS = ("idx", "cnt", "order", "n_brow")
F32_PTRS = ("val", "part", "vals")
# ptxas findings that count as failures with --strict: register spills and serialized wgmma.
SPILL = re.compile(r"([1-9][0-9]*) bytes spill (stores|loads)")
SERIALIZED_WGMMA = "C7515"


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


def compile_variant(kernel, dt: str, consts: dict, target: GPUTarget, num_warps: int = 4, num_stages: int = 3):
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


def _gmm_variants(tiles: dict):
    """(label, kernel, constexprs, num_warps) of every gmm launch the ops make, in ``tiles``."""
    epi = dict(HAS_NVAL=True, HAS_BIAS=True, HAS_LORA=True, HAS_AUX=False, STORE_OUT=True, IDX64=False,
               BLOCK_R=16, **tiles)
    full = dict(epi, ROUTE=1, HAS_KVAL=True)
    compact = dict(epi, ROUTE=2, K_DYN=True, N_SCATTER=True, B_ROW_GATHER=False)
    dx = dict(HAS_BIAS=False, HAS_AUX=True)
    lora = dict(HAS_NVAL=False, HAS_BIAS=False, HAS_LORA=False, BLOCK_N=16)
    return [
        ("forward, all open", "gmm_full_kernel", full),
        ("dx+dgc, all open", "gmm_full_kernel", dict(full, **dx)),
        ("forward, compact", "gmm_compact_kernel", compact),
        ("dx+dgc, compact", "gmm_compact_kernel", dict(compact, **dx)),
        ("forward int64, compact", "gmm_compact_kernel", dict(compact, IDX64=True)),
        ("lora pre-pass, all open", "gmm_full_kernel", dict(full, **lora)),
        ("lora pre-pass, compact", "gmm_compact_kernel", dict(compact, N_SCATTER=False, **lora)),
        ("gathered", "gmm_compact_kernel", dict(compact, ROUTE=0, K_DYN=False, B_ROW_GATHER=True, HAS_NVAL=False,
                                                HAS_LORA=False)),
    ]


def _mtm_variants(tiles: dict):
    return [
        ("weight grad, all open", "mtm_kernel",
         dict(tiles, IDX64=False, ROUTE=1, P_SCATTER=False, Q_SCATTER=False, HAS_PVAL=True, HAS_QVAL=True)),
        ("weight grad, compact", "mtm_kernel",
         dict(tiles, IDX64=False, ROUTE=2, P_SCATTER=True, Q_SCATTER=True, HAS_PVAL=False, HAS_QVAL=False)),
    ]


def _pack_variants():
    tiles = dict(IDX64=False, **PACK_CONFIG)
    cols = dict(ROW_GATHER=False, ROW_DYN=False, HAS_RVAL=False, COL_GATHER=True, COL_DYN=True, HAS_CVAL=True)
    both = dict(ROW_GATHER=True, ROW_DYN=True, HAS_RVAL=False, COL_GATHER=True, COL_DYN=True, HAS_CVAL=False)
    return [
        ("pack x * g_c", "pack_kernel", dict(tiles, ROUTE=2, **cols)),
        ("pack W[R][:, C]", "pack_kernel", dict(tiles, ROUTE=2, **both)),
    ]


def _autotune_configs(km, kernel_name: str, dt: str):
    """(BLOCK_*, num_warps, num_stages) dicts of every autotuning config the kernel keeps for dt."""
    table, names = ((km.MTM_CONFIGS, ("BLOCK_P", "BLOCK_Q", "BLOCK_K")) if kernel_name == "mtm_kernel"
                    else (km.GMM_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
    elem = 4 if dt == "fp32" else 2
    for b0, b1, bk, w, st in table:
        if km.fits_shared(b0, b1, bk, st, elem):
            yield {names[0]: b0, names[1]: b1, names[2]: bk, "num_warps": w, "num_stages": st}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def variants(quick: bool, all_configs: bool = False):
    """(label, kernel name, dtype, constexprs with launch options). By default the tiles of the
    launcher's fixed configurations (FG_TRITON_AUTOTUNE=0, float64); ``all_configs``: the GEMMs
    once per autotuning config too."""
    km = kernels(False)
    out = []
    for dt in (("bf16",) if quick else ("bf16", "fp16", "fp32", "fp64")):
        dtype = DTYPES[dt]
        prec = "tf32" if dt == "fp32" else "ieee"
        gmm = _gmm_variants(dict(_gmm_fixed_config(km, 4096, dtype), DOT_PREC=prec))
        mtm = _mtm_variants(dict(_mtm_fixed_config(km, dtype), DOT_PREC=prec))
        if quick:
            gmm = [v for v in gmm if "lora" not in v[0] and "int64" not in v[0]]
        for label, name, consts in gmm + mtm:
            out.append((f"{label} {dt}", name, dt, consts))
            if all_configs and dt != "fp64" and "lora" not in label and "int64" not in label:
                for cfg in _autotune_configs(km, name, dt):
                    tag = "x".join(str(v) for v in cfg.values())
                    out.append((f"{label} {dt} [{tag}]", name, dt, dict(consts, **cfg)))
        out.append((f"bias/row-gate sums {dt}", "colsum_kernel", dt,
                    dict(NEED_B=True, NEED_G=True, IDX64=False, BLOCK_M=32, BLOCK_N=128, num_warps=4)))
        if dt != "fp64":
            for label, name, consts in _pack_variants():
                out.append((f"{label} {dt}", name, dt, consts))
    out.append(("gate metadata", "gate_meta_kernel", "fp32", dict(BLOCK=1024, num_warps=4)))
    return out


def _ptxas_report(ptx: str, arch: int):
    """(summary, problems) from ptxas -v on the PTX: registers, spill bytes, C7515 warnings."""
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
            regs = re.search(r"Used (\d+) registers", r.stderr)
            spills = sorted({int(m.group(1)) for m in SPILL.finditer(r.stderr)})
            problems = [f"spills {max(spills)} B"] if spills else []
            if SERIALIZED_WGMMA in r.stderr:
                problems.append("C7515 serialized wgmma")
            summary = f"{regs.group(1) if regs else '?'} registers, " + (", ".join(problems) or "no spill")
            return summary, problems
    return "(no ptxas report)", []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="bfloat16 and the main launches only")
    ap.add_argument("--ptxas-report", action="store_true", help="registers, spills and C7515 per variant")
    ap.add_argument("--all-configs", action="store_true", help="also every autotuning config of the GEMMs")
    ap.add_argument("--strict", action="store_true", help="exit 1 on a spill or a C7515 (implies --ptxas-report)")
    args = ap.parse_args(argv)
    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET to compile kernels", file=sys.stderr)
        return 2
    km = kernels(False)
    target = GPUTarget("cuda", args.arch, 32)
    failures, flagged = 0, 0
    for label, name, dt, consts in variants(args.quick, args.all_configs):
        t = time.time()
        try:
            c = compile_variant(getattr(km, name), dt, consts, target)
        except Exception as err:  # report every failure, not only the first
            failures += 1
            print(f"FAIL {label}: {type(err).__name__}: {str(err)[-2000:]}", flush=True)
            continue
        extra = ""
        if args.ptxas_report or args.strict:
            summary, problems = _ptxas_report(c.asm["ptx"], args.arch)
            flagged += bool(problems)
            extra = " | " + summary
        print(f"ok   {label}: sm_{args.arch}, shared {c.metadata.shared} B, {time.time() - t:.1f}s{extra}", flush=True)
    if flagged:
        print(f"{flagged} variant(s) with a spill or a serialized wgmma (C7515)", flush=True)
    return 1 if failures or (args.strict and flagged) else 0


if __name__ == "__main__":
    sys.exit(main())
