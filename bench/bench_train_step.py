"""One full training step (forward, backward, AdamW) of a ~60M LLaMA: FineGates vs masked vs LoRA.

    python bench/bench_train_step.py [--quick] [--write-results]

Issue 4 item 6. Model: ``LlamaForCausalLM`` from ``/work/shared/data/llama_configs/llama_60m.json``
(hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 32000; random init, no download), fp32,
batch 8 x 256 random token ids, ``torch.set_num_threads(2)``. Targets: the 7 Linears of every block
(q, k, v, o, gate, up, down proj). Variants, all on the same weights and inputs:

``fg``
    ``finegates.sparsify(model, target_sparsity=s)``; in every gated layer exactly ``round(s*n)``
    random rows and ``round(s*k)`` random columns get ``theta = -5`` (gate value 0 whatever the
    N(0, 0.1^2) noise short of a 5-sigma draw), the rest ``theta = +3`` (value 1 after the clamp);
    loss = LM loss + 0.1 * ``finegates.sparsity_loss``; AdamW over the trainable parameters (gates).
``masked``
    the reference's dense formulation: each target Linear replaced by ``MaskedLinear`` computing
    ``F.linear(x * g_c, W, b) * g_r`` with the same gate parametrisation (``finegates.Gates``),
    the same theta values, loss and trainable set.
``lora``
    PEFT LoRA r=8, alpha=16 on the same modules, dense base, AdamW over the LoRA parameters.

Step time: median over N timed steps per (variant, sparsity) after warm-up; within a sparsity the
variants are interleaved round by round (fg, masked, lora, fg, ...) so the ratios come from one run.
Peak memory: for each (variant, sparsity) a fresh subprocess builds the model, records the RSS, resets
the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5), runs 1-2 steps (the first allocates
the optimizer state, the second runs with it) and reads ``VmHWM``
(falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss``); reported as the peak RSS of the
process during training and as the growth over the RSS before the first step (model loaded).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

import finegates  # noqa: E402
from finegates import Gates, GatedLinear  # noqa: E402

CONFIG_PATH = Path("/work/shared/data/llama_configs/llama_60m.json")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 8, 256
THREADS = 2
LAMBDA = 0.1
THETA_CLOSED, THETA_OPEN = -5.0, 3.0
VARIANTS = ("fg", "masked", "lora")
FULL_SPARSITIES = (0.0, 0.2, 0.4)
QUICK_SPARSITIES = (0.0, 0.4)
LOCK = Path("/tmp/fg_bench.lock")
RESULTS = BENCH_DIR / "RESULTS_TRAIN.md"

# ------------------------------------------------------------------------------------------------
# Model, variants
# ------------------------------------------------------------------------------------------------


def llama_config():
    from transformers import LlamaConfig

    cfg = json.loads(CONFIG_PATH.read_text())
    for k in ("architectures", "transformers_version", "max_sequence_length"):
        cfg.pop(k, None)
    cfg["pad_token_id"] = None  # -1 in the file (original LLaMA); no padding here
    cfg["max_position_embeddings"] = 1024
    cfg["use_cache"] = False
    return LlamaConfig(**cfg)


def build_base(seed: int = 0) -> nn.Module:
    """Random-init LLaMA, identical for the same seed (fp32, train mode, all params frozen later)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config())
    model.train()
    return model


def make_inputs(seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, llama_config().vocab_size, (BATCH, SEQ), generator=g)


class MaskedLinear(nn.Module):
    """The reference's dense formulation: ``F.linear(x * g_c, W, b) * g_r`` on the frozen base
    weight (no copy), gates with the FineGates parametrisation."""

    def __init__(self, base: nn.Linear, target_sparsity: float, sigma: float = 0.1):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        n, k = self.weight.shape
        self.row_gates = Gates(n, sigma=sigma)
        self.col_gates = Gates(k, sigma=sigma)
        self.target_sparsity = float(target_sparsity)

    def forward(self, x: Tensor) -> Tensor:
        g_r, g_c = self.row_gates.values(), self.col_gates.values()
        return F.linear(x * g_c, self.weight, self.bias) * g_r


def masked_sparsity_loss(model: nn.Module) -> Tensor:
    """``finegates.sparsity_loss``'s formula on the MaskedLinear layers."""
    terms = []
    for m in model.modules():
        if isinstance(m, MaskedLinear):
            t = 1.0 - m.target_sparsity
            means = torch.stack((m.row_gates.keep_probability().mean(), m.col_gates.keep_probability().mean()))
            terms.append((means - t).abs().mean())
    return torch.stack(terms).mean()


def gate_layers(model: nn.Module):
    """``(name, layer)`` for GatedLinear / MaskedLinear layers, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (GatedLinear, MaskedLinear))]


def set_gate_pattern(model: nn.Module, sparsity: float, seed: int = 0, sigma: Optional[float] = None) -> None:
    """Exactly round(s*n) random rows and round(s*k) random columns closed (theta=-5) in every gated
    layer, the rest open (theta=+3); the pattern depends only on (layer name, s, seed), so fg and
    masked get the same one. Also sets the layers' target_sparsity and, if given, sigma."""
    with torch.no_grad():
        for name, layer in gate_layers(model):
            layer.target_sparsity = float(sparsity)
            for which, gates in (("row", layer.row_gates), ("col", layer.col_gates)):
                g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{which}:{sparsity:.3f}:{seed}".encode()))
                closed = torch.randperm(gates.size, generator=g)[: round(sparsity * gates.size)]
                gates.theta.fill_(THETA_OPEN)
                gates.theta[closed] = THETA_CLOSED
                if sigma is not None:
                    gates.sigma = float(sigma)


def _replace(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in TARGET_MODULES]
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(n, getattr(parent, child)))


def build_variant(variant: str, sparsity: float, seed: int = 0) -> nn.Module:
    """The model of one variant with its gate pattern set (fg/masked); train mode."""
    model = build_base(seed)
    if variant == "fg":
        finegates.sparsify(model, target_sparsity=sparsity, target_modules=TARGET_MODULES, verbose=False)
        set_gate_pattern(model, sparsity, seed)
    elif variant == "masked":
        for p in model.parameters():
            p.requires_grad_(False)
        _replace(model, lambda n, lin: MaskedLinear(lin, sparsity))
        set_gate_pattern(model, sparsity, seed)
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES))
    else:
        raise ValueError(variant)
    model.train()
    return model


def loss_fn(variant: str, model: nn.Module, ids: Tensor) -> Tensor:
    lm = model(input_ids=ids, labels=ids).loss
    if variant == "fg":
        return lm + LAMBDA * finegates.sparsity_loss(model)
    if variant == "masked":
        return lm + LAMBDA * masked_sparsity_loss(model)
    return lm


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def make_step(variant: str, model: nn.Module, ids: Tensor) -> Callable[[], float]:
    """A closure running one full training step; returns the loss."""
    opt = make_optimizer(model)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(variant, model, ids)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------
# Correctness, timing, memory
# ------------------------------------------------------------------------------------------------


def check_fg_vs_masked(sparsity: float = 0.4, seed: int = 0) -> Dict[str, float]:
    """sigma = 0 (deterministic gates): total loss of fg vs masked. (Gate-logit gradients are not
    compared: with theta in {-5, +3} the clamp saturates and they are exactly zero in both.)"""
    ids = make_inputs(seed)
    out = {}
    for v in ("fg", "masked"):
        model = build_variant(v, sparsity, seed)
        set_gate_pattern(model, sparsity, seed, sigma=0.0)
        n_layers = sum(isinstance(m, GatedLinear if v == "fg" else MaskedLinear) for m in model.modules())
        assert n_layers == 7 * llama_config().num_hidden_layers, (v, n_layers)
        with torch.no_grad():
            out[v] = float(loss_fn(v, model, ids))
        del model
    rel = abs(out["fg"] - out["masked"]) / abs(out["masked"])
    return {"sparsity": sparsity, "loss_fg": out["fg"], "loss_masked": out["masked"], "loss_rel_err": rel,
            "ok": rel < 1e-4}


def time_sparsity(sparsity: float, steps: int, warmup: int, seed: int = 0,
                  variants=VARIANTS, log=print) -> Dict[str, Dict[str, object]]:
    """Median step time per variant at one sparsity, variants interleaved round by round."""
    ids = make_inputs(seed)
    models = {v: build_variant(v, sparsity, seed) for v in variants}
    stepfn = {v: make_step(v, models[v], ids) for v in variants}
    for _ in range(warmup):
        for v in variants:
            stepfn[v]()
    times: Dict[str, List[float]] = {v: [] for v in variants}
    losses: Dict[str, float] = {}
    for r in range(steps):
        for v in variants:
            t0 = time.perf_counter()
            losses[v] = stepfn[v]()
            times[v].append(time.perf_counter() - t0)
        log(f"  s={sparsity:.1f} round {r + 1}/{steps}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in variants))
    res = {}
    for v in variants:
        res[v] = {"median_s": statistics.median(times[v]), "min_s": min(times[v]), "times": times[v],
                  "trainable": trainable_count(models[v]), "last_loss": losses[v]}
    return res


def _rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _hwm_kb() -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_memory_inprocess(variant: str, sparsity: float, steps: int = 2, seed: int = 0) -> Dict[str, object]:
    """Peak RSS of this process over ``steps`` training steps (call in a fresh process)."""
    torch.set_num_threads(THREADS)
    ids = make_inputs(seed)
    model = build_variant(variant, sparsity, seed)
    step = make_step(variant, model, ids)
    base = _rss_kb()
    reset = _reset_hwm()
    for _ in range(steps):
        step()
    if reset and _hwm_kb() is not None:
        peak, method = _hwm_kb(), "VmHWM after clear_refs=5"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    return {"variant": variant, "sparsity": sparsity, "rss_before_kb": base, "peak_kb": peak,
            "growth_kb": peak - base, "method": method}


def measure_memory(variant: str, sparsity: float, steps: int = 2) -> Dict[str, object]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", variant, str(sparsity), str(steps)]
    # A fixed mmap threshold stops glibc from moving it up after large frees, so freed activation
    # blocks go back to the OS and the RSS peak tracks live tensors (not allocator history).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=str(REPO_ROOT), env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> Dict[str, str]:
    import transformers

    try:
        import peft

        pv = peft.__version__
    except ImportError:
        pv = "not installed"
    return {"cpu": _cpu_model(), "logical_cpus": str(os.cpu_count()), "threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": pv,
            "python": platform.python_version(),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def evaluate(timing: Dict[float, Dict], memory: Dict, check: Dict) -> List[Dict[str, object]]:
    rows = []
    for s, res in sorted(timing.items()):
        fg, masked, lora = res["fg"]["median_s"], res["masked"]["median_s"], res["lora"]["median_s"]
        row = {"sparsity": s, "fg_s": fg, "masked_s": masked, "lora_s": lora,
               "fg_masked": fg / masked, "fg_lora": fg / lora}
        mf, ml = memory.get(("fg", s)), memory.get(("lora", s)) or memory.get(("lora", None))
        mm = memory.get(("masked", s))
        if mf and ml:
            row.update(fg_peak_mb=mf["peak_kb"] / 1024, lora_peak_mb=ml["peak_kb"] / 1024,
                       fg_growth_mb=mf["growth_kb"] / 1024, lora_growth_mb=ml["growth_kb"] / 1024,
                       peak_ratio=mf["peak_kb"] / ml["peak_kb"], growth_ratio=mf["growth_kb"] / ml["growth_kb"])
        if mm:
            row.update(masked_peak_mb=mm["peak_kb"] / 1024, masked_growth_mb=mm["growth_kb"] / 1024)
        rows.append(row)
    return rows


def targets(rows) -> List[str]:
    out = []
    for r in rows:
        s = r["sparsity"]
        if abs(s - 0.4) < 1e-9:
            ok = r["fg_masked"] <= 0.65
            out.append(f"- step time at s=0.4: fg/masked = {r['fg_masked']:.3f} (target <= 0.65): "
                       f"**{'PASS' if ok else 'MISS'}** (margin {0.65 - r['fg_masked']:+.3f})")
        if abs(s) < 1e-9:
            ok = r["fg_masked"] <= 1.05
            out.append(f"- step time at s=0: fg/masked = {r['fg_masked']:.3f} (target <= 1.05): "
                       f"**{'PASS' if ok else 'MISS'}** (margin {1.05 - r['fg_masked']:+.3f})")
    for r in rows:
        if "peak_ratio" in r:
            ok1, ok2 = r["peak_ratio"] <= 1.0, r["growth_ratio"] <= 1.0
            out.append(f"- peak memory at s={r['sparsity']:.1f}: fg/lora peak RSS = {r['peak_ratio']:.3f} "
                       f"**{'PASS' if ok1 else 'MISS'}**; fg/lora peak RSS growth over the loaded model = "
                       f"{r['growth_ratio']:.3f} **{'PASS' if ok2 else 'MISS'}** (target <= 1)")
    return out


def render(env, cmd, params, rows, check, mem_method, timing) -> str:
    L = ["# Training-step benchmark: FineGates vs masked (reference) vs PEFT LoRA", "",
         "Written by `bench/bench_train_step.py --write-results` (issue 4 item 6). Do not edit by hand.", "",
         f"- Command: `{cmd}`",
         f"- Machine: {env['cpu']} ({env['logical_cpus']} logical CPUs), torch threads: {env['threads']}",
         f"- Versions: torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
         f"python {env['python']}",
         f"- Date: {env['date']}",
         f"- Model: LlamaForCausalLM from `{CONFIG_PATH}` ({params / 1e6:.1f}M parameters), fp32, random init; "
         f"batch {BATCH} x {SEQ} random token ids; targets {', '.join(TARGET_MODULES)}",
         "- Step: zero_grad, forward with labels (LM loss) [+ 0.1 * sparsity loss for fg/masked], backward, "
         "AdamW(lr=1e-3) over the trainable parameters (fg/masked: gate logits only; lora: LoRA A/B, r=8, alpha=16)",
         "- Gates: per gated layer exactly round(s*n) rows and round(s*k) columns closed (theta=-5), rest "
         "open (theta=+3), sigma=0.1 noise on",
         f"- Step time: median of {timing['steps']} timed steps after {timing['warmup']} warm-up steps, "
         "variants interleaved per round within each sparsity",
         f"- Peak memory: fresh subprocess per (variant, sparsity); model built, RSS recorded, peak-RSS reset, "
         f"{timing['mem_steps']} training step(s); method: {mem_method}. 'peak' = process peak RSS during those steps "
         "(includes the model), 'growth' = peak minus the RSS before the first step (model loaded). "
         "LoRA does not depend on s and is measured once.", "",
         "| s | fg step (s) | masked step (s) | lora step (s) | fg/masked | fg/lora | fg peak MB | masked peak MB | "
         "lora peak MB | fg/lora peak | fg growth MB | masked growth MB | lora growth MB | fg/lora growth |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = lambda k, f="{:.0f}": f.format(r[k]) if k in r else "-"  # noqa: E731
        L.append(f"| {r['sparsity']:.1f} | {r['fg_s']:.3f} | {r['masked_s']:.3f} | {r['lora_s']:.3f} | "
                 f"{r['fg_masked']:.3f} | {r['fg_lora']:.3f} | {g('fg_peak_mb')} | {g('masked_peak_mb')} | "
                 f"{g('lora_peak_mb')} | {g('peak_ratio', '{:.3f}')} | {g('fg_growth_mb')} | "
                 f"{g('masked_growth_mb')} | {g('lora_growth_mb')} | {g('growth_ratio', '{:.3f}')} |")
    L += ["", "## Targets (issue 4 item 6)", ""] + targets(rows)
    L += ["", "## Correctness", "",
          f"At s={check['sparsity']} with sigma=0: loss fg {check['loss_fg']:.7f}, masked {check['loss_masked']:.7f}, "
          f"rel err {check['loss_rel_err']:.2e} (must be < 1e-4): **{'PASS' if check['ok'] else 'FAIL'}**. "
          "(Gate-logit gradients are not compared: with theta in {-5, +3} the clamp saturates and the LM "
          "loss gives them exactly zero gradient in both variants.)", ""]
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def acquire_lock(log=print) -> None:
    waited = False
    while LOCK.exists():
        if not waited:
            log(f"waiting for {LOCK} ...")
            waited = True
        time.sleep(5)
    LOCK.write_text(f"bench_train_step.py pid {os.getpid()}\n")

    def release(*_):
        try:
            if LOCK.exists() and f"pid {os.getpid()}" in LOCK.read_text():
                LOCK.unlink()
        except OSError:
            pass

    atexit.register(release)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: (release(), sys.exit(130)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="s in {0, 0.4}, few steps (~2 min)")
    ap.add_argument("--write-results", action="store_true", help=f"write {RESULTS.relative_to(REPO_ROOT)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per (variant, sparsity)")
    ap.add_argument("--no-lock", action="store_true", help=f"do not wait for / create {LOCK}")
    ap.add_argument("--_memory-worker", nargs=3, metavar=("VARIANT", "S", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)

    if args._memory_worker:
        v, s, n = args._memory_worker
        print(json.dumps(measure_memory_inprocess(v, float(s), int(n))))
        return 0

    if not args.no_lock:
        acquire_lock()
    sparsities = QUICK_SPARSITIES if args.quick else FULL_SPARSITIES
    steps = args.steps or (2 if args.quick else 8)
    warmup = 1
    mem_steps = 1 if args.quick else 2
    t_start = time.perf_counter()

    print("correctness check (s=0.4, sigma=0) ...", flush=True)
    check = check_fg_vs_masked(0.4)
    print(f"  loss fg {check['loss_fg']:.7f} masked {check['loss_masked']:.7f} rel err {check['loss_rel_err']:.2e} "
          f"-> {'ok' if check['ok'] else 'FAIL'}", flush=True)

    timing = {}
    for s in sparsities:
        timing[s] = time_sparsity(s, steps, warmup, log=lambda m: print(m, flush=True))

    memory = {}
    for s in (sparsities[-1:] if args.quick else sparsities):
        for v in ("fg", "masked"):
            memory[(v, s)] = measure_memory(v, s, mem_steps)
            print(f"  memory {v} s={s}: peak {memory[(v, s)]['peak_kb'] / 1024:.0f} MB, "
                  f"growth {memory[(v, s)]['growth_kb'] / 1024:.0f} MB", flush=True)
    memory[("lora", None)] = measure_memory("lora", 0.0, mem_steps)
    print(f"  memory lora: peak {memory[('lora', None)]['peak_kb'] / 1024:.0f} MB, "
          f"growth {memory[('lora', None)]['growth_kb'] / 1024:.0f} MB", flush=True)

    rows = evaluate(timing, memory, check)
    params = sum(p.numel() for p in build_base().parameters())
    cmd = "python bench/bench_train_step.py" + (" --quick" if args.quick else "") + \
        (f" --steps {args.steps}" if args.steps else "") + (" --write-results" if args.write_results else "")
    text = render(environment(), cmd, params, rows, check, memory[("lora", None)]["method"],
                  {"steps": steps, "warmup": warmup, "mem_steps": mem_steps})
    print()
    print(text)
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    if args.write_results:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
