#!/usr/bin/env python
"""GPU benchmark of ``fg::gated_linear`` (the Triton kernels) on LLaMA-7B layer shapes.

    python bench/bench_gpu.py                      # 3 shapes x 4 sparsities, bf16, 8192 tokens
    python bench/bench_gpu.py --quick              # one shape, sparsity 0 and 0.4
    python bench/bench_gpu.py --markdown out.md --json out.json

Variants (docs/design.md, "Measuring speed"; the same definitions as bench/common.py, on CUDA):

``dense``          ``F.linear(x, W, b)``
``masked``         ``F.linear(x * g_c, W, b) * g_r`` (the reference FineGates code)
``compact-ideal``  the same computation on tensors gathered before timing: forward
                   ``F.linear(x[:, C] * g_c[C], W[R][:, C], b[R]) * g_r[R]``; forward+backward the
                   same graph on ``x[:, C]``, ``g_c[C]``, ... with autograd (cuBLAS: the floor).
                   The gathered widths |R| and |C| are padded with zero rows/columns (zero gates,
                   zero bias, zero grad_out) to a multiple of ``COMPACT_PAD`` = 16 elements, so
                   cuBLAS gets 16-byte-aligned leading dimensions, as a real compacted layer would
                   be sized: an odd width (4096 * 0.6 = 2458, 11008 * 0.6 = 6605) would make the
                   floor slower than it needs to be. Same math: the padding adds exact zeros only
                   (and < 16 rows/columns of work); the fg error check slices it off.
``fg``             ``torch.ops.fg.gated_linear(x, W, b, g_r, g_c)``

``fwd`` runs under ``no_grad``; ``fwd_bwd`` takes ``torch.autograd.grad`` for x, bias and both
gates (frozen weight) with a fixed random grad_out. Sparsity ``s`` zeroes exactly ``round(s*n)``
random rows and ``round(s*k)`` random columns. Every number is the median of
``triton.testing.do_bench`` and all ratios come from one run on the same inputs. The first call of
each variant (Triton compilation and autotuning) is made before timing.

Targets: fwd ``fg <= 1.10 x compact-ideal`` for s >= 0.2 and ``fg <= 1.05 x dense`` at s = 0;
fwd_bwd ``fg <= 1.15 x compact-ideal``. A missed target is a result, not an error: the exit status
is 0 once the run completes, 2 when it cannot run (no CUDA device, triton or compiled library).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SHAPES = (("LLaMA-7B", 4096, 4096), ("LLaMA-7B", 4096, 11008), ("LLaMA-7B", 11008, 4096))
SPARSITIES = (0.0, 0.2, 0.4, 0.6)
VARIANTS = ("dense", "masked", "compact-ideal", "fg")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"
# compact-ideal operands are zero-padded to a multiple of this many elements (aligned cuBLAS ld).
COMPACT_PAD = 16


def _padded(n: int) -> int:
    return -(-n // COMPACT_PAD) * COMPACT_PAD


def _pad(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """``t`` zero-padded at the end of its last ``len(sizes)`` dims to ``sizes``; contiguous."""
    spec = []
    for dim, size in zip(range(t.dim() - 1, -1, -1), reversed(sizes)):
        spec += [0, size - t.shape[dim]]
    return F.pad(t, spec).contiguous()


def _gate(n: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    vals = 1.0 - 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)  # (0.5, 1]
    vals[torch.randperm(n, generator=gen)[: int(round(sparsity * n))]] = 0.0
    return vals


def make_case(k: int, n: int, m: int, sparsity: float, dtype: torch.dtype, seed: int = 0) -> dict:
    dev = DEVICE
    g = torch.Generator().manual_seed(seed * 1000003 + k * 31 + n)
    c = {
        "x": torch.randn(m, k, generator=g).to(dev, dtype),
        "weight": (torch.randn(n, k, generator=g) / k**0.5).to(dev, dtype),
        "bias": (0.1 * torch.randn(n, generator=g)).to(dev, dtype),
        "grad_out": torch.randn(m, n, generator=g).to(dev, dtype),
    }
    gg = torch.Generator().manual_seed(seed * 7919 + int(sparsity * 1000))
    c["row_gate"] = _gate(n, sparsity, gg).to(dev, dtype)
    c["col_gate"] = _gate(k, sparsity, gg).to(dev, dtype)
    R = torch.nonzero(c["row_gate"]).flatten()
    C = torch.nonzero(c["col_gate"]).flatten()
    c["R"], c["C"] = R, C
    # compact-ideal operands: gathered, then zero-padded to aligned widths rp >= |R|, cp >= |C|.
    rp, cp = _padded(R.numel()), _padded(C.numel())
    c["xc"] = _pad(c["x"].index_select(1, C), cp)
    c["gc_c"] = _pad(c["col_gate"].index_select(0, C), cp)
    c["xcg"] = (c["xc"] * c["gc_c"]).contiguous()
    c["weight_c"] = _pad(c["weight"].index_select(0, R).index_select(1, C), rp, cp)
    c["bias_c"] = _pad(c["bias"].index_select(0, R), rp)
    c["gr_c"] = _pad(c["row_gate"].index_select(0, R), rp)
    c["grad_out_c"] = _pad(c["grad_out"].index_select(1, R), rp)
    c["active_fraction"] = (R.numel() / n) * (C.numel() / k)
    return c


def make_fn(variant: str, mode: str, c: dict):
    op = torch.ops.fg.gated_linear
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    if mode == "fwd":
        if variant == "dense":
            body = lambda: F.linear(c["x"], c["weight"], c["bias"])  # noqa: E731
        elif variant == "masked":
            body = lambda: F.linear(c["x"] * c["col_gate"], c["weight"], c["bias"]) * c["row_gate"]  # noqa: E731
        elif variant == "compact-ideal":
            body = lambda: F.linear(c["xcg"], c["weight_c"], c["bias_c"]).mul_(c["gr_c"])  # noqa: E731
        else:
            body = lambda: op(c["x"], c["weight"], c["bias"], c["row_gate"], c["col_gate"])  # noqa: E731

        def run():
            with torch.no_grad():
                return body()

        return run
    if variant == "compact-ideal":
        xl, bl, grl, gcl = leaf(c["xc"]), leaf(c["bias_c"]), leaf(c["gr_c"]), leaf(c["gc_c"])

        def run():
            y = F.linear(xl * gcl, c["weight_c"], bl) * grl
            return torch.autograd.grad(y, (xl, bl, grl, gcl), c["grad_out_c"])

        return run
    xl, bl, grl, gcl = leaf(c["x"]), leaf(c["bias"]), leaf(c["row_gate"]), leaf(c["col_gate"])
    if variant == "dense":

        def run():
            y = F.linear(xl, c["weight"], bl)
            return torch.autograd.grad(y, (xl, bl), c["grad_out"])

    elif variant == "masked":

        def run():
            y = F.linear(xl * gcl, c["weight"], bl) * grl
            return torch.autograd.grad(y, (xl, bl, grl, gcl), c["grad_out"])

    else:

        def run():
            y = op(xl, c["weight"], bl, grl, gcl)
            return torch.autograd.grad(y, (xl, bl, grl, gcl), c["grad_out"])

    return run


def check_fg(c: dict, mode: str) -> float:
    """Relative error of fg against compact-ideal (padding sliced off, scattered to full size)."""
    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    got = make_fn("fg", mode, c)()
    ref = make_fn("compact-ideal", mode, c)()
    R, C = c["R"], c["C"]
    nr, nc = R.numel(), C.numel()
    if mode == "fwd":
        full = torch.zeros_like(got)
        full[:, R] = ref[:, :nr]
        return rel(got, full)
    dx = torch.zeros_like(got[0])
    dx[:, C] = ref[0][:, :nc]
    errs = [rel(got[0], dx), rel(got[1][R], ref[1][:nr]), rel(got[2][R], ref[2][:nr]),
            rel(got[3][C], ref[3][:nc])]
    return max(errs)


def _measure(shapes, sparsities, modes, dtype, args, do_bench, results: list) -> None:
    """Times every variant for each shape, sparsity and mode; appends one row per (shape, s, mode)
    to ``results`` as soon as it is complete (so an interrupted run keeps what it measured)."""
    for model, k, n in shapes:
        for s in sparsities:
            c = make_case(k, n, args.tokens, s, dtype)
            for mode in modes:
                row = {"shape": f"{model} {k}->{n}", "sparsity": s, "mode": mode,
                       "active_fraction": c["active_fraction"]}
                row["fg_err"] = check_fg(c, mode)
                for v in VARIANTS:
                    fn = make_fn(v, mode, c)
                    fn()  # compile / autotune outside the timing
                    torch.cuda.synchronize()
                    row[v] = do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
                row["fg/compact-ideal"] = row["fg"] / row["compact-ideal"]
                row["fg/dense"] = row["fg"] / row["dense"]
                row["masked/fg"] = row["masked"] / row["fg"]
                if mode == "fwd":
                    target = ("fg/dense", 1.05) if s == 0 else ("fg/compact-ideal", 1.10)
                else:
                    target = ("fg/compact-ideal", 1.15)
                row["target"] = f"{target[0]} <= {target[1]}"
                row["meets"] = row[target[0]] <= target[1]
                results.append(row)
                print(f"{row['shape']:<22} s={s:<4} {mode:<8} " + " ".join(
                    f"{v}={row[v]:.3f}ms" for v in VARIANTS) + f"  fg/ci={row['fg/compact-ideal']:.3f} "
                    f"fg/dense={row['fg/dense']:.3f} masked/fg={row['masked/fg']:.2f} "
                    f"err={row['fg_err']:.1e} {'OK' if row['meets'] else 'MISS'} ({row['target']})", flush=True)
            del c
            torch.cuda.empty_cache()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--quick", action="store_true", help="4096->11008 only, sparsity 0 and 0.4")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables as markdown here")
    ap.add_argument("--json", type=Path, default=None, help="also write raw results as JSON here")
    return ap.parse_args(argv)


def _missing_requirement():
    """Why this machine cannot run the benchmark (None when it can), and do_bench when it can."""
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False); nothing measured.", None
    try:
        from triton.testing import do_bench
    except ImportError:
        return "triton is not installed; the CUDA kernels of fg are Triton kernels.", None
    import fg_kernels
    from fg_kernels import cuda_registration

    if not fg_kernels.library_loaded() or not cuda_registration.register():
        return "fg_kernels is not built or its CUDA kernels are not registered.", None
    return None, do_bench


def render_tables(header: str, results, modes) -> str:
    lines = [header, ""]
    for mode in modes:
        lines += [f"### {mode}", "",
                  "| shape | sparsity | dense ms | masked ms | compact-ideal ms | fg ms | fg / compact-ideal "
                  "| fg / dense | masked / fg | fg rel err | target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            if r["mode"] != mode:
                continue
            lines.append(
                f"| {r['shape']} | {r['sparsity']} | {r['dense']:.3f} | {r['masked']:.3f} | "
                f"{r['compact-ideal']:.3f} | {r['fg']:.3f} | {r['fg/compact-ideal']:.3f} | {r['fg/dense']:.3f} | "
                f"{r['masked/fg']:.2f} | {r['fg_err']:.1e} | {r['target']}: {'met' if r['meets'] else 'MISSED'} |"
            )
        lines.append("")
    return "\n".join(lines)


def _measure_all(shapes, sparsities, modes, dtype, args, do_bench, results):
    """Runs the grid into ``results``; ``(exit status, why it stopped early or "")``: the rows
    measured before an interruption or a kernel error are kept."""
    try:
        _measure(shapes, sparsities, modes, dtype, args, do_bench, results)
    except KeyboardInterrupt:  # e.g. a time limit (timeout -s INT)
        return 130, "interrupted"
    except Exception:  # a kernel error: report it, keep what was measured
        import traceback

        traceback.print_exc()
        return 1, "stopped by an error (see the log)"
    return 0, ""


def main(argv=None) -> int:
    args = parse_args(argv)
    missing, do_bench = _missing_requirement()
    if missing:
        print(f"bench_gpu.py: {missing}")
        return 2
    import triton

    dtype = DTYPES[args.dtype]
    shapes = (SHAPES[1],) if args.quick else SHAPES
    sparsities = (0.0, 0.4) if args.quick else SPARSITIES
    modes = [m for m in args.modes.split(",") if m]
    header = (f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
              f"python {platform.python_version()}; dtype {args.dtype}; tokens {args.tokens}; medians of do_bench; "
              f"compact-ideal zero-padded to a multiple of {COMPACT_PAD}")
    print(header, flush=True)
    results = []
    status, stopped = _measure_all(shapes, sparsities, modes, dtype, args, do_bench, results)
    if stopped:
        print(f"bench_gpu.py: {stopped} after {len(results)} rows", flush=True)
        header += f"; INCOMPLETE: {stopped} after {len(results)} rows"
    table = render_tables(header, results, modes)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "compact_pad": COMPACT_PAD, "complete": not stopped,
                                         "results": results}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
