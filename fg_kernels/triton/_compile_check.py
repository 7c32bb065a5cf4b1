"""Compiles the Triton kernels for an NVIDIA target without a GPU (Triton's bundled LLVM and
ptxas), so that CI catches errors the interpreter cannot see (types that differ between the
branches of an ``if``, layouts, shared-memory use) and reports what the GPU will run.

    python -m fg_kernels.triton._compile_check [--arch 90] [--quick] [--ptxas-report] [--layouts] [--strict]

Run it in a process where TRITON_INTERPRET is unset. Exit status 0 when every variant compiles.
The signatures mimic what a launch on contiguous CUDA tensors specialises (unit strides as
constants, 16-divisible pointers and sizes), so the generated code is the one a GPU would run.

``--ptxas-report``: registers and stack from the compiled cubin (``cuobjdump``), spill bytes and
serialized-wgmma warnings (C7515) from the ptxas this Triton uses for the arch. ``--layouts``: a line
per tensor-of-pointers global access (source line, rank, thread layout from the TTGIR). A 2-D access
that no thread holds a vector of (``sizePerThread`` all 1) has addresses the compiler could not prove
contiguous: which way its lanes run is then the Triton version's choice (one lane per row under 3.6),
so ``--strict`` fails on it, as on a spill or a C7515 (float64 variants, which serve gradcheck only,
are reported but not counted).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import torch

from ._launch import PACK_CONFIG, _gmm_fixed_config, _mtm_fixed_config, kernel_module

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
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
ACCESS = re.compile(r"tt\.(load|store) .*: tensor<([0-9x]+)x!tt\.ptr<(\w+)>, (#.+)> loc\(#(loc\d*)\)")
BLOCKED = re.compile(r"^(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = "
                     r"\[([\d, ]+)\], warpsPerCTA = \[[\d, ]+\], order = \[([\d, ]+)\]")
LOC_FILE = re.compile(r'^#(loc\d*) = loc\("([^"]+)":(\d+):\d+\)')
LOC_CALL = re.compile(r"^#(loc\d*) = loc\(callsite\(#(loc\d*) at #(loc\d*)\)\)")
LOC_REF = re.compile(r"^#(loc\d*) = loc\(.*?#(loc\d*)")


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
    lora = dict(HAS_NVAL=False, HAS_BIAS=False, HAS_LORA=False, BLOCK_N=16, num_warps=4)  # a narrow tile: 4 warps
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


# (label suffix, dtype, dot precision): float32 as with TF32 allowed and as PyTorch's default ("ieee").
PRECISIONS = (("bf16", "bf16", "ieee"), ("fp16", "fp16", "ieee"), ("fp32", "fp32", "tf32"),
              ("fp32-ieee", "fp32", "ieee"), ("fp64", "fp64", "ieee"))


def variants(quick: bool, all_configs: bool = False):
    """(label, kernel name, dtype, constexprs with launch options). By default the tiles of the
    launcher's fixed configurations (FG_TRITON_AUTOTUNE=0, float64); ``all_configs``: the GEMMs
    once per autotuning config too."""
    km = kernel_module(False)
    out = []
    for tag, dt, prec in (PRECISIONS[:1] if quick else PRECISIONS):
        dtype = DTYPES[dt]
        gmm = _gmm_variants(dict(_gmm_fixed_config(km, 4096, dtype), DOT_PREC=prec))
        mtm = _mtm_variants(dict(_mtm_fixed_config(km, dtype), DOT_PREC=prec))
        if quick:
            gmm = [v for v in gmm if "lora" not in v[0] and "int64" not in v[0]]
        for label, name, consts in gmm + mtm:
            out.append((f"{label} {tag}", name, dt, consts))
            if all_configs and dt != "fp64" and "lora" not in label and "int64" not in label:
                for cfg in _autotune_configs(km, name, dt):
                    tiles = "x".join(str(v) for v in cfg.values())
                    out.append((f"{label} {tag} [{tiles}]", name, dt, dict(consts, **cfg)))
        if tag == dt:  # no dot: one variant per dtype
            out.append((f"bias/row-gate sums {dt}", "colsum_kernel", dt,
                        dict(NEED_B=True, NEED_G=True, IDX64=False, BLOCK_M=32, BLOCK_N=128, num_warps=4)))
            if dt != "fp64":
                for label, name, consts in _pack_variants():
                    out.append((f"{label} {dt}", name, dt, consts))
    out.append(("gate metadata", "gate_meta_kernel", "fp32", dict(BLOCK=1024, num_warps=4)))
    return out


def _tool(name: str, arch: int) -> str:
    """The path of the ptxas this Triton compiles ``arch`` with, or of its cuobjdump."""
    from triton import knobs
    from triton.backends.nvidia import compiler

    if name == "ptxas":
        return compiler.get_ptxas(arch).path
    return knobs.nvidia.cuobjdump.path


def _run_on(data, suffix: str, command) -> subprocess.CompletedProcess:
    fd, tmp = tempfile.mkstemp(prefix="fg_compile_check_", suffix=suffix)
    with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    try:
        return subprocess.run([*command, tmp], capture_output=True, text=True)
    finally:
        os.unlink(tmp)


def _ptxas_report(compiled, arch: int):
    """(summary, problems): registers and stack of the cubin, spills and C7515 from ptxas -v."""
    r = _run_on(compiled.asm["ptx"], ".ptx", [_tool("ptxas", arch), f"-arch=sm_{arch}{'a' if arch >= 90 else ''}",
                                              "-v", "-o", "/dev/null"])
    if r.returncode != 0:
        return f"(ptxas failed: {r.stderr.strip()[-300:]})", ["ptxas failed"]
    spills = sorted({int(m.group(1)) for m in SPILL.finditer(r.stderr)})
    problems = [f"spills {max(spills)} B"] if spills else []
    if SERIALIZED_WGMMA in r.stderr:
        problems.append("C7515 serialized wgmma")
    res = RESOURCES.search(_run_on(compiled.asm["cubin"], ".cubin", [_tool("cuobjdump", arch),
                                                                     "--dump-resource-usage"]).stdout)
    regs = f"{res.group(1)} registers, stack {res.group(2)} B" if res else "(no cuobjdump report)"
    return f"{regs}, " + (", ".join(problems) or "no spill"), problems


def _source_lines(ttgir: str):
    """#loc name -> "file:line" of the access, with the kernel's own line where it is in a helper."""
    direct, calls, refs = {}, {}, {}
    for line in ttgir.splitlines():
        if m := LOC_FILE.match(line):
            direct[m.group(1)] = f"{os.path.basename(m.group(2))}:{m.group(3)}"
        elif m := LOC_CALL.match(line):
            calls[m.group(1)] = (m.group(2), m.group(3))
        elif m := LOC_REF.match(line):
            refs[m.group(1)] = m.group(2)

    def resolve(loc, outer: bool, depth=0):
        if depth > 64 or loc is None:
            return None
        if loc in direct:
            return direct[loc]
        if loc in calls:
            return resolve(calls[loc][1 if outer else 0], outer, depth + 1)
        return resolve(refs.get(loc), outer, depth + 1)

    def where(loc):
        inner, outer = resolve(loc, False), resolve(loc, True)
        return inner if inner == outer or outer is None else f"{inner} (called at {outer})"

    return where


def access_layouts(ttgir: str):
    """(description, problem or None) per tensor-of-pointers global load and store of a kernel."""
    blocked = {m.group(1): tuple(tuple(int(v) for v in m.group(i).split(",")) for i in (2, 3, 4))
               for m in map(BLOCKED.match, ttgir.splitlines()) if m}
    where = _source_lines(ttgir)
    out = []
    for m in ACCESS.finditer(ttgir):
        op, shape, layout, loc = m.group(1), m.group(2), m.group(4), m.group(5)
        rank = shape.count("x") + 1
        at = where(loc) or loc
        if layout not in blocked:  # a slice of another layout: a vector of indices or gate values
            out.append((f"{op} {at} {shape} {layout}" + (" (1-D)" if rank == 1 else " (not a blocked layout)"), None))
            continue
        per_thread, lanes, order = blocked[layout]
        desc = f"{op} {at} {shape} sizePerThread={list(per_thread)} threadsPerWarp={list(lanes)} order={list(order)}"
        if rank == 1:
            out.append((desc + ": 1-D, consecutive lanes on consecutive elements", None))
        elif per_thread[order[0]] > 1:
            out.append((desc + f": vectors along dim {order[0]}", None))
        else:
            problem = f"{op} {at}: addresses not provably contiguous, lanes along dim {order[0]} by the Triton version"
            out.append((desc + ": lanes across rows" if order[0] != rank - 1 else desc + ": no vector", problem))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="bfloat16 and the main launches only")
    ap.add_argument("--ptxas-report", action="store_true", help="registers, stack, spills and C7515 per variant")
    ap.add_argument("--layouts", action="store_true", help="the thread layout of every gathered/scattered access")
    ap.add_argument("--all-configs", action="store_true", help="also every autotuning config of the GEMMs")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 on a spill, a C7515 or an access whose lanes the Triton version chooses "
                         "(implies --ptxas-report and --layouts; float64 variants are not counted)")
    args = ap.parse_args(argv)
    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET to compile kernels", file=sys.stderr)
        return 2
    km = kernel_module(False)
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, sm_{args.arch}, ptxas {_tool('ptxas', args.arch)}", flush=True)
    failures, flagged = 0, 0
    for label, name, dt, consts in variants(args.quick, args.all_configs):
        t = time.time()
        try:
            c = compile_variant(getattr(km, name), dt, consts, target)
        except Exception as err:  # report every failure, not only the first
            failures += 1
            print(f"FAIL {label}: {type(err).__name__}: {str(err)[-2000:]}", flush=True)
            continue
        problems, extra = [], ""
        if args.ptxas_report or args.strict:
            summary, found = _ptxas_report(c, args.arch)
            problems += found
            extra = " | " + summary
        accesses = access_layouts(c.asm["ttgir"]) if (args.layouts or args.strict) else []
        problems += [p for _, p in accesses if p]
        counted = bool(problems) and dt != "fp64"
        flagged += counted
        mark = "FLAG" if counted else "ok  "
        print(f"{mark} {label}: sm_{args.arch}, shared {c.metadata.shared} B, {time.time() - t:.1f}s{extra}", flush=True)
        for desc, problem in accesses:
            print(f"       {'!' if problem else ' '} {desc}", flush=True)
    if flagged:
        print(f"{flagged} variant(s) with a spill, a serialized wgmma (C7515) or an access whose lanes the "
              "Triton version chooses", flush=True)
    return 1 if failures or (args.strict and flagged) else 0


if __name__ == "__main__":
    sys.exit(main())
