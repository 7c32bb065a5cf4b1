#!/usr/bin/env python
"""Time dense / masked / compact-ideal / fg in one process and render the results table and plot.

    python bench/bench_ops.py --quick                 # RoBERTa 768->3072, s in {0, 0.4}: CI, README
    python bench/bench_ops.py --write-results         # full grid -> bench/RESULTS.md + bench/results_cpu.png

For every (shape, sparsity, mode) the four variants run on the same inputs, interleaved: a warm-up
round, then rounds in which each variant runs once (the order rotates every round), until the
case's time budget is spent (between --min-rounds and --max-rounds). Times are medians; ratios are
ratios of those medians, so every ratio comes from one run on the same inputs. Before timing, fg
is checked against compact-ideal scattered to full size (output, or all gradients); a wrong result
gets no timing.

Every case is timed under each --conditions: ``quiet`` (nothing else should run; other processes'
CPU use is measured and flagged) and ``loaded`` (a spinning process started by this script holds
one core, as data-loader workers or a second job do on a training machine), one right after the
other on the same inputs.

Outputs in --out (default bench/out/): results.json (raw per-round times, environment),
results.md (the table) and results_cpu.png (the plot). --write-results also rewrites
bench/RESULTS.md and bench/results_cpu.png. The table goes to stdout, progress to stderr.
Exit status: 1 when fg is wrong anywhere; 2 with --strict when a target is missed; else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.harness import (  # noqa: E402
    OtherLoad, Spinner, command_line, environment_record, hold_machine, shown_path, stats, time_interleaved,
    timing_flags, usable_cpus,
)
from bench.common import (  # noqa: E402
    BENCH_DIR,
    MODES,
    REFERENCE_NAME,
    CONDITIONS,
    TOKENS,
    VARIANTS,
    check_fg,
    dtype_from_name,
    load_fg_op,
    make_callable,
    timing_scope,
    make_inputs,
    meets,
    selected_cases,
    targets,
)

RATIOS = ("fg/compact-ideal", "fg/dense", "masked/fg", "masked/compact-ideal")
FLOOR_NOTE = ("† compact-ideal itself misses this bound (masked/compact-ideal is below it: the compact GEMM "
              "is less efficient than the full one at this size), so no gathered kernel can meet it.")
NOISY = 0.05  # relative interquartile spread above which a case is flagged as noisy
BUSY = 0.05  # share of the CPUs used by other processes above which a case is flagged


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def run_case(inp, mode, op, args, condition="quiet", check=None):
    """Times one (shape, sparsity, mode) under one condition; ``check`` reuses an earlier
    correctness check of the same inputs and mode."""
    case = _case_record(inp, mode, condition)
    check = check_fg(inp, op, mode) if check is None else check
    case["check"] = check
    variants = [v for v in VARIANTS if v != "fg" or check["ok"]]
    fns = {v: make_callable(v, mode, inp, op) for v in variants}
    with OtherLoad() as load, (Spinner() if condition == "loaded" else contextlib.nullcontext()), timing_scope(mode):
        times, rounds = time_interleaved(fns, args.warmup, args.budget, args.min_rounds, args.max_rounds)
    case["other_load"] = load.fraction
    # Load beyond what the condition itself adds (the spinner's core), for the noise flag.
    if load.fraction is not None:
        own = 1.0 / usable_cpus() if condition == "loaded" else 0.0
        case["extra_load"] = max(0.0, load.fraction - own)
    case["rounds"] = rounds
    case["times_ms"] = {v: [t * 1e3 for t in ts] for v, ts in times.items()}
    st = {v: stats(ts) for v, ts in case["times_ms"].items()}
    case["stats_ms"] = st
    case["median_ms"] = {v: s["median"] for v, s in st.items()}
    case["spread"] = max((s["p75"] - s["p25"]) / s["median"] for s in st.values())
    case["ratios"], case["paired_ratios"] = _ratios(case["median_ms"], case["times_ms"])
    _judge(case, inp, mode, condition)
    return case


def _case_record(inp, mode: str, condition: str) -> dict:
    shape = inp.shape
    return {
        "shape": shape.label,
        "shape_id": shape.id,
        "model": shape.model,
        "tokens": shape.m,
        "in_features": shape.k,
        "out_features": shape.n,
        "sparsity": inp.sparsity,
        "active_rows": inp.active_rows,
        "active_cols": inp.active_cols,
        "active_fraction": inp.active_fraction,
        "mode": mode,
        "condition": condition,
    }


def _ratios(med: dict, times_ms: dict):
    """Each of ``RATIOS`` as a ratio of medians, and as the median of same-round ratios (robust
    to drift, for the record); none without an fg timing."""
    if "fg" not in med:
        return {}, {}
    pairs = [name.split("/") for name in RATIOS]
    ratios = {f"{a}/{b}": med[a] / med[b] for a, b in pairs}
    paired = {f"{a}/{b}": statistics.median(x / y for x, y in zip(times_ms[a], times_ms[b])) for a, b in pairs}
    return ratios, paired


def _judge(case: dict, inp, mode: str, condition: str) -> None:
    """The case's targets, its status (PASS, MISS or WRONG) and whether a masked/fg miss is one
    that even compact-ideal cannot reach (see FLOOR_NOTE)."""
    ratios = case["ratios"]
    tg = targets(mode, inp.sparsity, inp.active_fraction, inp.shape.m, condition)
    case["targets"] = {
        name: {"op": op_, "bound": bound, "value": ratios.get(name),
               "pass": (meets(ratios[name], (op_, bound)) if name in ratios else False)}
        for name, (op_, bound) in tg.items()
    }
    if not case["check"]["ok"]:
        case["status"] = "WRONG"
    else:
        missed = [n for n, t in case["targets"].items() if not t["pass"]]
        case["status"] = "PASS" if not missed else "MISS"
        case["missed"] = missed
    t_mf = case["targets"].get("masked/fg")
    case["floor_limited"] = bool(
        t_mf and "masked/compact-ideal" in ratios and not meets(ratios["masked/compact-ideal"], (t_mf["op"], t_mf["bound"]))
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _fmt_ms(v):
    if v is None:
        return "—"
    return f"{v:.1f}" if v >= 100 else (f"{v:.2f}" if v >= 10 else f"{v:.3f}")


def _fmt_ratio(case, name):
    v = case["ratios"].get(name)
    if v is None:
        return "—"
    t = case["targets"].get(name)
    txt = f"{v:.3f}"
    if t is None:
        return txt
    bound = f"{'≤' if t['op'] == '<=' else '≥'}{t['bound']:.2f}"
    return f"{txt} ({bound})" if t["pass"] else f"**{txt}** ({bound})"


def _fmt_load(c):
    v = c.get("other_load")
    return "—" if v is None else (f"**{100 * v:.0f}%**" if c.get("extra_load", v) > BUSY else f"{100 * v:.0f}%")


def _busy(cases):
    return [c for c in cases if (c.get("extra_load") or 0.0) > BUSY]


def render_table(cases) -> str:
    head = ("| shape (K→N) | sparsity | R×C active | mode | machine | dense ms | masked ms | compact-ideal ms "
            "| fg ms | fg/compact-ideal | fg/dense | masked/fg | masked/compact-ideal | spread | other load | result |")
    sep = "|" + "---|" * 5 + "---:|" * 4 + "---:|" * 4 + "---:|---:|---|"
    lines = [head, sep]
    for c in cases:
        med = c["median_ms"]
        fg = _fmt_ms(med.get("fg")) if c["check"]["ok"] else "WRONG"
        if c["status"] == "WRONG":
            result = f"WRONG: {c['check']['message']}"
        elif c["status"] == "MISS":
            result = "MISS " + ", ".join(
                n + ("†" if n == "masked/fg" and c.get("floor_limited") else "") for n in c["missed"])
        else:
            result = "PASS"
        lines.append(
            f"| {c['shape']} | {c['sparsity']:.1f} | {c['active_rows']}×{c['active_cols']} | {c['mode']} "
            f"| {c.get('condition', 'quiet')} | {_fmt_ms(med.get('dense'))} | {_fmt_ms(med.get('masked'))} | {_fmt_ms(med.get('compact-ideal'))} "
            f"| {fg} | {_fmt_ratio(c, 'fg/compact-ideal')} | {_fmt_ratio(c, 'fg/dense')} "
            f"| {_fmt_ratio(c, 'masked/fg')} | {_fmt_ratio(c, 'masked/compact-ideal')} "
            f"| {100 * c['spread']:.1f}% | {_fmt_load(c)} | {result} |"
        )
    return "\n".join(lines)


def render_plot(cases, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = []
    for c in cases:
        if c["shape"] not in shapes:
            shapes.append(c["shape"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), squeeze=False)
    smax = max([c["sparsity"] for c in cases] + [0.2])
    grid = [i * smax / 100 for i in range(101)]
    for row, mode in enumerate(MODES):
        ax_l, ax_r = axes[row]
        for i, shape in enumerate(shapes):
            col = colors[i % len(colors)]
            for condition, style in (("quiet", "o-"), ("loaded", "x--")):
                cs = sorted((c for c in cases if c["shape"] == shape and c["mode"] == mode
                             and c.get("condition", "quiet") == condition), key=lambda c: c["sparsity"])
                if not cs:
                    continue
                label = shape if condition == "quiet" else None
                xs = [c["sparsity"] for c in cs]
                ax_l.plot(xs, [c["ratios"].get("fg/compact-ideal", math.nan) for c in cs], style, color=col,
                          label=label)
                if mode == "fwd" and condition == "quiet":
                    z = [c for c in cs if c["sparsity"] == 0]
                    if z:
                        ax_l.plot([0.0], [z[0]["ratios"].get("fg/dense", math.nan)], "s", mfc="none", color=col, ms=9)
                ax_r.plot(xs, [c["ratios"].get("masked/fg", math.nan) for c in cs], style, color=col, label=label)
        if mode == "fwd":
            ax_l.plot([0.2, smax], [1.05, 1.05], "k--", lw=1, label="target fg/compact-ideal ≤ 1.05 (s ≥ 0.2)")
            ax_l.plot([-0.02, 0.06], [1.03, 1.03], "k:", lw=1.5, label="target fg/dense ≤ 1.03 (s = 0, □)")
        else:
            ax_l.axhline(1.10, color="k", ls="--", lw=1, label="target fg/compact-ideal ≤ 1.10")
        ax_l.axhline(1.0, color="0.7", lw=0.8)
        ax_l.set_ylim(0, min(ax_l.get_ylim()[1], 2.5))  # loaded outliers (stalls) would flatten the rest
        ax_r.plot(grid, [0.9 / (1 - s) ** 2 for s in grid], "k--", lw=1, label="target 0.9 / ((1-s)²)")
        ax_r.plot(grid, [1.0 / (1 - s) ** 2 for s in grid], color="0.6", ls=":", lw=1, label="ideal 1 / (1-s)²")
        ax_l.set_title(f"{mode}: fg / compact-ideal (lower is better; dashed: one core busy)")
        ax_r.set_title(f"{mode}: masked / fg (speed-up over the reference; higher is better)")
        for ax in (ax_l, ax_r):
            ax.set_xlabel("sparsity per dimension")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        ax_l.set_ylabel("time ratio")
        ax_r.set_ylabel("time ratio")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _env_rows(env, args, command, n_cases):
    cfg = env.get("torch_config", [])

    def pick(keys, pattern, label):
        line = next((ln for ln in cfg if any(k in ln for k in keys)), None)
        if line is None:
            return f"{label} n/a"
        m = re.search(pattern, line)
        return f"{label} {m.group(1)}" if m else line

    mkl = pick(("Math Kernel Library",), r"Version ([\d.]+)", "MKL")
    dnn = pick(("MKL-DNN", "oneDNN"), r"(v[\d.]+)", "oneDNN")
    cap = pick(("CPU capability",), r"usage: (\S+)", "CPU capability")
    build = "; ".join(f"{Path(b['file']).name} built {b['mtime']}" for b in env.get("fg_build", [])) or "n/a"
    return [
        ("Machine", f"{env['cpu']}; {env['logical_cpus']} logical CPUs ({env['usable_cpus']} usable); {env['platform']}"),
        ("Threads", f"{env['threads']} (torch.get_num_threads())"),
        ("torch", f"{env['torch']}; {mkl}; {dnn}; {cap}"),
        ("dtype / tokens", f"{args.dtype}; {TOKENS} tokens unless the shape says otherwise"),
        ("Machine states", ", ".join(args.conditions.split(",")) + " (loaded: a spinning process holds one core "
                           "while the case is timed)"),
        ("Date", env["date"]),
        ("Command", f"`{command}`"),
        ("Op", f"{env['fg_op']} ({build})"),
        ("Git", env.get("git_commit") or "no commit"),
        ("Timing", f"{n_cases} cases; per case {args.warmup} warm-up round(s), then interleaved rounds "
                   f"(rotating order) for ~{args.budget:g} s, {args.min_rounds}–{args.max_rounds} rounds; "
                   "medians; ratios of medians from the same run and inputs"),
    ]


def _summary(cases, condition) -> str:
    cs = [c for c in cases if c.get("condition", "quiet") == condition]
    n = {k: sum(c["status"] == k for c in cs) for k in ("PASS", "MISS", "WRONG")}
    return f"{condition}: {n['PASS']} PASS, {n['MISS']} MISS, {n['WRONG']} WRONG of {len(cs)} cases"


RESULTS_INTRO = [
    "# Benchmark results: `fg::gated_linear` on CPU",
    "",
    "Generated by `bench/bench_ops.py --write-results`; do not edit by hand (rerun the command below).",
    "",
    "Other benchmarks: [RESULTS_INFERENCE.md](RESULTS_INFERENCE.md) (dense vs compacted models, "
    "`bench/bench_inference.py`), [RESULTS_GATHERED.md](RESULTS_GATHERED.md) (`fg::gathered_linear`, "
    "`bench/bench_gathered.py`), [RESULTS_TRAIN.md](RESULTS_TRAIN.md) (training step), "
    "[RESULTS_GPU.md](RESULTS_GPU.md).",
    "",
]

WHAT_IS_COMPARED = [
    "## What is compared",
    "",
    "- `dense`: `F.linear(x, W, b)`.",
    "- `masked`: `F.linear(x * g_c, W, b) * g_r`, the reference FineGates computation.",
    "- `compact-ideal`: the same computation on tensors gathered before timing: `x[:, C] * g_c[C]` "
    "(fwd; `x[:, C]` and `g_c[C]` as separate leaves for fwd+bwd), `W[R][:, C]`, `b[R]`, `g_r[R]`.",
    "- `fg`: `torch.ops.fg.gated_linear(x, W, b, g_r, g_c)`.",
    "",
    "`fwd`: forward under `no_grad`. `fwd_bwd`: forward + `autograd.grad` for x, bias and both gates "
    "(weight frozen) with a fixed random `grad_out`. Gates: exactly round(s·N) rows and round(s·K) "
    "columns zeroed at random (seeded), other gate values uniform in (0.5, 1]. `R×C active` is the "
    "realised |R|×|C|. fg is checked against compact-ideal scattered to full size before timing "
    "(relative error < 1e-4 for fp32); a wrong result gets no timing.",
    "",
    "`fwd` keeps the same gates every call (evaluation, inference: fg may reuse its gate-folded weight "
    "block inside `fg_kernels.frozen_weights()`, as an evaluation does); `fwd_bwd` alternates two draws of the gate values "
    "with the same zeros on every call, as a training step does, so fg folds the weight every call.",
    "",
    "Targets (fp32, 2 threads), quiet machine: fwd `fg ≤ 1.05 × compact-ideal` for s ≥ 0.2 at 2048 tokens "
    "and `≤ 1.10` at 128 and 512 tokens, `fg ≤ 1.03 × dense` at s = 0; fwd+bwd `fg ≤ 1.10 × compact-ideal`; "
    "both `masked / fg ≥ 0.9 / ((1-s_r)(1-s_c))`. One core busy (`loaded`), s ≥ 0.4: fwd "
    "`fg ≤ 1.25 × compact-ideal`, fwd+bwd `≤ 1.30`, both `masked / fg ≥ 1.5`. "
    "A missed target is in **bold**. `masked/compact-ideal` (no target) is the best `masked/fg` a "
    "gathered kernel can reach. `spread` is the largest interquartile range / median of the "
    "four variants in that case; `other load` is the share of all CPUs that other processes "
    f"used while the case was timed (above {100 * BUSY:.0f}% in **bold**: the timings are disturbed).",
    "",
]


def render_results_md(cases, env, args, command, table, plot_name, baseline=None) -> str:
    noisy = [c for c in cases if c["spread"] > NOISY]
    out = list(RESULTS_INTRO)
    if (args.quick or args.shapes or args.sparsities or args.modes != ",".join(MODES)
            or args.conditions != ",".join(CONDITIONS)):
        out += ["**Subset run** (not the full grid of shapes, sparsities and modes).", ""]
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _env_rows(env, args, command, len(cases))]
    out += ["", *WHAT_IS_COMPARED]
    out += [
        "Summary: " + "; ".join(_summary(cases, cond) for cond in CONDITIONS if any(
            c.get("condition", "quiet") == cond for c in cases))
        + (f"; {len(noisy)} case(s) with spread > {100 * NOISY:.0f}%." if noisy else "."),
        "",
        "## Results",
        "",
        table,
        "",
    ]
    out += _caveats(cases, noisy)
    out += [f"![ratios vs sparsity]({plot_name})", ""]
    if baseline:
        out += render_baseline(cases, baseline)
    return "\n".join(out)


def _caveats(cases, noisy) -> list:
    """Paragraphs for what makes the table less certain: floor-limited targets, other load, noise."""
    out = []
    if any(c.get("floor_limited") and "masked/fg" in c.get("missed", []) for c in cases):
        out += [FLOOR_NOTE, ""]
    busy = _busy(cases)
    if busy:
        out += [f"**Disturbed:** other processes used more than {100 * BUSY:.0f}% of the CPUs during "
                f"{len(busy)} of {len(cases)} cases (up to {100 * max(c['other_load'] for c in busy):.0f}%); "
                "rerun those on a quiet machine before trusting them.", ""]
    if noisy:
        out += [f"Noise: {len(noisy)} of {len(cases)} cases have a spread above {100 * NOISY:.0f}% "
                f"(largest {100 * max(c['spread'] for c in cases):.0f}%); ratios of medians are less "
                "certain there.", ""]
    return out


def _case_key(c):
    return (c["shape_id"], round(c["sparsity"], 3), c["mode"], c.get("condition", "quiet"))


def _shown_command(command: str) -> str:
    return " ".join(shown_path(a) for a in command.split(" "))


def render_baseline(cases, baseline) -> list:
    """A section comparing fg with an earlier run (``--baseline results.json``) case by case:
    ``fg/compact-ideal`` of each run (each normalised within its own run, so machine drift between
    the runs cancels) and the fg time ratio."""
    before = {_case_key(c): c for c in baseline["cases"]}
    pairs = [(c, before[_case_key(c)]) for c in cases if _case_key(c) in before
             and "fg/compact-ideal" in c["ratios"] and "fg/compact-ideal" in before[_case_key(c)]["ratios"]]
    if not pairs:
        return []
    env = baseline.get("environment", {})
    build = "; ".join(Path(b["file"]).parent.parent.name + "/" + Path(b["file"]).name + " built " + b["mtime"]
                      for b in env.get("fg_build", [])) or "n/a"
    lines = [
        "## Against the baseline",
        "",
        f"Baseline: `{_shown_command(baseline.get('command', '?'))}` at {env.get('date', '?')}, op {build}. "
        "`fg/compact-ideal` "
        "is normalised within each run (compact-ideal is the same code in both), so it compares the op "
        "across runs; `fg after/before` is the op's own median time ratio (also moved by the machine).",
        "",
        "| shape (K→N) | sparsity | mode | machine | fg/compact-ideal before | after | fg after/before |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for c, b in pairs:
        lines.append(
            f"| {c['shape']} | {c['sparsity']:.1f} | {c['mode']} | {c.get('condition', 'quiet')} "
            f"| {b['ratios']['fg/compact-ideal']:.3f} | {c['ratios']['fg/compact-ideal']:.3f} "
            f"| {c['median_ms']['fg'] / b['median_ms']['fg']:.3f} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _progress_line(c, i, total, case_s, total_s) -> str:
    med, r = c["median_ms"], c["ratios"]
    msg = (f"[{i}/{total}] {c['shape']} s={c['sparsity']:.1f} {c['mode']} {c['condition']}: {c['rounds']} rounds; "
           + ", ".join(f"{v} {med[v]:.2f}" for v in VARIANTS if v in med) + " ms")
    if r:
        msg += f"; fg/ci {r['fg/compact-ideal']:.3f}, fg/dense {r['fg/dense']:.3f}, masked/fg {r['masked/fg']:.2f}"
    msg += f"; spread {100 * c['spread']:.1f}%"
    if c.get("other_load") is not None:
        msg += f"; other load {100 * c['other_load']:.0f}%"
    msg += f"; {c['status']}"
    if c["status"] == "WRONG":
        msg += f" ({c['check']['message']})"
    return msg + f"  [{case_s:.0f} s, total {total_s:.0f} s]"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="RoBERTa 768->3072 at sparsity 0 and 0.4 only (~1 min)")
    p.add_argument("--write-results", action="store_true", help="rewrite bench/RESULTS.md and bench/results_cpu.png")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="output folder (default bench/out)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    timing_flags(p, budget_help="seconds of timed rounds per (shape, sparsity, mode, machine state) case (default 8, "
                 "quick 4)", min_rounds=None, min_rounds_help="default 7, quick 7", max_rounds=1000, warmup=1, threads=2,
                 warmup_help="warm-up rounds per case (after the correctness check)")
    p.add_argument("--shapes", default=None, help="comma-separated substrings of shape ids to keep, e.g. 768to3072")
    p.add_argument("--sparsities", default=None, help="comma-separated sparsities, e.g. 0,0.4")
    p.add_argument("--modes", default=",".join(MODES), help="fwd,fwd_bwd")
    p.add_argument("--conditions", default=",".join(CONDITIONS),
                   help="machine states to time each case in: quiet,loaded (loaded: a spinning process holds one core)")
    p.add_argument("--allow-reference", action="store_true",
                   help="let the reference stand in when the op is not built (harness testing; timings meaningless)")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    p.add_argument("--baseline", type=Path, default=None,
                   help="results.json of an earlier run (e.g. the previous build): adds a before/after section")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 4.0 if args.quick else 8.0
    if args.min_rounds is None:
        args.min_rounds = 7
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = command_line("bench/bench_ops.py", argv)
    torch.set_num_threads(args.threads)
    op, op_name = load_fg_op(allow_reference=args.allow_reference)
    if op_name == REFERENCE_NAME:
        log("WARNING: timing the REFERENCE as fg (op not built): the numbers mean nothing.")
        if args.write_results:
            log("refusing --write-results with the reference standing in for the op")
            return 1
    if not args.no_lock:
        hold_machine("bench_ops.py", print)
    grid = _grid(args)
    if grid is None:
        log("nothing to run (check --shapes / --sparsities / --modes / --conditions)")
        return 1
    env = environment_record(op_name)
    log(f"# {env['cpu']}, {env['threads']} threads, torch {env['torch']}, op: {op_name}")
    for b in env["fg_build"]:
        log(f"#   {b['file']} built {b['mtime']}")
    t_start = time.perf_counter()
    cases = _run_grid(grid, op, args)
    table = render_table(cases)
    print(table)
    misses = [c for c in cases if c["status"] == "MISS"]
    _print_findings(cases, misses)
    log(f"total {time.perf_counter() - t_start:.0f} s")
    _write_outputs(cases, env, args, command, table)
    if any(c["status"] == "WRONG" for c in cases):
        return 1
    return 2 if args.strict and misses else 0


def _grid(args):
    """(shapes, sparsities, modes, conditions) the options select, or None when one is empty or unknown."""
    shapes, sparsities = selected_cases(args.quick)
    if args.shapes:
        keep = [s.strip() for s in args.shapes.split(",") if s.strip()]
        shapes = tuple(s for s in shapes if any(k.lower() in s.id.lower() for k in keep))
    if args.sparsities:
        sparsities = tuple(float(s) for s in args.sparsities.split(","))
    modes = tuple(m for m in args.modes.split(",") if m)
    conditions = tuple(c for c in args.conditions.split(",") if c)
    if (not shapes or not sparsities or not modes or any(m not in MODES for m in modes) or not conditions
            or any(c not in CONDITIONS for c in conditions)):
        return None
    return shapes, sparsities, modes, conditions


def _run_grid(grid, op, args) -> list:
    """Every case of the grid, one input set per (shape, sparsity), with a progress line each."""
    shapes, sparsities, modes, conditions = grid
    dtype = dtype_from_name(args.dtype)
    total = len(shapes) * len(sparsities) * len(modes) * len(conditions)
    cases = []
    t_start = time.perf_counter()
    for shape in shapes:
        for s in sparsities:
            inp = make_inputs(shape, s, dtype, args.seed)
            for mode in modes:
                check = None
                for condition in conditions:
                    t0 = time.perf_counter()
                    c = run_case(inp, mode, op, args, condition, check)
                    check = c["check"]
                    cases.append(c)
                    log(_progress_line(c, len(cases), total, time.perf_counter() - t0, time.perf_counter() - t_start))
            del inp
            gc.collect()
    return cases


def _print_findings(cases, misses) -> None:
    """Missed targets (with the floor note where the masked form sets it), busy and noisy cases."""
    if misses:
        print("\nMissed targets:")
        for c in misses:
            det = ", ".join(f"{n} = {c['targets'][n]['value']:.3f} (target {c['targets'][n]['op']} "
                            f"{c['targets'][n]['bound']:.3f})" for n in c["missed"])
            print(f"- {c['shape']} s={c['sparsity']:.1f} {c['mode']} {c['condition']}: {det}"
                  + (f" † (masked/compact-ideal {c['ratios']['masked/compact-ideal']:.3f})"
                     if "masked/fg" in c["missed"] and c.get("floor_limited") else ""))
        if any(c.get("floor_limited") and "masked/fg" in c["missed"] for c in misses):
            print(FLOOR_NOTE)
    busy = _busy(cases)
    if busy:
        log(f"WARNING: other processes used > {100 * BUSY:.0f}% of the CPUs during {len(busy)} case(s): "
            + ", ".join(f"{c['shape']} s={c['sparsity']:.1f} {c['mode']} {c['condition']} ({100 * c['other_load']:.0f}%)"
                        for c in busy))
    noisy = [c for c in cases if c["spread"] > NOISY]
    if noisy:
        log(f"note: {len(noisy)} case(s) with interquartile spread > {100 * NOISY:.0f}% (noisy machine?)")


def _write_outputs(cases, env, args, command: str, table: str) -> None:
    """results.json, results.md and the plot under --out; with --write-results bench/RESULTS.md too."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"fg::gated_linear, {args.dtype}, {env['threads']} threads, torch {env['torch']}, "
             f"{env['cpu']} — {env['date']}")
    plot_path = out / "results_cpu.png"
    render_plot(cases, plot_path, title)
    with open(out / "results.json", "w") as fh:
        json.dump({"environment": env, "command": command, "args": {k: str(v) for k, v in vars(args).items()},
                   "cases": cases}, fh, indent=1)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    (out / "results.md").write_text(render_results_md(cases, env, args, command, table, plot_path.name, baseline))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {plot_path}")
    if args.write_results:
        shutil.copyfile(plot_path, BENCH_DIR / "results_cpu.png")
        (BENCH_DIR / "RESULTS.md").write_text(
            render_results_md(cases, env, args, command, table, "results_cpu.png", baseline))
        log(f"wrote {BENCH_DIR / 'RESULTS.md'} and {BENCH_DIR / 'results_cpu.png'}")


if __name__ == "__main__":
    sys.exit(main())
