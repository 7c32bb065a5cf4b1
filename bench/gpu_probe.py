#!/usr/bin/env python
"""What one GPU run must answer beyond bench_gpu.py's ratio table, in one short process:

    python bench/gpu_probe.py --markdown OUTDIR/probe.md        # after bench_gpu.py (warm caches)
    compute-sanitizer --tool memcheck python bench/gpu_probe.py --tiny-pass

Sections of the report (LLaMA-7B 4096->11008, 8192 tokens, bf16 unless ``--quick-shape``):

- versions: torch, CUDA, triton, the ptxas triton compiles sm_90 with, the driver, the device;
- kernels: per-kernel device time of ``fg`` forward and forward+backward at sparsity 0 and 0.4,
  from ``torch.profiler`` (which kernel a missed ratio comes from);
- autotuning: every tuned key of the GEMM kernels with its chosen config and, for the last
  tuning of each kernel, the timings of the configs it tried;
- the packed GEMM alone (``gathered_linear`` on operands packed before timing) against cuBLAS
  (``F.linear``) on the same operands: what the kernel costs without its gathers;
- the pack kernel alone: bytes moved per second against a plain device copy of the same bytes;
- peak memory of forward+backward, dense vs masked vs fg at sparsity 0.4.

``--tiny-pass`` runs every route once on tiny shapes (all gates open, some closed, all closed,
LoRA, fp32 gates, the gathered op with and without index lists) and exits: the memcheck target.
The report is written section by section, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench_gpu import make_case, make_fn  # noqa: E402  (the benchmark's own cases)

TUNED_KERNELS = ("gmm_full_kernel", "gmm_compact_kernel", "mtm_kernel")


def versions(arch: int = 90) -> List[str]:
    """The software a GPU figure depends on, one line each (``arch``: the ptxas triton uses for it)."""
    import triton

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton.__version__}; "
             f"python {sys.version.split()[0]}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        arch = 10 * p.major + p.minor
        lines.append(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                     f"{p.total_memory / 2**30:.0f} GiB")
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        lines.append(f"driver {out.stdout.strip() or out.stderr.strip()}")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path  # the ptxas triton runs for this arch (it differs between versions)
        ver = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        lines.append(f"ptxas {path}: {ver.splitlines()[-1] if ver else '?'}")
    except Exception as e:  # a triton without this helper: say so, do not fail the report
        lines.append(f"ptxas: not found through triton ({type(e).__name__}: {e})")
    return lines


def kernel_profile(fn: Callable, iters: int) -> List[str]:
    """Markdown rows: each device kernel that ``fn`` launches, calls per iteration, µs per call and
    its share of the device time (torch.profiler, ``iters`` iterations after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if _device_us(e) > 0]
    total = sum(_device_us(e) for e in events) or 1.0
    rows = []
    for e in sorted(events, key=_device_us, reverse=True)[:12]:
        rows.append(f"| {e.key[:70]} | {e.count / iters:.1f} | {_device_us(e) / e.count:.1f} | "
                    f"{100 * _device_us(e) / total:.0f}% |")
    rows.append(f"| total per iteration | | {total / iters:.1f} | 100% |")
    return rows


def _device_us(event) -> float:
    """Self device time of a profiler average (the attribute's name differs between versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        v = getattr(event, name, None)
        if v:
            return float(v)
    return 0.0


def autotune_rows(km) -> List[str]:
    """Markdown rows: every tuned key of each GEMM kernel and its config; the last tuning's timings."""
    rows = []
    for name in TUNED_KERNELS:
        k = getattr(km, name, None)
        cache = getattr(k, "cache", None)
        if cache is None:
            rows.append(f"| {name} | not autotuned (FG_TRITON_AUTOTUNE=0 or float64) | |")
            continue
        for key, cfg in cache.items():
            rows.append(f"| {name} | {_short(key)} | {cfg} |")
        timings = getattr(k, "configs_timings", None) or {}
        ranked = sorted(timings.items(), key=lambda kv: _ms(kv[1]))
        for cfg, t in ranked[:6]:
            rows.append(f"| {name} (last tuning) | {_ms(t):.3f} ms | {cfg} |")
    return rows


def _short(key) -> str:
    text = ", ".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
    return text[:90]


def _ms(t) -> float:
    return float(t[0] if isinstance(t, (list, tuple)) else t)


def packed_gemm_vs_cublas(c: dict, bench: Callable) -> List[str]:
    """The packed GEMM of ``gathered_linear`` (compact input and output) and cuBLAS, same operands."""
    xc, wc = c["xcg"], c["weight_c"]
    ours = bench(lambda: torch.ops.fg.gathered_linear(xc, wc, None, None, None, wc.shape[0]))
    cublas = bench(lambda: F.linear(xc, wc))
    flops = 2 * xc.shape[0] * xc.shape[1] * wc.shape[0]
    return [f"| {tuple(xc.shape)} x {tuple(wc.shape)}ᵀ | {ours:.3f} | {cublas:.3f} | {ours / cublas:.3f} | "
            f"{flops / ours / 1e9:.0f} |"]


def pack_bandwidth(c: dict, bench: Callable) -> List[str]:
    """The column-gather pack kernel alone: GB/s against a device copy of as many bytes."""
    from fg_kernels.triton import _launch as L

    x, cols = c["x"], c["C"].to(torch.int32)
    dst = torch.empty((x.shape[0], cols.numel()), dtype=x.dtype, device=x.device)
    gather = L.Gather(cols.contiguous())
    t_pack = bench(lambda: L.pack(src=x, dst=dst, route=L.Route(L.ALWAYS), cols=gather))
    flat_src, flat_dst = x.reshape(-1)[: dst.numel()], dst.reshape(-1)
    t_copy = bench(lambda: flat_dst.copy_(flat_src))
    moved = 2 * dst.numel() * dst.element_size()
    return [f"| x{tuple(x.shape)}[:, {cols.numel()} cols] | {t_pack:.3f} | {moved / t_pack / 1e6:.0f} | "
            f"{moved / t_copy / 1e6:.0f} | {t_pack / t_copy:.2f} |"]


def peak_memory_rows(c: dict) -> List[str]:
    """Peak memory above the inputs of one forward+backward, per variant."""
    rows = []
    for variant in ("dense", "masked", "fg"):
        fn = make_fn(variant, "fwd_bwd", c)
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        rows.append(f"| {variant} | {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} |")
    return rows


def tiny_pass(device: str = "cuda", ops=None, dtypes=(torch.bfloat16, torch.float32)) -> None:
    """Every route of both ops once, on tiny shapes (the target of compute-sanitizer memcheck);
    ``ops``: the op namespace (``torch.ops.fg``; ``torch.ops.fg_triton`` runs the same kernels
    under the interpreter on the CPU)."""
    ops = ops or torch.ops.fg
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        x = torch.randn(37, 70, generator=gen).to(device, dtype).requires_grad_()
        w = torch.randn(90, 70, generator=gen).to(device, dtype)
        b = torch.randn(90, generator=gen).to(device, dtype).requires_grad_()
        a_lo, b_lo = (torch.randn(4, 70, generator=gen).to(device, dtype).requires_grad_(),
                      torch.randn(90, 4, generator=gen).to(device, dtype).requires_grad_())
        for closed in (0.0, 0.4, 1.0):
            for gate_dtype in (dtype, torch.float32):
                gr = (torch.rand(90, generator=gen) >= closed).to(device, gate_dtype).requires_grad_()
                gc = (torch.rand(70, generator=gen) >= closed).to(device, gate_dtype).requires_grad_()
                y = ops.gated_linear(x, w, b, gr, gc, a_lo, b_lo, 0.5)
                torch.autograd.grad(y.float().square().sum(), (x, b, gr, gc, a_lo, b_lo))
        rows, cols = torch.randperm(90, generator=gen)[:50].to(device), torch.randperm(70, generator=gen)[:40].to(device)
        wc = w[rows][:, cols].contiguous()
        for r, c_, inp in ((rows, cols, x), (None, cols, x), (rows, None, x[:, :40]), (None, None, x[:, :40])):
            ops.gathered_linear(inp.detach(), wc, None, r, c_, 90 if r is not None else 50)
    if device == "cuda":
        torch.cuda.synchronize()


def _section(path: Path, title: str, header: str, rows_fn: Callable[[], List[str]]) -> None:
    """Appends one markdown section; a section that fails says why instead of ending the report."""
    try:
        rows = rows_fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        rows = [f"failed: {type(e).__name__}: {str(e)[:300]}"]
        header = ""
    text = "\n".join([f"## {title}", "", *([header] if header else []), *rows, ""]) + "\n"
    print(text, flush=True)
    with path.open("a") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", type=Path, help="write the report here (section by section)")
    ap.add_argument("--tiny-pass", action="store_true", help="every route once on tiny shapes, then exit")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=10, help="profiled iterations per case")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_probe.py: needs a CUDA device; nothing measured.")
        return 2
    from triton.testing import do_bench

    from fg_kernels import cuda_registration
    from fg_kernels.triton import _launch as L

    if not cuda_registration.register():
        print("gpu_probe.py: the CUDA kernels of fg are not registered (is fg_kernels built?).")
        return 2
    if args.tiny_pass:
        tiny_pass()
        print("gpu_probe.py: tiny pass over every route done")
        return 0
    out = args.markdown or Path("probe.md")
    out.write_text("# GPU probe (bench/gpu_probe.py)\n\n")
    bench = lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    _section(out, "Versions", "", lambda: [f"- {line}" for line in versions()])
    cases = {s: make_case(4096, 11008, args.tokens, s, torch.bfloat16) for s in (0.0, 0.4)}
    for s, c in cases.items():
        for mode in ("fwd", "fwd_bwd"):
            _section(out, f"Kernels of fg, {mode}, sparsity {s} (4096->11008, {args.tokens} tokens, bf16)",
                     "| kernel | calls | µs per call | share |\n|---|---:|---:|---:|",
                     lambda: kernel_profile(make_fn("fg", mode, c), args.iters))
    _section(out, "Autotuning (key -> chosen config; the last tuning's fastest configs)",
             "| kernel | key or time | config |\n|---|---|---|", lambda: autotune_rows(L.kernel_module(False)))
    _section(out, "Packed GEMM alone vs cuBLAS (sparsity 0.4, operands packed before timing)",
             "| operands | fg ms | cuBLAS ms | fg / cuBLAS | fg TFLOP/s |\n|---|---:|---:|---:|---:|",
             lambda: packed_gemm_vs_cublas(cases[0.4], bench))
    _section(out, "Pack kernel alone (sparsity 0.4)",
             "| gather | ms | GB/s | copy GB/s | pack / copy |\n|---|---:|---:|---:|---:|",
             lambda: pack_bandwidth(cases[0.4], bench))
    _section(out, "Peak memory of forward+backward above the inputs (sparsity 0.4)",
             "| variant | MiB |\n|---|---:|", lambda: peak_memory_rows(cases[0.4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
