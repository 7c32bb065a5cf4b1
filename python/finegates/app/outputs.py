"""What a run leaves in its output directory besides metrics.json: a CSV log of the training steps
and a per-layer plot of kept rows/columns, each written to a temporary name and renamed
(:mod:`finegates.files`), so a crash never leaves a half-written file behind."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from ..files import atomic_write_bytes

__all__ = ["StepLog", "plot_layers", "LOG_FIELDS"]

LOG_FIELDS = ["step", "epoch", "loss", "task_loss", "sparsity_loss", "lambda", "keep_fraction", "target_keep", "lr"]


class StepLog:
    """Per-step training log (``train_log.csv``). Rows are kept in memory and the whole file is
    rewritten atomically on ``flush``; every checkpoint holds a copy, and a resume starts from the
    checkpoint's rows (older checkpoints: the log's rows up to its step), so the log of a resumed run
    reads like the log of an uninterrupted one."""

    def __init__(self, path: Path, resume_step: Optional[int] = None, resume_from: Optional[Path] = None):
        self.path = Path(path)
        self.rows: List[Dict[str, Any]] = []
        source = resume_from if resume_from is not None and Path(resume_from).is_file() else self.path
        if resume_step is not None and source.exists():
            with open(source, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]

    def append(self, row: Dict[str, Any]) -> None:
        self.rows.append({k: row.get(k, "") for k in LOG_FIELDS})

    def flush(self, path: Optional[Path] = None) -> None:
        """Writes the rows to the log (or to ``path``: a checkpoint's copy)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_bytes(Path(path) if path is not None else self.path, buf.getvalue().encode())


def plot_layers(path: Path, layers: Iterable[Dict[str, Any]], title: str = "") -> None:
    """Bar plot per gated layer of the kept fraction of rows, of columns, and of parameters in the
    compact model (``compression_report(model)["layers"]``: the parameters come from the
    compaction plan, so a dimension a layer shares with its partner counts as the pair keeps it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [l for l in layers if l.get("gated", True)]
    rows = [l["active_rows"] / l["out_features"] for l in layers]
    cols = [l["active_cols"] / l["in_features"] for l in layers]
    kept = [l["compact_params"] / l["params"] for l in layers]
    width = max(6.0, 0.36 * len(layers) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.5))
    xs = range(len(layers))
    ax.bar([x - 0.27 for x in xs], rows, width=0.27, label="rows kept (outputs)")
    ax.bar(list(xs), cols, width=0.27, label="columns kept (inputs)")
    ax.bar([x + 0.27 for x in xs], kept, width=0.27, label="parameters kept (compact model)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_short(l["name"]) for l in layers], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept fraction")
    ax.set_title(title or "FineGates: kept rows / columns / parameters per gated layer")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def _short(name: str) -> str:
    for drop in ("model.", "bert.", "roberta.", "encoder.", "transformer."):
        name = name.replace(drop, "")
    return name.replace("layer.", "L").replace("layers.", "L")
