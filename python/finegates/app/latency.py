"""Wall-time latency of models on one batch, for the dense vs compact ratio of a run."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List

import torch
from torch import nn

__all__ = ["measure_latency", "latency_ratio", "latency_batch", "NOISY_SPREAD"]

# A ratio whose middle half of paired repetitions spans more than this fraction of its median is
# reported as measured on a noisy machine: no speed claim.
NOISY_SPREAD = 0.2


@torch.no_grad()
def measure_latency(models: List[nn.Module], batch: Dict[str, torch.Tensor], reps: int = 12,
                    warmup: int = 2) -> List[List[float]]:
    """Wall times (seconds) of ``model(**batch)`` in eval mode, one list per model with one time per
    repetition; the models run in turn within each repetition, so that other load on the machine
    hits all of them alike and repetition i of each can be paired."""
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
    return times


def latency_ratio(base: List[float], other: List[float]) -> Dict[str, float]:
    """``other / base`` from paired repetitions: the median of the per-repetition ratios (a hiccup
    in one repetition moves it little), the quartiles around it, each model's median time, and
    whether the spread makes it noise (``noisy``: quartile range over ``NOISY_SPREAD`` of the median)."""
    ratios = [o / b for b, o in zip(base, other)]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return dict(ratio=median, ratio_q1=q1, ratio_q3=q3, noisy=(q3 - q1) > NOISY_SPREAD * median,
                base_s=statistics.median(base), other_s=statistics.median(other), reps=len(ratios))


def latency_batch(dataset, collate_fn, n: int, device) -> Dict[str, torch.Tensor]:
    """The first ``n`` examples of ``dataset`` as one model input (labels dropped)."""
    n = min(n, len(dataset))
    batch = collate_fn([dataset[i] for i in range(n)])
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}
