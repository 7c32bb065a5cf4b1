"""pytest-benchmark suite: ``fg::gated_linear`` against dense, masked and compact-ideal.

    python -m pytest bench/test_bench_ops.py --benchmark-only                     # full grid
    FG_BENCH_QUICK=1 python -m pytest bench/test_bench_ops.py --benchmark-only    # RoBERTa 768->3072, s in {0, 0.4}
    python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-json=bench/out/bench.json

Parametrised over shape x sparsity x mode x variant (see bench/common.py for the definitions);
one benchmark group per (shape, sparsity, mode), so pytest-benchmark's table compares the four
variants side by side. Ratios for the results table come from ``bench/bench_ops.py``, which times the
variants interleaved in one process; this suite is the per-variant view.

Environment: ``FG_BENCH_QUICK=1`` quick subset; ``FG_BENCH_THREADS`` (default 2);
``FG_BENCH_TARGET_S`` seconds of timed calls per benchmark (default 1.0; at least 3 rounds);
``FG_BENCH_ALLOW_REFERENCE=1`` lets the reference stand in for an unbuilt op (harness testing only).

These are heavy, so they only run when asked for: a path under bench/ given on the command line,
a ``--benchmark-only/--benchmark-enable/--benchmark-disable`` flag, or ``FG_BENCH=1``. Collected
by a plain ``pytest`` run from the repository root, they are skipped.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.common import (  # noqa: E402
    MODES,
    VARIANTS,
    check_fg,
    env_quick,
    estimated_seconds,
    load_fg_op,
    make_callable,
    make_inputs,
    selected_cases,
    timing_scope,
)

_THREADS = int(os.environ.get("FG_BENCH_THREADS", "2"))
_TARGET_S = float(os.environ.get("FG_BENCH_TARGET_S", "1.0"))


def _cases():
    shapes, sparsities = selected_cases(env_quick())
    # Variant innermost so consecutive tests reuse the cached inputs of one (shape, sparsity).
    for shape in shapes:
        for s in sparsities:
            for mode in MODES:
                for variant in VARIANTS:
                    yield pytest.param(shape, s, mode, variant, id=f"{shape.id}-s{s:.1f}-{mode}-{variant}")


BENCH_THREADS = _THREADS  # the guard in bench/conftest.py runs every case with these


@pytest.fixture(scope="module")
def fg_op():
    """``(op, name)``, or ``(None, why)`` when the op is not built (only the fg cases skip)."""
    try:
        return load_fg_op()
    except RuntimeError as exc:
        return None, str(exc)


_cache = {"key": None, "inputs": None, "checked": set()}


def _inputs(shape, sparsity):
    """Inputs of the latest (shape, sparsity) only: the LLaMA cases are ~0.4 GB each."""
    key = (shape, sparsity)
    if _cache["key"] != key:
        _cache["key"], _cache["inputs"] = None, None
        _cache["inputs"] = make_inputs(shape, sparsity, torch.float32, seed=0)
        _cache["key"] = key
    return _cache["inputs"]


@pytest.mark.parametrize("shape,sparsity,mode,variant", list(_cases()))
def test_gated_linear(benchmark, fg_op, shape, sparsity, mode, variant):
    op, op_name = fg_op
    if variant == "fg" and op is None:
        pytest.skip(op_name)
    inp = _inputs(shape, sparsity)
    if variant == "fg" and (shape, sparsity, mode) not in _cache["checked"]:
        result = check_fg(inp, op, mode)
        assert result["ok"], f"fg is wrong for {shape.label} s={sparsity} {mode}: {result['message']}"
        _cache["checked"].add((shape, sparsity, mode))

    fn = make_callable(variant, mode, inp, op)
    est = estimated_seconds(shape, sparsity, variant, mode)
    rounds = int(min(50, max(3, math.ceil(_TARGET_S / max(est, 1e-4)))))
    warmup = 1 if est > 0.2 else 2

    benchmark.group = f"{shape.id} s={sparsity:.1f} {mode}"
    benchmark.extra_info.update(
        {
            "shape": shape.label,
            "model": shape.model,
            "tokens": shape.m,
            "in_features": shape.k,
            "out_features": shape.n,
            "sparsity": sparsity,
            "active_rows": inp.active_rows,
            "active_cols": inp.active_cols,
            "variant": variant,
            "mode": mode,
            "dtype": "float32",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "fg_op": op_name,
        }
    )
    with timing_scope(mode):
        out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    assert out is not None
