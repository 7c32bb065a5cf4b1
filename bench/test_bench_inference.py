"""pytest-benchmark view of ``bench/bench_inference.py``: dense vs gated vs compact forward latency
of all-MiniLM-L6-v2 (sequence classifier) and LLaMA-130M, at 20% and 40% of the gated Linear
parameters removed, batch 1 and 8, sequence 128, fp32, 2 threads.

    python -m pytest bench/test_bench_inference.py --benchmark-only
    FG_BENCH_QUICK=1 python -m pytest bench/test_bench_inference.py --benchmark-only   # MiniLM, batch 1

One benchmark group per (model, batch); models, gate patterns and inputs are the script's. The
compact/dense ratios and the table come from the script (variants interleaved in one process);
this suite is the per-variant view. Before timing, the compact output is checked against the gated
output (relative error <= 1e-5). Skipped unless bench/ is named on the command line or a benchmark
flag is given (same rule as bench/test_bench_ops.py).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytest.importorskip("transformers")

from bench.bench_inference import (  # noqa: E402
    BATCHES,
    EXACT_RTOL,
    MODELS,
    TARGETS,
    THREADS,
    build_case_models,
    check_exact,
    forward_fn,
    make_inputs,
)

_QUICK = os.environ.get("FG_BENCH_QUICK", "") not in ("", "0")
_MODELS = ("minilm",) if _QUICK else MODELS
_BATCHES = (1,) if _QUICK else BATCHES
_ROUNDS = int(os.environ.get("FG_BENCH_INFER_ROUNDS", "3" if _QUICK else "5"))
_VARIANTS = ("dense",) + tuple(f"{v}@{t:.1f}" for t in TARGETS for v in ("gated", "compact"))


BENCH_THREADS = THREADS  # the guard in bench/conftest.py runs every case with these


_cache = {}


def _models(name):
    if name not in _cache:
        _cache.clear()
        _cache[name] = build_case_models(name)
    return _cache[name]


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("batch", _BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("model_name", _MODELS)
def test_inference(benchmark, model_name, batch, variant):
    dense, per_target = _models(model_name)
    inputs = make_inputs(dense, batch)
    if variant == "dense":
        model = dense
    else:
        kind, t = variant.split("@")
        gated, compact, _, info = per_target[float(t)]
        model = gated if kind == "gated" else compact
        if kind == "compact":
            err = check_exact(gated, compact, inputs)
            assert err <= EXACT_RTOL, f"compact differs from gated: rel err {err:.2e}"
        benchmark.extra_info.update({k: v for k, v in info.items() if isinstance(v, (int, float))})
    benchmark.group = f"{model_name} batch {batch}x128"
    benchmark.extra_info.update({"model": model_name, "batch": batch, "variant": variant,
                                 "threads": torch.get_num_threads(), "torch": torch.__version__})
    out = benchmark.pedantic(forward_fn(model, inputs), rounds=_ROUNDS, warmup_rounds=1, iterations=1)
    assert out is not None
