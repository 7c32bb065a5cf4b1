#!/usr/bin/env python
"""Latency of the quality table's compressed models against the dense model, in one interleaved run.

    python bench/peer_latency.py --fractions 40,50,60 --seed 1

For each fraction it times, on one batch of 1 and one of 8 sentences padded to 128 tokens, the dense
MiniLM classifier and every model of that size the quality sweep left under --out: FineGates'
``compact()`` model, the same made portable (:func:`finegates.make_portable`: what
``compact(portable=True)`` builds), FineGates with ``--structure heads_units``, and each peer's
pruned model (bench/peers.py). The models run in turn within each repetition (the paired median of
:func:`finegates.app.latency.latency_ratio`), so load on the machine hits them alike. Writes the
table and the environment to --json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

BENCH = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(BENCH.parent))

from bench.peers import dense_classifier, load_pruned  # noqa: E402

# row label -> the quality sweep's configuration (its run directory is NAME-s{seed}) and what to load
MODELS: List[Tuple[str, str, str]] = [
    ("FineGates `compact()`", "fg-budget-{f}-saliency", "compact"),
    ("FineGates `compact(portable=True)`", "fg-budget-{f}-saliency", "portable"),
    ("FineGates `--structure heads_units`", "fg-heads-units-{f}", "compact"),
    ("Torch-Pruning, prune → LoRA", "peer-tp-prune-tune-{f}", "pruned"),
    ("Torch-Pruning, LoRA → prune → LoRA", "peer-tp-tune-prune-{f}", "pruned"),
    ("TextPruner, LoRA → prune → LoRA", "peer-textpruner-tune-prune-{f}", "pruned"),
]


def _load(run: Path, kind: str, dense: nn.Module) -> nn.Module:
    import finegates

    if kind == "pruned":
        return load_pruned(run / "pruned", dense)
    model = finegates.load_compact(run / "compact")
    return finegates.make_portable(model) if kind == "portable" else model


def _batches(tokens: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """The first 1 and 8 validation sentences, padded to ``tokens`` tokens."""
    from finegates.app.data_loading import BUNDLED_SST2, read_table
    from finegates.app.model_loading import default_minilm_path, load_tokenizer

    texts = list(read_table(BUNDLED_SST2 / "validation.tsv")["sentence"])
    tok = load_tokenizer(default_minilm_path())
    out = {}
    for n in (1, 8):
        enc = tok(texts[:n], padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
        out[f"{n} x {tokens}"] = dict(enc)
    return out


def measure(out: Path, fractions: List[int], seed: int, reps: int, tokens: int) -> Dict:
    from finegates.app.latency import latency_ratio, measure_latency

    dense = dense_classifier()
    batches = _batches(tokens)
    rows = []
    for f in fractions:
        found = [(label, _load(out / f"{cfg.format(f=f)}-s{seed}", kind, dense)) for label, cfg, kind in MODELS
                 if (out / f"{cfg.format(f=f)}-s{seed}" / "metrics.json").is_file()]
        for shape, batch in batches.items():
            times = measure_latency([dense] + [m for _, m in found], batch, reps=reps)
            for (label, _), t in zip(found, times[1:]):
                r = latency_ratio(times[0], t)
                rows.append(dict(fraction=f, batch=shape, model=label, ratio=round(r["ratio"], 3),
                                 q1=round(r["ratio_q1"], 3), q3=round(r["ratio_q3"], 3), noisy=r["noisy"],
                                 dense_ms=round(1e3 * r["base_s"], 2), model_ms=round(1e3 * r["other_s"], 2)))
                print(f"{f}% {shape} {label}: {r['ratio']:.3f} ({r['ratio_q1']:.3f}-{r['ratio_q3']:.3f})", flush=True)
    return dict(rows=rows, reps=reps, seed=seed)


def table(result: Dict) -> str:
    lines = ["| removed | model | batch 1 × 128 | batch 8 × 128 |", "|---:|---|---:|---:|"]
    cells: Dict[Tuple[int, str], Dict[str, str]] = {}
    for r in result["rows"]:
        cells.setdefault((r["fraction"], r["model"]), {})[r["batch"].split(" x ")[0]] = (
            f"{r['ratio']:.2f} ({r['q1']:.2f}–{r['q3']:.2f})" + (" noisy" if r["noisy"] else ""))
    for (f, model), c in cells.items():
        lines.append(f"| {f}% | {model} | {c.get('1', '—')} | {c.get('8', '—')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="40,50,60")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=BENCH / "out" / "quality_sweep")
    p.add_argument("--json", type=Path, default=BENCH / "out" / "peer_latency.json")
    a = p.parse_args(argv)
    from bench.harness import environment_record, hold_machine

    hold_machine("peer_latency.py", print)
    result = measure(a.out, [int(f) for f in a.fractions.split(",")], a.seed, a.reps, a.tokens)
    result["environment"] = environment_record()
    from finegates.files import write_json

    write_json(a.json, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
