"""GLUE task metadata (text columns, label count) and each task's official metric.

Kept apart from the data loading so that the metrics can be checked on their own; the metrics are
scikit-learn's and scipy's, not re-implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ["TaskInfo", "GLUE_TASKS", "compute_metrics", "main_metric"]


@dataclass(frozen=True)
class TaskInfo:
    text_columns: Tuple[str, ...]
    num_labels: int  # 1 = regression
    metrics: Tuple[str, ...]  # the first is the task's headline metric
    validation_split: str = "validation"


GLUE_TASKS: Dict[str, TaskInfo] = {
    "cola": TaskInfo(("sentence",), 2, ("matthews_correlation",)),
    "sst2": TaskInfo(("sentence",), 2, ("accuracy",)),
    "mrpc": TaskInfo(("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": TaskInfo(("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": TaskInfo(("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    "mnli": TaskInfo(("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": TaskInfo(("question", "sentence"), 2, ("accuracy",)),
    "rte": TaskInfo(("sentence1", "sentence2"), 2, ("accuracy",)),
}


def main_metric(task: Optional[str], num_labels: int) -> str:
    if task in GLUE_TASKS:
        return GLUE_TASKS[task].metrics[0]
    return "pearson" if num_labels == 1 else "accuracy"


def compute_metrics(task: Optional[str], predictions: Sequence, labels: Sequence, num_labels: int = 2) -> Dict[str, float]:
    """Metrics of ``task`` (a GLUE name, or None for local data: accuracy, plus F1 for two classes,
    or Pearson/Spearman for regression). ``predictions`` are class ids, or scores for regression."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if task in GLUE_TASKS:
        names = GLUE_TASKS[task].metrics
    elif num_labels == 1:
        names = ("pearson", "spearmanr")
    else:
        names = ("accuracy", "f1") if num_labels == 2 else ("accuracy",)
    out: Dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(gold, preds))
        elif name == "f1":
            out[name] = float(f1_score(gold, preds))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(gold, preds))
        elif name == "pearson":
            out[name] = float(pearsonr(preds.astype(float), gold.astype(float))[0])
        elif name == "spearmanr":
            out[name] = float(spearmanr(preds.astype(float), gold.astype(float))[0])
    return out
