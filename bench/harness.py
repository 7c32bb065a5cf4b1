"""The harness every benchmark script shares: one machine lock, the machine record, the pytest guard.

- :func:`hold_machine`: one benchmark at a time on this machine (timings taken while another heavy
  job runs are noise). An ``flock`` on ``LOCK``, which the kernel drops however the holder ends, so a
  killed benchmark never leaves the machine locked; the file names the script that holds it.
- :func:`environment_record`: CPU model (with ISA flags), threads, versions, commit and the build of
  the op, written beside every result.
- :func:`explicitly_requested` / :func:`bench_guard`: the ``bench/test_bench_*.py`` cases run only
  when asked for (``FG_BENCH=1``, a ``--benchmark-*`` option, or a path under ``bench/``), with the
  benchmark's thread count.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import importlib.util
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LOCK = Path("/tmp/fg_bench.lock")

_held = None  # the open lock file while this process holds the machine


def hold_machine(owner: str, log: Callable[[str], None] = print) -> None:
    """Blocks until no other benchmark holds the machine, then holds it until this process ends."""
    global _held
    if _held is not None:
        return
    fh = open(LOCK, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        log(f"waiting for {LOCK} (held by {fh.read().strip() or 'another benchmark'}) ...")
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocks until the holder ends
    fh.seek(0)
    fh.truncate()
    fh.write(f"{owner} pid {os.getpid()}\n")
    fh.flush()
    _held = fh




def cpu_model() -> str:
    model = None
    extra = []
    try:
        with open("/proc/cpuinfo") as fh:
            info = {}
            for line in fh:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
                elif info:
                    break
        model = info.get("model name")
        if "cpu family" in info and "model" in info:
            extra.append(f"family {info['cpu family']} model {info['model']}")
        flags = set(info.get("flags", "").split())
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
        if isa:
            extra.append("/".join(isa))
    except OSError:
        pass
    if not model:
        try:
            import cpuinfo  # py-cpuinfo

            model = cpuinfo.get_cpu_info().get("brand_raw")
        except Exception:  # noqa: BLE001
            model = None
    model = model or platform.processor() or platform.machine()
    return model + (f" ({', '.join(extra)})" if extra else "")


def _torch_config_lines():
    keep = ("Math Kernel Library", "MKL-DNN", "oneDNN", "OpenMP", "CPU capability")
    return [ln.strip(" -") for ln in torch.__config__.show().splitlines() if any(k in ln for k in keep)]


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return None


def _fg_build_info():
    """Compiled extension files of fg_kernels with their modification times (to see whether the
    op timed is the latest build)."""
    files = []
    try:
        spec = importlib.util.find_spec("fg_kernels")
        dirs = list(spec.submodule_search_locations or []) if spec else []
    except Exception:  # noqa: BLE001
        dirs = []
    for d in dirs:
        for p in sorted(Path(d).glob("*.so")) + sorted(Path(d).glob("*.pyd")):
            mtime = _dt.datetime.fromtimestamp(p.stat().st_mtime).astimezone().isoformat(timespec="seconds")
            files.append({"file": str(p), "mtime": mtime})
    return files


def environment_record(op_name: Optional[str] = None) -> Dict[str, object]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_config": _torch_config_lines(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "fg_op": op_name,
        "fg_build": _fg_build_info(),
    }




def explicitly_requested(config) -> bool:
    """Whether this pytest run asked for the benchmarks (they are skipped in a plain ``pytest``)."""
    if os.environ.get("FG_BENCH", "") not in ("", "0"):
        return True
    for opt in ("benchmark_only", "benchmark_enable", "benchmark_disable"):
        try:
            if config.getoption(opt):
                return True
        except ValueError:
            pass
    for arg in config.args:
        p = Path(str(arg).split("::", 1)[0])
        p = (Path(config.invocation_params.dir) / p).resolve() if not p.is_absolute() else p.resolve()
        if p == BENCH_DIR or BENCH_DIR in p.parents:
            return True
    return False


def bench_guard(request, threads: int):
    """The body of each benchmark file's autouse fixture: skip unless asked for, else run with
    ``threads`` intra-op threads."""
    import pytest

    if not explicitly_requested(request.config):
        name = Path(str(request.node.fspath)).name
        pytest.skip(f"heavy benchmark: run `python -m pytest bench/{name} --benchmark-only`")
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(prev)
