#!/usr/bin/env python
"""What limits accuracy: `finegates finetune` variants on the bundled SST-2 sample, several seeds each.

    python bench/quality_table.py --configs lora-const,lora-linear --seeds 1,2,3
    python bench/quality_table.py --write-results          # every run found -> bench/RESULTS_QUALITY_SWEEP.md

Every configuration is a set of `finegates finetune` arguments on top of the same budget (the default
run's: all-MiniLM-L6-v2, the bundled 4,000 training sentences, 500 optimizer steps of batch 16, the
872 GLUE validation sentences). Each (configuration, seed) runs in its own process, one after another
(the bench lock), and leaves its metrics.json under --out; a run already there is not repeated, so a
sweep can be stopped and continued. The table shows per configuration the mean and the spread
(min-max) over the seeds of accuracy, of the gated Linear parameters removed, and of training time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS_QUALITY_SWEEP.md"
LINEAR = ["--lr-scheduler", "linear", "--warmup-steps", "50"]
CONST = ["--lr-scheduler", "constant", "--warmup-steps", "0"]

# name -> (what it changes, arguments[, optimizer steps]). Every run also gets --max-steps (the row's steps,
# else --steps) and --seed S; runs without gates also --no-compact.
A8, A16 = ["--lora-alpha", "8"], ["--lora-alpha", "16"]  # LoRA scale 1 (the old FineGates default) or 2 (PEFT's)
# The exact closure by gate value, pinned on every budget row run before task saliency became the default.
VALUE = ["--closure-rank", "value"]
GATES_NOW = ["--gate-noise", "0", "--gate-lr", "0.02", *VALUE]  # the finetune defaults then, pinned: a later default leaves these rows as run
SALIENCY_NOW = ["--gate-noise", "0", "--gate-lr", "0.02", "--closure-rank", "saliency"]  # the defaults now, pinned
CONFIGS: Dict[str, tuple] = {
    "dense-const-cls": ("dense full finetune, constant lr, CLS pooling", ["--method", "dense", *CONST, "--pooling", "cls"]),
    "dense-linear-mean": ("dense full finetune, warm-up + linear decay, mean pooling", ["--method", "dense", *LINEAR, "--pooling", "mean"]),
    "lora-const-cls": ("PEFT LoRA r=8 (alpha 16), constant lr 2e-3, CLS pooling (the old default)", ["--method", "lora", *CONST, "--pooling", "cls"]),
    "lora-linear-cls": ("PEFT LoRA r=8 (alpha 16), warm-up + linear decay, CLS pooling", ["--method", "lora", *LINEAR, "--pooling", "cls"]),
    "lora-linear-mean": ("PEFT LoRA r=8 (alpha 16), warm-up + linear decay, mean pooling", ["--method", "lora", *LINEAR, "--pooling", "mean"]),
    "fg-const-cls": ("FineGates, constant lr, CLS pooling, LoRA alpha 8 (the old default)", [*CONST, "--pooling", "cls", *A8]),
    "fg-linear-cls": ("FineGates, warm-up + linear decay, CLS pooling, alpha 8", [*LINEAR, "--pooling", "cls", *A8]),
    "fg-const-mean": ("FineGates, constant lr, mean pooling, alpha 8", [*CONST, "--pooling", "mean", *A8]),
    "fg-linear-mean": ("FineGates, warm-up + linear decay, mean pooling, alpha 8", [*LINEAR, "--pooling", "mean", *A8]),
    "fg-linear-mean-a16": ("... LoRA alpha 16 (scale 2, as the PEFT baseline)", [*LINEAR, "--pooling", "mean", *A16]),
    "fg-linear-mean-a16-cubic": ("... alpha 16, cubic lambda ramp", [*LINEAR, "--pooling", "mean", *A16, "--sparsity-ramp", "cubic"]),
    "fg-linear-mean-a16-late": ("... alpha 16, lambda from step 100, ramp 200", [*LINEAR, "--pooling", "mean", *A16, "--sparsity-start", "100", "--sparsity-warmup", "200"]),
    "fg-linear-mean-a16-glr02": ("... alpha 16, gate lr 0.02", [*LINEAR, "--pooling", "mean", *A16, "--gate-lr", "0.02"]),
    "fg-linear-mean-gates-only": ("... gates only (no LoRA inside)", [*LINEAR, "--pooling", "mean", "--lora-rank", "0"]),
    "fg-linear-mean-a16-t017": ("... alpha 16, target sparsity 0.17", [*LINEAR, "--pooling", "mean", *A16, "--target-sparsity", "0.17", *VALUE]),
    "fg-linear-mean-a16-cubic-late-lam10": ("... alpha 16, cubic ramp, lambda 10 from step 100, ramp 150",
                                            [*LINEAR, "--pooling", "mean", *A16, "--sparsity-ramp", "cubic",
                                             "--sparsity-start", "100", "--sparsity-warmup", "150", "--sparsity-lambda", "10"]),
    "fg-linear-mean-a16-cubic-head3e3": ("... alpha 16, cubic ramp, head lr 3e-3",
                                         [*LINEAR, "--pooling", "mean", *A16, "--sparsity-ramp", "cubic", "--head-lr", "3e-3"]),
    "fg-linear-mean-a16-cubic-lam0": ("... alpha 16, cubic ramp, sparsity loss off (lambda 0): no removal, the adapter alone",
                                      [*LINEAR, "--pooling", "mean", *A16, "--sparsity-ramp", "cubic", "--sparsity-lambda", "0"]),
    "fg-default-recovery100": ("... the defaults, and the last 100 steps with the gates frozen (--recovery-steps 100)",
                               ["--recovery-steps", "100", *VALUE]),
    "fg-default": ("FineGates, `finegates finetune` defaults", []),
    # The size budget (the defaults since it landed: 40% of the gated layers' parameters removed in the
    # compact model, learned multiplier, exact closure at step 400, 100 recovery steps).
    "fg-budget-20": ("FineGates, size budget, 20% requested", ["--target-sparsity", "0.2", "--gate-lr", "0.05", "--gate-noise", "0.1", *VALUE]),
    "fg-budget-40": ("FineGates, size budget, 40% requested (gate lr 0.05, gate noise 0.1: the earlier defaults)", ["--target-sparsity", "0.4", "--gate-lr", "0.05", "--gate-noise", "0.1", *VALUE]),
    "fg-budget-50": ("FineGates, size budget, 50% requested", ["--target-sparsity", "0.5", "--gate-lr", "0.05", "--gate-noise", "0.1", *VALUE]),
    "fg-budget-60": ("FineGates, size budget, 60% requested", ["--target-sparsity", "0.6", "--gate-lr", "0.05", "--gate-noise", "0.1", *VALUE]),
    "fg-budget-40-clamp": ("... 40%, the reference's clamp gradient (no straight-through)",
                           ["--target-sparsity", "0.4", "--gate-gradient", "clamp", "--gate-lr", "0.05", "--gate-noise", "0.1", *VALUE]),
    "fg-budget-40-norecovery": ("... 40%, no recovery phase (closure after the last step)",
                                ["--target-sparsity", "0.4", "--recovery-steps", "0", "--gate-lr", "0.05", "--gate-noise", "0.1", *VALUE]),
    "fg-budget-40-distill": ("... 40%, self-distillation from the model with its gates open (weight 1, T 2)",
                             ["--target-sparsity", "0.4", "--distill-weight", "1.0", "--gate-lr", "0.05", "--gate-noise", "0.1", *VALUE]),
    "fg-budget-40-noise0": ("... 40%, no gate noise in training (--gate-noise 0)",
                            ["--target-sparsity", "0.4", "--gate-noise", "0", "--gate-lr", "0.05", *VALUE]),
    "fg-budget-40-noise0-distill": ("... 40%, no gate noise, self-distillation (weight 1, T 2)",
                                    ["--target-sparsity", "0.4", "--gate-noise", "0", "--distill-weight", "1.0", "--gate-lr", "0.05", *VALUE]),
    "fg-budget-40-noise0-glr02": ("... 40%, no gate noise, gate lr 0.02 (the defaults now)",
                                  ["--target-sparsity", "0.4", *GATES_NOW]),
    "fg-budget-40-noise0-glr01": ("... 40%, no gate noise, gate lr 0.01",
                                  ["--target-sparsity", "0.4", "--gate-noise", "0", "--gate-lr", "0.01", *VALUE]),
    "fg-budget-40-glr02": ("... 40%, gate lr 0.02, gate noise 0.1",
                           ["--target-sparsity", "0.4", "--gate-lr", "0.02", "--gate-noise", "0.1", *VALUE]),
    "fg-budget-50-noise0-glr02": ("FineGates, size budget, 50% requested, the defaults now",
                                  ["--target-sparsity", "0.5", *GATES_NOW]),
    "fg-budget-40-rec200": ("... 40%, the defaults now, the last 200 steps in recovery (freeze at step 300)",
                            ["--target-sparsity", "0.4", *GATES_NOW, "--recovery-steps", "200"]),
    "fg-budget-40-reclr1": ("... 40%, the defaults now, recovery at the full peak learning rate (--recovery-lr 1)",
                            ["--target-sparsity", "0.4", *GATES_NOW, "--recovery-lr", "1.0"]),
    "fg-budget-40-glr02-distill": ("... 40%, the defaults now, self-distillation (weight 1, T 2)",
                                   ["--target-sparsity", "0.4", *GATES_NOW, "--distill-weight", "1.0"]),
    "fg-budget-40-saliency": ("... 40%, the defaults now: the exact closure ranked by task saliency (--closure-rank saliency)",
                              ["--target-sparsity", "0.4", *SALIENCY_NOW]),
    "fg-budget-20-saliency": ("... 20%, the defaults now (saliency closure)", ["--target-sparsity", "0.2", *SALIENCY_NOW]),
    "fg-budget-50-saliency": ("... 50%, the defaults now (saliency closure)", ["--target-sparsity", "0.5", *SALIENCY_NOW]),
    "fg-budget-60-saliency": ("... 60%, the defaults now (saliency closure)", ["--target-sparsity", "0.6", *SALIENCY_NOW]),
    "fg-budget-40-saliency-1000": ("... 40%, the defaults now (saliency closure), 1,000 steps",
                                   ["--target-sparsity", "0.4", *SALIENCY_NOW], 1000),
    "fg-heads-units-40": ("... 40%, the defaults now, whole heads and MLP units (--structure heads_units)",
                          ["--target-sparsity", "0.4", *SALIENCY_NOW, "--structure", "heads_units"]),
    "fg-heads-units-50": ("... 50%, whole heads and MLP units (--structure heads_units)",
                          ["--target-sparsity", "0.5", *SALIENCY_NOW, "--structure", "heads_units"]),
    "fg-heads-units-60": ("... 60%, whole heads and MLP units (--structure heads_units)",
                          ["--target-sparsity", "0.6", *SALIENCY_NOW, "--structure", "heads_units"]),
    "fg-budget-0": ("... nothing requested (target 0): the adapter inside open gates, in the same loop",
                    ["--target-sparsity", "0", *VALUE]),
    "lora-linear-mean-1000": ("PEFT LoRA r=8 as `lora-linear-mean`, 1,000 steps", ["--method", "lora", *LINEAR, "--pooling", "mean"], 1000),
    "fg-budget-40-1000": ("FineGates, size budget, 40% requested, 1,000 steps", ["--target-sparsity", "0.4", "--gate-lr", "0.05", "--gate-noise", "0.1", *VALUE], 1000),
    "fg-reference-22": ("FineGates, the reference's per-layer objective, t = 0.22 (the earlier default run)",
                        ["--sparsity-objective", "reference", "--target-sparsity", "0.22", "--sparsity-warmup", "50",
                         "--recovery-steps", "0", "--gate-gradient", "clamp", "--gate-lr", "0.05", "--gate-noise", "0.1"]),
}

# The prune-then-LoRA peers (bench/peers.py, the [peers] extra): name -> (what, schedule, fraction removed).
PEER_SCHEDULES = {
    "tp-prune-tune": "Torch-Pruning (Taylor), prune -> LoRA: head 50 steps, prune, LoRA for the rest",
    "tp-tune-prune": "Torch-Pruning (Taylor), LoRA 400 steps -> merge -> prune -> fresh LoRA 100 steps",
    "textpruner-tune-prune": "TextPruner (iterative Taylor), LoRA 400 steps -> merge -> prune -> fresh LoRA 100 steps",
}
PEERS: Dict[str, tuple] = {f"peer-{schedule}-{pct}": (f"{what}, {pct}% removed", schedule, pct / 100)
                           for schedule, what in PEER_SCHEDULES.items() for pct in (40, 50, 60)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_one(name: str, seed: int, steps: int, out: Path) -> Dict:
    d = out / f"{name}-s{seed}"
    if (d / "metrics.json").is_file():
        return json.loads((d / "metrics.json").read_text())
    argv = _peer_argv(name, seed, steps, d) if name in PEERS else _finetune_argv(name, seed, steps, d)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.time()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    m = json.loads((d / "metrics.json").read_text())
    log(f"{name} seed {seed}: accuracy {m['accuracy']:.4f}, removed {100 * (m.get('removed_fraction_of_gated') or 0):.1f}% "
        f"[{time.time() - t0:.0f} s]")
    return m


def _finetune_argv(name: str, seed: int, steps: int, d: Path) -> List[str]:
    compact = [] if name.startswith("fg-") else ["--no-compact"]  # the compact model's size is the result
    steps = CONFIGS[name][2] if len(CONFIGS[name]) > 2 else steps
    return [sys.executable, "-m", "finegates", "finetune", *CONFIGS[name][1], "--max-steps", str(steps),
            "--seed", str(seed), *compact, "--logging-steps", "50", "--output-dir", str(d), "--overwrite"]


def _peer_argv(name: str, seed: int, steps: int, d: Path) -> List[str]:
    _, schedule, fraction = PEERS[name]
    return [sys.executable, str(BENCH / "peers.py"), "--schedule", schedule, "--sparsity", str(fraction),
            "--seed", str(seed), "--steps", str(steps), "--output-dir", str(d)]


def _cell(values: List[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "—"
    v = [x * scale for x in values]
    mean = statistics.fmean(v)
    return f"{mean:.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})" if len(v) > 1 else f"{mean:.{digits}f}"


def render(out: Path) -> str:
    rows = ["| configuration | what | seeds | accuracy % mean (min–max) | requested % | removed in the compact model % "
            "| compact = gated accuracy | train time s |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, (what, *_) in {**CONFIGS, **PEERS}.items():
        ms = [json.loads(p.read_text()) for p in sorted(out.glob(f"{name}-s*/metrics.json"))
              if p.parent.name[len(name) + 2:].isdigit()]  # not another configuration named name-s...
        if not ms:
            continue
        acc = [m["accuracy"] for m in ms]
        rem = [m["removed_fraction_of_gated"] for m in ms if m.get("removed_fraction_of_gated") is not None]
        tt = [m["train_time_s"] for m in ms]
        asked = f"{100 * ms[0]['target_sparsity']:.0f}" if name.startswith(("fg-", "peer-")) and "target_sparsity" in ms[0] else "—"
        same = "yes" if all(m.get("compact_accuracy") == m["accuracy"] for m in ms) else "no"
        rows.append(f"| `{name}` | {what} | {len(ms)} | {_cell(acc)} | {asked} | {_cell(rem, digits=2) if rem else '0'} "
                    f"| {same if rem else '—'} | {_cell(tt, 1.0, 0)} |")
    return "\n".join(rows)


# The head-to-head table: per fraction removed, FineGates (both structures) and the peers.
HEAD_TO_HEAD = [("FineGates (defaults)", "fg-budget-{f}-saliency"), ("FineGates `--structure heads_units`", "fg-heads-units-{f}"),
                *((PEER_SCHEDULES[s].split(",")[0] + ", " + s.split("-", 1)[1].replace("-", " → "), f"peer-{s}-{{f}}")
                  for s in PEER_SCHEDULES)]


def render_head_to_head(out: Path, fractions=(40, 50, 60)) -> str:
    """Accuracy (mean, min-max, per seed), size and time of FineGates and the peers, per fraction."""
    rows = ["| removed | method | accuracy % mean (min–max) | seed 1 / 2 / 3 | removed in the model % | train + prune s |",
            "|---:|---|---:|---:|---:|---:|"]
    for f in fractions:
        for label, pattern in HEAD_TO_HEAD:
            name = pattern.format(f=f)
            runs = {int(p.parent.name[len(name) + 2:]): json.loads(p.read_text())
                    for p in out.glob(f"{name}-s*/metrics.json") if p.parent.name[len(name) + 2:].isdigit()}
            if not runs:
                continue
            ms = [runs[k] for k in sorted(runs)]
            seeds = " / ".join(f"{100 * runs[k]['accuracy']:.1f}" if k in runs else "—" for k in (1, 2, 3))
            rem = [m["removed_fraction_of_gated"] for m in ms]
            time_s = [m["train_time_s"] + m.get("prune_time_s", 0.0) for m in ms]
            rows.append(f"| {f}% | {label} | {_cell([m['accuracy'] for m in ms])} | {seeds} | {_cell(rem, digits=2)} "
                        f"| {_cell(time_s, 1.0, 0)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="", help="comma-separated names of " + ", ".join([*CONFIGS, *PEERS]))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--out", type=Path, default=BENCH / "out" / "quality_sweep")
    p.add_argument("--write-results", action="store_true", help=f"write {RESULTS.name} from every run under --out")
    p.add_argument("--head-to-head", action="store_true", help="print FineGates against the prune-then-LoRA peers")
    args = p.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS and c not in PEERS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}")
    if names:
        from bench.harness import hold_machine

        hold_machine("quality_table.py", log)
    for name in names:
        for seed in (int(s) for s in args.seeds.split(",")):
            run_one(name, seed, args.steps, args.out)
    if args.head_to_head:
        print(render_head_to_head(args.out))
        return 0
    table = render(args.out)
    print(table)
    if args.write_results:
        RESULTS.write_text(RESULTS.read_text().split("<!-- table -->")[0] + "<!-- table -->\n\n" + table + "\n"
                           if RESULTS.exists() else table + "\n")
        log(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(BENCH.parent))
    sys.exit(main())
