"""One guard for every bench/test_bench_*.py: its cases run only when asked for, with the thread
count the benchmark file names (``BENCH_THREADS``), as bench/harness.py's ``bench_guard`` says."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import bench_guard  # noqa: E402


@pytest.fixture(autouse=True)
def _bench_guard(request):
    yield from bench_guard(request, getattr(request.module, "BENCH_THREADS", 2))
