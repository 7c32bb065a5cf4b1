#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR -- the one-shot GPU check of fg_kernels on a cold, offline CUDA machine
# (H100/H200): build, quick CUDA tests, quick benchmark, probe, memcheck, summary, in at most 5 minutes wall.
#
#     bash bench/gpu_check.sh OUTDIR        # from any directory; on the device machine: ... "$OUT"
#
# Needs only what is installed there: python3 with torch (+CUDA), triton, pytest, setuptools, ninja, a
# C++ compiler. Nothing is downloaded or pip-installed; the extension is built in place and the
# tree is put on PYTHONPATH.
#
# Stages. Every stage runs even when an earlier one failed (a failed test stage does not skip the
# benchmark); the exit status is non-zero when any stage failed or ran out of time. A missed speed
# target is a result (in the table), not a failure.
#   1. build  python3 setup.py build_ext --inplace (MAX_JOBS=16), then imports fg_kernels; if that
#             fails, builds the same sources with torch.utils.cpp_extension.load (no setuptools
#             metadata involved) and copies fg_kernels/_C.so in place.          -> build.log
#   2. tests  the quick CUDA subset, FG_TRITON_AUTOTUNE=0 (fixed block configs, no autotuning):
#             tests/test_cuda.py (no-recompile over 200 patterns, CUDA graphs, no host sync,
#             inductor, CPU agreement) and, from the shared suites, the cuda parameters (-m gpu) of
#             the forward/gradient correctness tests in fp32/bf16/fp16, opcheck and torch.compile
#             of gated_linear and gathered_linear; pytest-xdist -n 8 when installed (else serial),
#             pytest-timeout per test when installed.           -> tests_quick.log, junit_quick.xml
#   3. bench  python3 bench/bench_gpu.py --quick (autotune ON, what users run): 4096->11008,
#             8192 tokens, bf16, s = 0 and 0.4, fwd and fwd+bwd.
#             TRITON_PRINT_AUTOTUNING=1: each tuning's choice and time in bench.log.
#                                          -> bench.log, RESULTS_GPU_quick.md, results_gpu_quick.json
#   4. probe  python3 bench/gpu_probe.py: versions (triton, its ptxas, driver), per-kernel times from
#             torch.profiler (fg fwd and fwd+bwd at s = 0 and 0.4), the autotuner's choices and
#             timings, the packed GEMM alone vs cuBLAS, the pack kernel's bandwidth, peak memory;
#             then, when compute-sanitizer exists, memcheck of a tiny pass through every route.
#                                                                                    -> probe.md
#   5. summary  stage status and times, test counts, failed tests, the ratio table. -> summary.txt
# OUTDIR gets these 8 files and nothing else (the device tool returns at most 8 files).
#
# Time budget (GPU_CHECK_TOTAL_S, default 300 s, for everything: with a machine start it leaves room
# for a second run in a 15-minute device budget): build at most 90 s (expect ~1 min); tests at most
# 80 s, keeping 175 s for what follows; the benchmark at most 100 s, keeping 75 s; the probe at most
# 45 s, keeping 30 s for memcheck. A stage over its time gets SIGINT (pytest and the
# benchmark then still write what they have), SIGKILL 15 s later.
#
# The full CUDA suite and the full benchmark, after this (same machine, warm Triton cache; see
# bench/RESULTS_GPU.md for the exact commands):
#     FG_TRITON_AUTOTUNE=0 PYTHONPATH=$PWD python3 -m pytest -n 8 -m gpu tests/test_cuda.py \
#         tests/test_gated_linear.py tests/test_gathered_linear.py tests/test_bad_input.py
#     PYTHONPATH=$PWD python3 -m pytest -n 4 -m gpu tests/test_cuda.py     # autotuning on
#     PYTHONPATH=$PWD python3 bench/bench_gpu.py --markdown OUTDIR/RESULTS_GPU.md --json OUTDIR/results_gpu.json
#
# Overrides: PYTHON (default python3), GPU_CHECK_TOTAL_S, GPU_CHECK_WORKERS (xdist workers, 0 =
# serial), MAX_JOBS (C++ build jobs).

set -u

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO:$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}

TOTAL_S=${GPU_CHECK_TOTAL_S:-300}
BUILD_CAP_S=90
TEST_CAP_S=80
BENCH_CAP_S=100
PROBE_CAP_S=45
BENCH_RESERVE_S=175   # kept after the tests for the benchmark, the probe and memcheck
PROBE_RESERVE_S=75    # kept after the benchmark for the probe and memcheck
MEMCHECK_RESERVE_S=30 # kept after the probe for memcheck
GRACE_S=15            # SIGINT at the limit, SIGKILL this much later
WORKERS=${GPU_CHECK_WORKERS:-8}

T0=$SECONDS
SUMMARY="$OUTDIR/summary.txt"
# Nothing stale from an earlier run in OUTDIR may pass for this run's results.
for f in summary.txt build.log tests_quick.log junit_quick.xml bench.log RESULTS_GPU_quick.md results_gpu_quick.json probe.md; do
    rm -f "$OUTDIR/$f"
done
: >"$SUMMARY"

say() { echo "[gpu_check $(( SECONDS - T0 ))s] $*"; }
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( TOTAL_S - (SECONDS - T0) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# Runs "$@" with a wall-clock limit of $1 seconds: SIGINT at the limit (so pytest and bench_gpu.py
# report what they have), SIGKILL GRACE_S later. SIGINT is reset to its default first: a shell
# started in the background may pass it on ignored, and Python then never sees it.
limited() {
    local t=$1
    shift
    if [ "$t" -lt 10 ]; then
        echo "no time left for: $*"
        return 124
    fi
    "$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' \
        timeout -k "$GRACE_S" -s INT "$t" "$@"
}

status_word() {
    case "$1" in
        0) echo "ok" ;;
        124) echo "TIMED OUT" ;;
        *) echo "FAILED (rc=$1)" ;;
    esac
}

# ------------------------------------------------------------------------------------------------
# 0. environment
# ------------------------------------------------------------------------------------------------
note "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $REPO, budget ${TOTAL_S}s"
note "git: $(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null | cut -c1-100) ($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) files changed)"
note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2 | tr '\n' ' ')"
note "$("$PY" - <<'EOF' 2>&1
import importlib.util, platform, sys
mods = {m: importlib.util.find_spec(m) is not None for m in ("xdist", "pytest_timeout", "hypothesis", "ninja")}
try:
    import torch
    t = f"torch {torch.__version__} (cuda {torch.version.cuda}, available {torch.cuda.is_available()})"
except Exception as e:
    t = f"torch import failed: {e!r}"
try:
    import triton
    tr = f"triton {triton.__version__}"
except Exception as e:
    tr = f"triton import failed: {e!r}"
print(f"python {platform.python_version()} ({sys.executable}); {t}; {tr}; "
      + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in mods.items()))
EOF
)"

# ------------------------------------------------------------------------------------------------
# 1. build the C++ extension in place
# ------------------------------------------------------------------------------------------------
say "1/4 build (log: build.log)"
t=$SECONDS
{
    echo "== $PY setup.py build_ext --inplace (MAX_JOBS=$MAX_JOBS)"
    limited "$(min "$BUILD_CAP_S" "$(left)")" "$PY" setup.py build_ext --inplace
    echo "== setup.py rc=$?"
    if ! "$PY" -c 'import sys, fg_kernels; sys.exit(0 if fg_kernels.library_loaded() else 1)'; then
        echo "== fg_kernels._C does not load after setup.py; fallback: torch.utils.cpp_extension.load"
        limited "$(min "$BUILD_CAP_S" "$(( $(left) - BENCH_RESERVE_S - 60 ))")" "$PY" - <<'EOF'
import glob, os, shutil
from torch.utils.cpp_extension import load

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
build_dir = os.path.join("build", "jit_C")
os.makedirs(build_dir, exist_ok=True)
load(name="_C", sources=sources, extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
     build_directory=build_dir, verbose=True)
shutil.copy(os.path.join(build_dir, "_C.so"), os.path.join("fg_kernels", "_C.so"))
print("copied", os.path.join("fg_kernels", "_C.so"))
EOF
        echo "== cpp_extension.load rc=$?"
    fi
    "$PY" - <<'EOF'
import sys

import torch

import fg_kernels
from fg_kernels import cuda_registration

ok = fg_kernels.library_loaded()
reg = cuda_registration.register() if ok else False
print(f"== import check: fg_kernels._C loaded {ok} ({getattr(fg_kernels._library, 'LOAD_ERROR', None)}); "
      f"CUDA kernels registered {reg}; cuda available {torch.cuda.is_available()}")
sys.exit(0 if ok and reg else 1)
EOF
} >"$OUTDIR/build.log" 2>&1
BUILD_RC=$?
BUILD_T=$(( SECONDS - t ))
grep -E "^== (setup|import|cpp_ext|fg_kernels)" "$OUTDIR/build.log"
[ "$BUILD_RC" -ne 0 ] && tail -n 25 "$OUTDIR/build.log"
say "build: $(status_word "$BUILD_RC") in ${BUILD_T}s"

# ------------------------------------------------------------------------------------------------
# 2. quick CUDA tests
# ------------------------------------------------------------------------------------------------
QUICK_TESTS=(
    tests/test_cuda.py
    tests/test_gated_linear.py::test_opcheck_gated_linear
    tests/test_gathered_linear.py::test_opcheck_gathered_linear
    tests/test_gated_linear.py::test_compile_aot_eager_fwd_bwd_no_recompile_on_new_pattern
    tests/test_gated_linear.py::test_compile_aot_eager_new_token_count
    tests/test_gathered_linear.py::test_compile_aot_eager_new_indices_no_recompile
    tests/test_gated_linear.py::test_forward_gate_patterns
    tests/test_gated_linear.py::test_forward_fp32_gates_lowp_x
    tests/test_gated_linear.py::test_grads_fp32
    tests/test_gated_linear.py::test_grads_low_precision
    tests/test_gated_linear.py::test_grads_gate_patterns
    tests/test_gated_linear.py::test_backward_op_output_mask
    tests/test_gathered_linear.py::test_compaction_matches_gated_linear
    tests/test_gathered_linear.py::test_grads
    tests/test_gathered_linear.py::test_forward_index_specs
)
PYTEST_OPTS=(-m "gpu and not slow" -v --tb=short -rfE --durations=15 -p no:cacheprovider
             --junitxml="$OUTDIR/junit_quick.xml")
if [ "$WORKERS" -gt 0 ] && "$PY" -c 'import xdist' >/dev/null 2>&1; then
    PYTEST_OPTS+=(-n "$WORKERS")
fi
if "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
    PYTEST_OPTS+=(--timeout=150)
fi
TEST_T_LIMIT=$(min "$TEST_CAP_S" "$(( $(left) - BENCH_RESERVE_S - GRACE_S - 10 ))")
say "2/4 quick CUDA tests, limit ${TEST_T_LIMIT}s (log: tests_quick.log)"
t=$SECONDS
{
    echo "== FG_TRITON_AUTOTUNE=0 $PY -m pytest ${QUICK_TESTS[*]} ${PYTEST_OPTS[*]}"
    FG_TRITON_AUTOTUNE=0 OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=1 \
        limited "$TEST_T_LIMIT" "$PY" -m pytest "${QUICK_TESTS[@]}" "${PYTEST_OPTS[@]}"
} >"$OUTDIR/tests_quick.log" 2>&1
TEST_RC=$?
TEST_T=$(( SECONDS - t ))
[ "$TEST_RC" -eq 5 ] && TEST_RC=1  # "no tests collected" is a failure here
tail -n 3 "$OUTDIR/tests_quick.log"
# Every test skipped (no CUDA device seen, say) is a failure too.
if [ "$TEST_RC" -eq 0 ] && ! grep -Eq "^=+ .*[0-9]+ passed" "$OUTDIR/tests_quick.log"; then
    echo "no test passed (all skipped?)"
    TEST_RC=1
fi
say "tests: $(status_word "$TEST_RC") in ${TEST_T}s"

# ------------------------------------------------------------------------------------------------
# 3. quick benchmark (autotune on)
# ------------------------------------------------------------------------------------------------
BENCH_T_LIMIT=$(min "$BENCH_CAP_S" "$(( $(left) - PROBE_RESERVE_S - GRACE_S ))")
say "3/4 quick benchmark, limit ${BENCH_T_LIMIT}s (log: bench.log)"
t=$SECONDS
set -o pipefail
FG_TRITON_AUTOTUNE=1 TRITON_PRINT_AUTOTUNING=1 limited "$BENCH_T_LIMIT" "$PY" bench/bench_gpu.py --quick \
    --markdown "$OUTDIR/RESULTS_GPU_quick.md" --json "$OUTDIR/results_gpu_quick.json" 2>&1 | tee "$OUTDIR/bench.log"
BENCH_RC=$?
set +o pipefail
BENCH_T=$(( SECONDS - t ))
say "bench: $(status_word "$BENCH_RC") in ${BENCH_T}s"

# ------------------------------------------------------------------------------------------------
# 4. probe (what the ratio table cannot say), then memcheck of every route
# ------------------------------------------------------------------------------------------------
PROBE_T_LIMIT=$(min "$PROBE_CAP_S" "$(( $(left) - MEMCHECK_RESERVE_S - GRACE_S ))")
say "4/4 probe, limit ${PROBE_T_LIMIT}s (report: probe.md)"
t=$SECONDS
FG_TRITON_AUTOTUNE=1 limited "$PROBE_T_LIMIT" "$PY" bench/gpu_probe.py --markdown "$OUTDIR/probe.md" \
    >"$OUTDIR/probe.err" 2>&1
PROBE_RC=$?
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
{
    [ "$PROBE_RC" -ne 0 ] && { echo "## probe output (last lines; rc=$PROBE_RC)"; echo; tail -n 20 "$OUTDIR/probe.err"; echo; }
    echo "## compute-sanitizer memcheck of a tiny pass through every route"
    echo
    if [ -n "$SANITIZER" ]; then
        # No caching allocator: every tensor is its own allocation, so an access past one is seen.
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 FG_TRITON_AUTOTUNE=0 limited "$(( $(left) - GRACE_S - 5 ))" \
            "$SANITIZER" --tool memcheck --error-exitcode 3 "$PY" bench/gpu_probe.py --tiny-pass 2>&1 | tail -n 25
        MEMCHECK_RC=${PIPESTATUS[0]}
        echo "memcheck rc=$MEMCHECK_RC"
    else
        echo "compute-sanitizer not found: not run"
        MEMCHECK_RC=0
    fi
} >>"$OUTDIR/probe.md" 2>&1
rm -f "$OUTDIR/probe.err"
PROBE_T=$(( SECONDS - t ))
say "probe: $(status_word "$PROBE_RC"), memcheck: $(status_word "${MEMCHECK_RC:-0}") in ${PROBE_T}s"

# ------------------------------------------------------------------------------------------------
# 5. summary
# ------------------------------------------------------------------------------------------------
{
    echo
    echo "== stages"
    echo "build  $(status_word "$BUILD_RC") in ${BUILD_T}s"
    echo "tests  $(status_word "$TEST_RC") in ${TEST_T}s (limit ${TEST_T_LIMIT}s)"
    echo "bench  $(status_word "$BENCH_RC") in ${BENCH_T}s (limit ${BENCH_T_LIMIT}s)"
    echo "probe  $(status_word "$PROBE_RC"), memcheck $(status_word "${MEMCHECK_RC:-0}"), in ${PROBE_T}s (limit ${PROBE_T_LIMIT}s)"
    echo "total  $(( SECONDS - T0 ))s"
    echo
    echo "== quick CUDA tests"
    "$PY" - "$OUTDIR/junit_quick.xml" "$OUTDIR/tests_quick.log" <<'EOF'
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

xml, log = Path(sys.argv[1]), Path(sys.argv[2])
text = log.read_text(errors="replace") if log.exists() else ""
counts = None
if xml.exists():
    try:
        root = ET.parse(xml).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
        counts = "junit: {passed} passed, {failures} failed, {errors} errors, {skipped} skipped of {tests}".format(**tot)
    except Exception as e:  # a truncated file after a kill
        counts = f"junit unreadable ({e})"
print(counts or "junit: not written (killed?)")
# Per-test result lines of -v, counted even when the run was cut short: with xdist
# "[gw3] [ 12%] PASSED tests/...", serial "tests/...::test[id] PASSED   [ 12%]".
per = {}
words = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
for m in re.finditer(rf"^(?:\[gw\d+\] \[\s*\d+%\] ({words}) |\S+::\S+ ({words})\b)", text, re.M):
    word = m.group(1) or m.group(2)
    per[word] = per.get(word, 0) + 1
if per:
    print("log lines: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(per.items())))
final = [l for l in text.splitlines() if re.match(r"^=+ .*\bin [0-9.]+s", l)]
sel = (re.search(r"workers \[(\d+) items?\]", text) or re.search(r"(\d+) selected", text)
       or re.search(r"collected (\d+) items?", text))
if final:
    print("pytest: " + final[-1].strip("= ") + (f" (of {sel.group(1)} selected)" if sel else ""))
failed = [l for l in text.splitlines() if re.match(r"^(FAILED|ERROR) tests/", l)]
for l in failed[:30]:
    print("  " + l[:200])
if len(failed) > 30:
    print(f"  ... and {len(failed) - 30} more (tests_quick.log)")
if "Interrupted" in text or "KeyboardInterrupt" in text or "Timeout" in text:
    print("note: the run was interrupted or a test timed out (tests_quick.log)")
EOF
    echo
    echo "== quick benchmark (bf16, 8192 tokens; targets: fwd fg/compact-ideal <= 1.10 at s >= 0.2, fg/dense <= 1.05 at s = 0; fwd+bwd fg/compact-ideal <= 1.15)"
    if [ -s "$OUTDIR/RESULTS_GPU_quick.md" ]; then
        cat "$OUTDIR/RESULTS_GPU_quick.md"
    else
        echo "no table written; last lines of bench.log:"
        tail -n 15 "$OUTDIR/bench.log" 2>/dev/null
    fi
} 2>&1 | tee -a "$SUMMARY"

RC=0
for r in "$BUILD_RC" "$TEST_RC" "$BENCH_RC" "$PROBE_RC" "${MEMCHECK_RC:-0}"; do
    [ "$r" -ne 0 ] && RC=1
done
say "done: exit $RC; files in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
exit "$RC"
