"""pytest-benchmark view of ``bench/bench_train_step.py``: one full training step.

    python -m pytest bench/test_bench_train_step.py --benchmark-only
    FG_BENCH_MODELS=minilm python -m pytest bench/test_bench_train_step.py --benchmark-only

One benchmark group per (model, inactive fraction) comparing fg / fg-gates / masked / lora
(definitions, models and inputs are those of the script, imported from it). Ratios for the results
table come from the script, which interleaves the variants in one process; this suite is the
per-variant view. Heavy (up to seconds per step): skipped unless bench/ is named on the command
line or a benchmark flag is given (same rule as bench/test_bench_ops.py); ``pytest tests`` never
collects it.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.bench_train_step import (  # noqa: E402
    INACTIVE,
    MODELS,
    THREADS,
    VARIANTS,
    build_variant,
    check_fg_vs_masked,
    make_batch,
    make_step,
    trainable_count,
)

_MODELS = [m for m in os.environ.get("FG_BENCH_MODELS", ",".join(MODELS)).split(",") if m]
_ROUNDS = int(os.environ.get("FG_BENCH_TRAIN_ROUNDS", "3"))


BENCH_THREADS = THREADS  # the guard in bench/conftest.py runs every case with these


@pytest.mark.parametrize("inactive", INACTIVE, ids=lambda f: f"inactive{f:.1f}")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", _MODELS)
def test_train_step(benchmark, model, variant, inactive):
    if variant == "lora" and inactive != INACTIVE[0]:
        pytest.skip("LoRA does not depend on the gates; timed once")
    if variant == "fg-gates" and inactive == 0.4:  # correctness once: sigma=0, same loss as masked
        res = check_fg_vs_masked(model, 0.4)
        assert res["ok"], res
    net = build_variant(model, variant, inactive)
    step = make_step(variant, net, make_batch(model))
    benchmark.group = f"{model} train step, {inactive:.0%} inactive"
    benchmark.extra_info.update({"variant": variant, "inactive": inactive, "trainable": trainable_count(net),
                                 "threads": torch.get_num_threads(), "torch": torch.__version__})
    loss = benchmark.pedantic(step, rounds=_ROUNDS, iterations=1, warmup_rounds=1)
    assert loss == loss  # finite
