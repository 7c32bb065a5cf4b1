"""pytest-benchmark view of ``bench/bench_train_step.py``: one full LLaMA-60M training step.

    python -m pytest bench/test_bench_train_step.py --benchmark-only
    FG_BENCH_QUICK=1 python -m pytest bench/test_bench_train_step.py --benchmark-only   # s in {0, 0.4}

One benchmark group per sparsity comparing fg / masked / lora (definitions, model and inputs are
those of the script, imported from it). Ratios for the results table come from the script, which
interleaves the variants in one process; this suite is the per-variant view. Heavy (several
seconds per step): skipped unless bench/ is named on the command line or a benchmark flag is given
(same rule as bench/test_bench_ops.py); ``pytest tests`` never collects it.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.bench_train_step import (  # noqa: E402
    FULL_SPARSITIES,
    QUICK_SPARSITIES,
    THREADS,
    VARIANTS,
    build_variant,
    check_fg_vs_masked,
    make_inputs,
    make_step,
    trainable_count,
)
from bench.test_bench_ops import _explicitly_requested  # noqa: E402

_QUICK = os.environ.get("FG_BENCH_QUICK", "") not in ("", "0")
_SPARSITIES = QUICK_SPARSITIES if _QUICK else FULL_SPARSITIES
_ROUNDS = int(os.environ.get("FG_BENCH_TRAIN_ROUNDS", "2" if _QUICK else "3"))


@pytest.fixture(autouse=True)
def _bench_guard(request):
    if not _explicitly_requested(request.config):
        pytest.skip("heavy benchmark: run `python -m pytest bench/test_bench_train_step.py --benchmark-only`")
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("sparsity", _SPARSITIES, ids=lambda s: f"s{s:.1f}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, variant, sparsity):
    if variant == "lora" and sparsity != _SPARSITIES[0]:
        pytest.skip("LoRA does not depend on the gate sparsity; timed once")
    if variant == "fg" and sparsity == 0.4:  # correctness once: sigma=0, same loss as masked
        res = check_fg_vs_masked(0.4)
        assert res["ok"], res
    model = build_variant(variant, sparsity)
    step = make_step(variant, model, make_inputs())
    benchmark.group = f"llama60m train step s={sparsity:.1f}"
    benchmark.extra_info.update({"variant": variant, "sparsity": sparsity, "trainable": trainable_count(model),
                                 "threads": torch.get_num_threads(), "torch": torch.__version__})
    loss = benchmark.pedantic(step, rounds=_ROUNDS, iterations=1, warmup_rounds=1)
    assert loss == loss  # finite
