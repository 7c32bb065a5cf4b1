"""Wall-time latency of models on one batch, for the dense vs compact ratio of a run."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List

import torch
from torch import nn

__all__ = ["measure_latency", "latency_batch"]


@torch.no_grad()
def measure_latency(models: List[nn.Module], batch: Dict[str, torch.Tensor], reps: int = 10, warmup: int = 2) -> List[float]:
    """Median wall time (seconds) of ``model(**batch)`` in eval mode for each model, the models
    run in turn within each repetition so that other load on the machine hits all of them alike."""
    from tqdm.auto import tqdm

    for m in models:
        m.eval()
    times: List[List[float]] = [[] for _ in models]
    for i in tqdm(range(warmup + reps), desc="latency", dynamic_ncols=True, leave=False):
        for j, m in enumerate(models):
            t = time.perf_counter()
            m(**batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times[j].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def latency_batch(dataset, collate_fn, n: int, device) -> Dict[str, torch.Tensor]:
    """The first ``n`` examples of ``dataset`` as one model input (labels dropped)."""
    n = min(n, len(dataset))
    batch = collate_fn([dataset[i] for i in range(n)])
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}
