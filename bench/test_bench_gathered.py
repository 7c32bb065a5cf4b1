"""pytest-benchmark view of ``bench/bench_gathered.py``: ``fg::gathered_linear`` against the GEMM on
the pre-gathered compact block, the gather and the scatter it cannot avoid.

    python -m pytest bench/test_bench_gathered.py --benchmark-only
    FG_BENCH_QUICK=1 python -m pytest bench/test_bench_gathered.py --benchmark-only   # 2 shapes

One benchmark group per (shape, tokens, sparsity) comparing the variants of the script (definitions
and inputs imported from it). The ratios against the bar (compact-ideal + gather + scatter) come from
the script, which interleaves the variants in one process; this suite is the per-variant view.
Skipped unless bench/ is named on the command line or a benchmark flag is given (same rule as
bench/test_bench_ops.py); ``pytest tests`` never collects it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.bench_gathered import QUICK_SHAPES, SHAPES, SPARSITIES, THREADS, check, make_callables, make_inputs  # noqa: E402

_QUICK = os.environ.get("FG_BENCH_QUICK", "") not in ("", "0")
_SHAPES = QUICK_SHAPES if _QUICK else SHAPES
_VARIANTS = ("dense", "compact-ideal", "gather", "scatter", "write", "fg[rc]", "fg[c]", "fg[r]", "composed")
_TARGET_S = float(os.environ.get("FG_BENCH_TARGET_S", "0.5"))


BENCH_THREADS = THREADS  # the guard in bench/conftest.py runs every case with these


_cache = {}


def _case(shape, s):
    key = (shape, s)
    if key not in _cache:
        _cache.clear()
        inp = make_inputs(shape, s)
        errs = check(inp, shape)
        assert all(e <= 1e-5 for e in errs.values()), f"gathered_linear is wrong for {shape.label} s={s}: {errs}"
        _cache[key] = (inp, make_callables(inp, shape))
    return _cache[key]


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("s", SPARSITIES, ids=lambda s: f"s{s:.1f}")
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda g: f"{g.model}-{g.k}to{g.n}-M{g.m}")
def test_gathered_linear(benchmark, shape, s, variant):
    inp, fns = _case(shape, s)
    fn = fns[variant]
    est = 2.0 * shape.m * shape.k * shape.n * (1 - s) ** 2 / 60e9
    rounds = int(min(200, max(5, math.ceil(_TARGET_S / max(est, 1e-5)))))
    benchmark.group = f"{shape.label} s={s:.1f}"
    benchmark.extra_info.update({"shape": shape.label, "sparsity": s, "variant": variant,
                                 "active_rows": int(inp["R"].numel()), "active_cols": int(inp["C"].numel()),
                                 "threads": torch.get_num_threads(), "torch": torch.__version__})
    out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2, iterations=1)
    assert out is not None
