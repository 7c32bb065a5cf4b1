"""The one-shot GPU check's own code, run where no GPU is: what would fail on the first GPU
machine for a reason a CPU can see (a wrong argument, a test id that no longer exists)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TRITON_SKIP_REASON

REPO = Path(__file__).resolve().parent.parent


def test_probe_tiny_pass_runs_every_route_on_the_cpu_kernels():
    from bench.gpu_probe import tiny_pass

    tiny_pass(device="cpu")


@pytest.mark.skipif(TRITON_SKIP_REASON is not None, reason=str(TRITON_SKIP_REASON))
def test_probe_tiny_pass_runs_every_route_on_the_triton_kernels():
    """The memcheck target drives the Triton kernels (here under the interpreter) through every route."""
    from bench.gpu_probe import tiny_pass

    tiny_pass(device="cpu", ops=torch.ops.fg_triton, dtypes=(torch.float32,))  # bf16 dot: see conftest


def test_quick_gpu_tests_exist():
    """Every test the GPU check names is collected (a renamed test would silently shrink it)."""
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    block = re.search(r"QUICK_TESTS=\((.*?)\)", script, re.S).group(1)
    ids = block.split()
    assert len(ids) >= 5, ids
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for test_id in ids:
        assert test_id.split("::")[-1] in out.stdout, f"{test_id} collects nothing"
