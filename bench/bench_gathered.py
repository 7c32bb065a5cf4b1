#!/usr/bin/env python
"""``fg::gathered_linear`` (CPU) against the GEMM on the pre-gathered compact block.

    python bench/bench_gathered.py --quick             # 3 small cases (~20 s)
    python bench/bench_gathered.py                     # the grid below (~3 min)
    python bench/bench_gathered.py --write-results     # same, and rewrite bench/RESULTS_GATHERED.md

``fg::gathered_linear(x, weight_c, bias_c, row_idx, col_idx, N)`` computes
``y[:, R] = x[:, C] @ weight_c.T + bias_c`` (other columns 0). Per case (shape K -> N, tokens M,
sparsity s = the fraction of rows and of columns removed, each a seeded random subset) these run
interleaved in one process on the same inputs:

``dense``          ``F.linear(x, W, b)`` on the full layer (for information).
``compact-ideal``  ``F.linear(x[:, C], W[R][:, C], b[R])`` on tensors gathered before timing: the GEMM
                   on the compact block.
``gather``         ``x.index_select(1, C)`` alone: the unavoidable read of x's active columns.
``scatter``        ``torch.zeros(M, N).index_copy_(1, R, h)`` alone (h = a precomputed compact
                   result): the stock way to place the result, zeros included.
``write``          ``torch.zeros(M, N)`` alone: just the write of the full-width output (a strict
                   stand-in for the unavoidable part of the scatter).
``fg[rc]``         the op with row_idx and col_idx (gather and scatter).
``fg[c]``          col_idx only (row_idx=None: compact output), as an MLP up-projection.
``fg[r]``          row_idx only (col_idx=None: x already compact), as an MLP down-projection.
``composed``       the stock composition ``zeros.index_copy_(1, R, F.linear(x.index_select(1, C), ..))``.

Bars (target ``fg / bar <= 1.05``): rc: compact-ideal + gather + scatter; c: compact-ideal + gather;
r: compact-ideal + scatter, each a sum of medians from the same run. Strict bars (no target, for
information) replace the scatter by the bare output write: rc: compact-ideal + gather + write. Every ratio is a ratio of
medians from one run. ``other load`` = share of the CPUs used by other processes during the case.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from bench.harness import (  # noqa: E402
    BENCH_DIR, OtherLoad, environment_record, hold_machine, stats, time_interleaved, timing_flags, command_line,
)

RESULTS = BENCH_DIR / "RESULTS_GATHERED.md"
THREADS = 2
BOUND = 1.05
SPARSITIES = (0.2, 0.4)
MODES = ("rc", "c", "r")


@dataclass(frozen=True)
class GShape:
    model: str
    k: int
    n: int
    m: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.k}\u2192{self.n}, M={self.m}"


# Op-benchmark shapes (bench/common.py SHAPES, 2048 tokens) and the shapes compaction produces
# (MiniLM: 384 <-> 1536, LLaMA-130M: 768 <-> 2048) at batch 1 and 8 x 128 tokens.
SHAPES: Tuple[GShape, ...] = (
    GShape("RoBERTa-base", 768, 768, 2048),
    GShape("RoBERTa-base", 768, 3072, 2048),
    GShape("RoBERTa-base", 3072, 768, 2048),
    *(GShape("MiniLM", k, n, m) for m in (128, 1024) for k, n in ((384, 384), (384, 1536), (1536, 384))),
    *(GShape("LLaMA-130M", k, n, m) for m in (128, 1024) for k, n in ((768, 768), (768, 2048), (2048, 768))),
)
LARGE_SHAPES: Tuple[GShape, ...] = (GShape("LLaMA-1B", 2048, 8192, 2048), GShape("LLaMA-1B", 8192, 2048, 2048))
QUICK_SHAPES: Tuple[GShape, ...] = (GShape("MiniLM", 384, 1536, 128), GShape("LLaMA-130M", 2048, 768, 1024))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_inputs(shape: GShape, s: float, seed: int = 0) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + shape.k * 7919 + shape.n * 31 + shape.m + int(s * 100))
    x = torch.randn(shape.m, shape.k, generator=g)
    w = torch.randn(shape.n, shape.k, generator=g) / shape.k ** 0.5
    b = 0.1 * torch.randn(shape.n, generator=g)
    R = torch.sort(torch.randperm(shape.n, generator=g)[: shape.n - int(round(s * shape.n))]).values
    C = torch.sort(torch.randperm(shape.k, generator=g)[: shape.k - int(round(s * shape.k))]).values
    wc = w.index_select(0, R).index_select(1, C).contiguous()
    bc = b.index_select(0, R).contiguous()
    xc = x.index_select(1, C).contiguous()
    return dict(x=x, w=w, b=b, R=R, C=C, wc=wc, bc=bc, xc=xc, h=F.linear(xc, wc, bc))


def make_callables(inp: Dict[str, Tensor], shape: GShape) -> Dict[str, Callable[[], Tensor]]:
    import fg_kernels  # noqa: F401  (registers torch.ops.fg.*)

    op = torch.ops.fg.gathered_linear
    x, w, b, R, C, wc, bc, xc, h = (inp[k] for k in ("x", "w", "b", "R", "C", "wc", "bc", "xc", "h"))
    M, N, nR = shape.m, shape.n, R.numel()
    fns = {
        "dense": lambda: F.linear(x, w, b),
        "compact-ideal": lambda: F.linear(xc, wc, bc),
        "gather": lambda: x.index_select(1, C),
        "scatter": lambda: torch.zeros(M, N).index_copy_(1, R, h),
        "write": lambda: torch.zeros(M, N),
        "fg[rc]": lambda: op(x, wc, bc, R, C, N),
        "fg[c]": lambda: op(x, wc, bc, None, C, nR),
        "fg[r]": lambda: op(xc, wc, bc, R, None, N),
        "composed": lambda: torch.zeros(M, N).index_copy_(1, R, F.linear(x.index_select(1, C), wc, bc)),
    }

    def nograd(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    return {k: nograd(f) for k, f in fns.items()}


def check(inp, shape) -> Dict[str, float]:
    """fg against the stock composition: relative error per mode."""
    fns = make_callables(inp, shape)
    ref = fns["composed"]()
    errs = {}
    for mode, want in (("rc", ref), ("c", inp["h"]), ("r", ref)):
        got = fns[f"fg[{mode}]"]()
        errs[mode] = float(torch.linalg.vector_norm(got.double() - want.double()) / torch.linalg.vector_norm(want.double()))
    return errs


def bars(med: Dict[str, float]) -> Dict[str, float]:
    ci = med["compact-ideal"]
    return {"rc": ci + med["gather"] + med["scatter"], "c": ci + med["gather"], "r": ci + med["scatter"]}


def run_case(shape: GShape, s: float, args) -> Dict[str, object]:
    inp = make_inputs(shape, s, args.seed)
    errs = check(inp, shape)
    fns = make_callables(inp, shape)
    with OtherLoad() as load:
        times, rounds = time_interleaved(fns, args.warmup, args.budget, args.min_rounds, args.max_rounds)
    tm = {k: [v * 1e3 for v in ts] for k, ts in times.items()}
    st = {k: stats(v) for k, v in tm.items()}
    med = {k: v["median"] for k, v in st.items()}
    bar = bars(med)
    ratios = {m: med[f"fg[{m}]"] / bar[m] for m in MODES}
    strict = med["fg[rc]"] / (med["compact-ideal"] + med["gather"] + med["write"])
    case = dict(
        shape=shape.label, model=shape.model, k=shape.k, n=shape.n, m=shape.m, sparsity=s,
        active_rows=int(inp["R"].numel()), active_cols=int(inp["C"].numel()), rel_err=errs,
        ok=all(e <= 1e-5 for e in errs.values()), rounds=rounds, other_load=load.fraction, times_ms=tm,
        median_ms=med, bar_ms=bar, fg_over_bar=ratios, fg_rc_over_strict_bar=strict,
        fg_over_ci={m: med[f"fg[{m}]"] / med["compact-ideal"] for m in MODES},
        composed_over_fg=med["composed"] / med["fg[rc]"],
        spread=max((v["p75"] - v["p25"]) / v["median"] for k, v in st.items() if k not in ("gather", "scatter", "write")),
    )
    case["pass"] = case["ok"] and all(r <= BOUND for r in ratios.values())
    return case


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 100 else (f"{v:.2f}" if v >= 10 else f"{v:.3f}")


def render_table(cases) -> str:
    lines = [
        "| shape (K→N), tokens | s | R×C active | dense ms | compact-ideal ms | gather ms | scatter ms | fg[rc] ms "
        "| fg[rc]/bar | fg[c]/bar | fg[r]/bar | fg[rc]/strict bar | fg[rc]/compact-ideal | composed/fg[rc] | spread "
        "| other load | result |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cases:
        med = c["median_ms"]

        def r(m):
            v = c["fg_over_bar"][m]
            return f"**{v:.3f}**" if v > BOUND else f"{v:.3f}"

        load = c.get("other_load")
        load_s = "—" if load is None else (f"**{100 * load:.0f}%**" if load > 0.05 else f"{100 * load:.0f}%")
        res = "WRONG" if not c["ok"] else ("PASS" if c["pass"] else "MISS")
        lines.append(
            f"| {c['shape']} | {c['sparsity']:.1f} | {c['active_rows']}×{c['active_cols']} | {_ms(med['dense'])} "
            f"| {_ms(med['compact-ideal'])} | {_ms(med['gather'])} | {_ms(med['scatter'])} | {_ms(med['fg[rc]'])} "
            f"| {r('rc')} | {r('c')} | {r('r')} | {c['fg_rc_over_strict_bar']:.3f} | {c['fg_over_ci']['rc']:.3f} "
            f"| {c['composed_over_fg']:.3f} "
            f"| {100 * c['spread']:.1f}% | {load_s} | {res} |")
    return "\n".join(lines)


def render_md(cases, env, command, table, args) -> str:
    n_pass = sum(c["pass"] for c in cases)
    busy = [c for c in cases if (c.get("other_load") or 0) > 0.05]
    out = [
        "# `fg::gathered_linear` on CPU: against the GEMM on the pre-gathered compact block",
        "",
        "Generated by `bench/bench_gathered.py --write-results`; do not edit by hand.",
        "",
        "| | |",
        "|---|---|",
        f"| Machine | {env['cpu']}; {env['logical_cpus']} logical CPUs ({env['usable_cpus']} usable) |",
        f"| Threads / dtype | {env['threads']} / float32 |",
        f"| torch | {env['torch']} |",
        f"| Date | {env['date']} |",
        f"| Command | `{command}` |",
        f"| Git | {env.get('git_commit') or 'no commit'} |",
        f"| Timing | per case all variants interleaved, {args.warmup} warm-up round(s), rounds in rotating order "
        f"for ~{args.budget:g} s ({args.min_rounds}–{args.max_rounds} rounds); medians |",
        "",
        "`compact-ideal` = `F.linear(x[:, C], W[R][:, C], b[R])` on tensors gathered before timing; `gather` = "
        "`x.index_select(1, C)`; `scatter` = `torch.zeros(M, N).index_copy_(1, R, h)`; `composed` = the stock "
        "composition of the three. `fg[rc]` = `gathered_linear(x, W_c, b_c, R, C, N)`, `fg[c]` = col_idx only "
        "(compact output), `fg[r]` = row_idx only (compact input). Bars: rc = compact-ideal + gather + "
        "scatter, c = compact-ideal + gather, r = compact-ideal + scatter (sums of medians from the same run); "
        "strict bar (no target) = compact-ideal + gather + the bare output write `torch.zeros(M, N)`. "
        f"Target: fg / bar ≤ {BOUND:.2f}. s = fraction of rows and of columns removed (random, seeded). "
        "fg is checked against the stock composition (relative error ≤ 1e-5) before timing.",
        "",
        f"Summary: {n_pass} of {len(cases)} cases meet the bar in all three index modes.",
        "",
        table,
        "",
    ]
    if busy:
        out += [f"**Disturbed:** other processes used more than 5% of the CPUs during {len(busy)} of {len(cases)} "
                "case(s); those ratios are less certain.", ""]
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--large", action="store_true", help="also the LLaMA-1B shapes (slow)")
    p.add_argument("--write-results", action="store_true", help=f"rewrite {RESULTS.name}")
    p.add_argument("--shapes", default=None, help="comma-separated substrings of shape labels to keep")
    p.add_argument("--sparsities", default=None)
    p.add_argument("--seed", type=int, default=0)
    timing_flags(p, budget_help="seconds per case (default 2, quick 1)", min_rounds=7, max_rounds=400, warmup=2,
                 threads=THREADS)
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 1.0 if args.quick else 2.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = command_line("bench/bench_gathered.py", argv)
    torch.set_num_threads(args.threads)
    import fg_kernels  # noqa: F401

    if not args.no_lock:
        hold_machine("bench_gathered.py", log)
    shapes = QUICK_SHAPES if args.quick else SHAPES + (LARGE_SHAPES if args.large else ())
    if args.shapes:
        keep = [k.strip().lower() for k in args.shapes.split(",")]
        shapes = tuple(s for s in shapes if any(k in s.label.lower() for k in keep))
    sparsities = tuple(float(v) for v in args.sparsities.split(",")) if args.sparsities else SPARSITIES
    env = environment_record("torch.ops.fg.gathered_linear")
    cases = []
    t0 = time.perf_counter()
    for shape in shapes:
        for s in sparsities:
            c = run_case(shape, s, args)
            cases.append(c)
            log(f"{shape.label} s={s}: " + ", ".join(f"fg[{m}]/bar {c['fg_over_bar'][m]:.3f}" for m in MODES)
                + f", fg/ci {c['fg_over_ci']['rc']:.3f}, composed/fg {c['composed_over_fg']:.3f}, "
                f"spread {100 * c['spread']:.0f}%, load {100 * (c['other_load'] or 0):.0f}%, "
                f"{'ok' if c['ok'] else 'WRONG ' + str(c['rel_err'])}  [{time.perf_counter() - t0:.0f} s]")
            gc.collect()
    table = render_table(cases)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results_gathered.json", "w") as fh:
        json.dump({"environment": env, "command": command, "cases": cases}, fh, indent=1)
    md = render_md(cases, env, command, table, args)
    (out / RESULTS.name).write_text(md)
    if args.write_results:
        RESULTS.write_text(md)
        log(f"wrote {RESULTS}")
    return 0 if all(c["ok"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
