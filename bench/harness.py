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

import argparse
import datetime as _dt
import fcntl
import gc
import math
import importlib.util
import os
import platform
import statistics
import subprocess
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LOCK = Path(tempfile.gettempdir()) / "fg_bench.lock"

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
    usable = usable_cpus()
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


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OtherLoad:
    """CPU time used by *other* processes while a block runs, as a fraction of all CPUs' time
    (from /proc/stat minus this process's own CPU time): an objective noise indicator on a
    shared machine. ``fraction`` is None where /proc/stat is unavailable."""

    def __init__(self):
        self.fraction = None

    @staticmethod
    def _busy_s():
        try:
            with open("/proc/stat") as fh:
                f = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...
        busy = f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
        return busy / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._b0, self._t0, self._w0 = self._busy_s(), os.times(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        b1, t1, w1 = self._busy_s(), os.times(), time.perf_counter()
        if self._b0 is None or b1 is None:
            return False
        own = (t1.user - self._t0.user) + (t1.system - self._t0.system)
        ncpu = usable_cpus()
        wall = max(w1 - self._w0, 1e-9)
        self.fraction = max(0.0, ((b1 - self._b0) - own) / (wall * ncpu))
        return False


class Spinner:
    """A process that spins on one core while the block runs (the ``loaded`` condition)."""

    def __enter__(self):
        # Spins until this process is gone, even when it is killed without cleaning up.
        spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100000): pass\n"
        self._proc = subprocess.Popen([sys.executable, "-c", spin])
        time.sleep(0.3)  # let it start and take its core
        return self

    def __exit__(self, *exc):
        self._proc.kill()
        self._proc.wait()
        return False


def _run_once(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    del out  # freed outside the timed region
    return t1 - t0


def time_interleaved(fns, warmup: int, budget_s: float, min_rounds: int, max_rounds: int):
    """``({name: [seconds per round]}, rounds)``; every round runs every fn once, rotating order."""
    names = list(fns)
    round_s = None
    for _ in range(max(1, warmup)):
        round_s = sum(_run_once(fns[n]) for n in names)
    rounds = int(min(max_rounds, max(min_rounds, math.ceil(budget_s / max(round_s, 1e-6)))))
    times = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                times[n].append(_run_once(fns[n]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, rounds


def stats(xs) -> Dict[str, float]:
    """Median, quartiles and extremes of one variant's per-round times."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": xs[0], "max": xs[-1]}


def timing_flags(p: argparse.ArgumentParser, *, budget_help: str, min_rounds: Optional[int], max_rounds: int,
                 warmup: int, threads: int, min_rounds_help: Optional[str] = None,
                 warmup_help: str = "warm-up rounds per case") -> None:
    """The flags every CPU benchmark takes (--budget, --min-rounds, --max-rounds, --warmup,
    --threads, --no-lock), with that script's defaults."""
    p.add_argument("--budget", type=float, default=None, help=budget_help)
    p.add_argument("--min-rounds", type=int, default=min_rounds, help=min_rounds_help)
    p.add_argument("--max-rounds", type=int, default=max_rounds)
    p.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    p.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads}: this CPU)")
    p.add_argument("--no-lock", action="store_true", help=f"do not wait for / hold the machine lock ({LOCK})")


def shown_path(arg: str) -> str:
    """A path as a reader of the results can use it: relative to the repository inside it, else only
    its name (one machine's folders mean nothing elsewhere); other arguments unchanged."""
    if not arg.startswith("/"):
        return arg
    p = Path(arg)
    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return "…/" + p.name


def command_line(script: str, argv=None) -> str:
    """The command that made a result, as recorded beside it (paths by :func:`shown_path`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", script] + [shlex.quote(shown_path(a)) for a in args])
