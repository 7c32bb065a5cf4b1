"""What the op benchmarks measure: shapes, gate patterns and the four variants.

Shared by ``bench/test_bench_ops.py`` (pytest-benchmark) and ``bench/bench_ops.py`` (the results
table), so that both time exactly the same code. Definitions follow docs/design.md, "Measuring speed":

``dense``
    ``F.linear(x, W, b)`` -- every gate ignored, the cost of the layer without FineGates.
``masked``
    ``F.linear(x * g_c, W, b) * g_r`` -- what the reference FineGates code does.
``compact-ideal``
    the same computation on tensors gathered *before* timing: ``x[:, C] * g_c[C]`` (forward) or
    ``x[:, C]`` and ``g_c[C]`` (forward+backward), ``W[R][:, C]``, ``b[R]``, ``g_r[R]``; the floor a
    gathered GEMM can approach.
``fg``
    ``torch.ops.fg.gated_linear(x, W, b, g_r, g_c)``, the op under test.

Modes: ``fwd`` runs under ``torch.no_grad()`` on tensors that do not require grad, with the same
gates every call (evaluation, inference). ``fwd_bwd`` is a training step: the forward on leaves
that require grad (x, bias, both gates; the weight is frozen) and ``torch.autograd.grad`` with a
fixed random ``grad_out`` (pre-gathered for compact-ideal); using ``autograd.grad`` rather than
``.backward()`` means no ``.grad`` accumulates between calls. Its gate values alternate between two
draws with the same zeros on every call, as sampled gates change every training step, so nothing
that depends on the gate values (fg's folded weight block) can be reused from the previous call.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # reference fallback / running from a checkout without install
    sys.path.append(str(REPO_ROOT))

from fg_kernels.testing import rel_err  # noqa: E402

# --------------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------------

TOKENS = 2048


@dataclass(frozen=True)
class Shape:
    """A Linear layer ``K -> N`` applied to ``m`` tokens: x (m, K), weight (N, K)."""

    model: str
    k: int
    n: int
    m: int = TOKENS

    @property
    def id(self) -> str:  # ASCII, for pytest ids and file names
        return f"{self.model}-{self.k}to{self.n}" + ("" if self.m == TOKENS else f"-m{self.m}")

    @property
    def label(self) -> str:
        return f"{self.model} {self.k}\u2192{self.n}" + ("" if self.m == TOKENS else f", {self.m} tokens")

    def gemm_flop(self) -> float:
        return 2.0 * self.m * self.k * self.n


SHAPES: Tuple[Shape, ...] = (
    Shape("RoBERTa-base", 768, 768),
    Shape("RoBERTa-base", 768, 3072),
    Shape("RoBERTa-base", 3072, 768),
    Shape("LLaMA-1B", 2048, 8192),
    Shape("LLaMA-1B", 8192, 2048),
    # The layers of all-MiniLM-L6-v2 at the token counts of fine-tuning (16 sentences of ~8-32
    # tokens) and serving: where fixed costs per call and parallel regions show.
    *(Shape("MiniLM-L6", k, n, m) for m in (128, 512) for k, n in ((384, 1536), (1536, 384), (384, 384))),
)
SPARSITIES: Tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
VARIANTS: Tuple[str, ...] = ("dense", "masked", "compact-ideal", "fg")
MODES: Tuple[str, ...] = ("fwd", "fwd_bwd")

# The quick subset (CI, README main job, FG_BENCH_QUICK=1 for pytest).
QUICK_SHAPES: Tuple[Shape, ...] = (SHAPES[1],)
QUICK_SPARSITIES: Tuple[float, ...] = (0.0, 0.4)


def selected_cases(quick: bool):
    """``(shapes, sparsities)`` of the full grid or of the quick subset."""
    return (QUICK_SHAPES, QUICK_SPARSITIES) if quick else (SHAPES, SPARSITIES)


def env_quick() -> bool:
    return os.environ.get("FG_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------
# Targets: fp32, 2 threads, medians, ratios from one run
# --------------------------------------------------------------------------------------------

CONDITIONS: Tuple[str, ...] = ("quiet", "loaded")  # loaded: one core held by a spinning process


def targets(mode: str, sparsity: float, active_fraction: float, tokens: int = TOKENS,
            condition: str = "quiet") -> Dict[str, Tuple[str, float]]:
    """Targets that apply to a case, ``{ratio name: (op, bound)}`` with op ``"<="`` or ``">="``.

    Quiet machine:

    * fwd: ``fg <= 1.05 x compact-ideal`` for sparsity >= 0.2 at 2048 tokens, ``<= 1.10`` at fewer
      tokens; ``fg <= 1.03 x dense`` at sparsity 0.
    * fwd_bwd: ``fg <= 1.10 x compact-ideal`` (frozen weight).
    * both: ``masked / fg >= 0.9 / ((1 - s_r)(1 - s_c))``, with the actual active fraction
      ``|R|/N * |C|/K``.

    One core busy (sparsity >= 0.4): fwd ``fg <= 1.25 x compact-ideal``, fwd_bwd ``<= 1.30``, and
    ``masked / fg >= 1.5``; no target at lower sparsity.
    """
    t: Dict[str, Tuple[str, float]] = {}
    if condition == "loaded":
        if sparsity >= 0.4:
            t["fg/compact-ideal"] = ("<=", 1.25 if mode == "fwd" else 1.30)
            t["masked/fg"] = (">=", 1.5)
        return t
    if mode == "fwd":
        if sparsity > 0:
            t["fg/compact-ideal"] = ("<=", 1.05 if tokens >= TOKENS else 1.10)
        else:
            t["fg/dense"] = ("<=", 1.03)
    else:
        t["fg/compact-ideal"] = ("<=", 1.10)
    t["masked/fg"] = (">=", 0.9 / active_fraction)
    return t


def meets(value: float, target: Tuple[str, float]) -> bool:
    op, bound = target
    return value <= bound if op == "<=" else value >= bound


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Full tensors, their pre-gathered compact counterparts and autograd leaves of both."""

    shape: Shape
    sparsity: float
    dtype: torch.dtype
    # full
    x: Tensor
    weight: Tensor
    bias: Tensor
    row_gate: Tensor
    col_gate: Tensor
    grad_out: Tensor
    row_idx: Tensor  # R, sorted
    col_idx: Tensor  # C, sorted
    # pre-gathered (compact-ideal)
    xc: Tensor  # x[:, C]
    xcg: Tensor  # x[:, C] * g_c[C]
    weight_c: Tensor  # W[R][:, C]
    bias_c: Tensor
    row_gate_c: Tensor
    col_gate_c: Tensor
    grad_out_c: Tensor  # grad_out[:, R]
    # leaves requiring grad (share storage with the tensors above; nothing writes to them)
    x_leaf: Tensor
    bias_leaf: Tensor
    xc_leaf: Tensor
    bias_c_leaf: Tensor
    # fwd_bwd alternates between these gate leaves: ((row, col, row_c, col_c) of the first draw,
    # the same of a second draw with the same zeros)
    gate_leaves: Tuple[Tuple[Tensor, Tensor, Tensor, Tensor], ...] = ()

    @property
    def active_rows(self) -> int:
        return int(self.row_idx.numel())

    @property
    def active_cols(self) -> int:
        return int(self.col_idx.numel())

    @property
    def active_fraction(self) -> float:
        """``(1 - s_r)(1 - s_c)`` as realised: ``|R|/N * |C|/K``."""
        return (self.active_rows / self.shape.n) * (self.active_cols / self.shape.k)


def _seed_for(*parts) -> int:
    h = 0
    for p in parts:
        for ch in repr(p):
            h = (h * 1000003 + ord(ch)) % (2**61 - 1)
    return h


def exact_zeros_gate(n: int, sparsity: float, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Exactly ``round(sparsity * n)`` zeros at random positions; other values uniform in (0.5, 1]."""
    n_zero = int(round(sparsity * n))
    values = 1.0 - 0.5 * torch.rand(n, generator=generator, dtype=torch.float64)  # (0.5, 1]
    zero_pos = torch.randperm(n, generator=generator)[:n_zero]
    values[zero_pos] = 0.0
    return values.to(dtype)


def make_inputs(shape: Shape, sparsity: float, dtype: torch.dtype = torch.float32, seed: int = 0) -> Inputs:
    """Seeded inputs of one case. x, W, b and grad_out depend on (seed, shape) only, the gates on
    the sparsity as well, so every sparsity of a shape sees the same activations and weight."""
    g = torch.Generator().manual_seed(_seed_for(seed, shape.k, shape.n, shape.m))
    x = torch.randn(shape.m, shape.k, generator=g, dtype=torch.float32).to(dtype)
    weight = (torch.randn(shape.n, shape.k, generator=g, dtype=torch.float32) / shape.k**0.5).to(dtype)
    bias = (0.1 * torch.randn(shape.n, generator=g, dtype=torch.float32)).to(dtype)
    grad_out = torch.randn(shape.m, shape.n, generator=g, dtype=torch.float32).to(dtype)

    gg = torch.Generator().manual_seed(_seed_for(seed, shape.k, shape.n, shape.m, float(sparsity)))
    row_gate = exact_zeros_gate(shape.n, sparsity, gg, dtype)
    col_gate = exact_zeros_gate(shape.k, sparsity, gg, dtype)
    row_idx = torch.nonzero(row_gate).flatten()
    col_idx = torch.nonzero(col_gate).flatten()

    xc = x.index_select(1, col_idx).contiguous()
    col_gate_c = col_gate.index_select(0, col_idx).contiguous()
    xcg = (xc * col_gate_c).contiguous()
    weight_c = weight.index_select(0, row_idx).index_select(1, col_idx).contiguous()
    bias_c = bias.index_select(0, row_idx).contiguous()
    row_gate_c = row_gate.index_select(0, row_idx).contiguous()
    grad_out_c = grad_out.index_select(1, row_idx).contiguous()

    def leaf(t: Tensor) -> Tensor:
        return t.detach().requires_grad_(True)

    # A second draw of the gate values with the same zeros (fwd_bwd alternates the two).
    row_gate_b = torch.where(row_gate != 0, exact_zeros_gate(shape.n, 0.0, gg, dtype), torch.zeros((), dtype=dtype))
    col_gate_b = torch.where(col_gate != 0, exact_zeros_gate(shape.k, 0.0, gg, dtype), torch.zeros((), dtype=dtype))
    gate_leaves = tuple(
        (leaf(r), leaf(c), leaf(r.index_select(0, row_idx).contiguous()), leaf(c.index_select(0, col_idx).contiguous()))
        for r, c in ((row_gate, col_gate), (row_gate_b, col_gate_b))
    )

    return Inputs(
        shape=shape,
        sparsity=sparsity,
        dtype=dtype,
        x=x,
        weight=weight,
        bias=bias,
        row_gate=row_gate,
        col_gate=col_gate,
        grad_out=grad_out,
        row_idx=row_idx,
        col_idx=col_idx,
        xc=xc,
        xcg=xcg,
        weight_c=weight_c,
        bias_c=bias_c,
        row_gate_c=row_gate_c,
        col_gate_c=col_gate_c,
        grad_out_c=grad_out_c,
        x_leaf=leaf(x),
        bias_leaf=leaf(bias),
        xc_leaf=leaf(xc),
        bias_c_leaf=leaf(bias_c),
        gate_leaves=gate_leaves,
    )


# --------------------------------------------------------------------------------------------
# The op under test
# --------------------------------------------------------------------------------------------

FG_OP_NAME = "torch.ops.fg.gated_linear"
REFERENCE_NAME = "fg_kernels.reference.gated_linear_ref (stand-in, NOT the op)"


def _load_reference():
    """``gated_linear_ref`` loaded from its file, so it works even when ``fg_kernels/__init__``
    cannot import the (unbuilt) extension."""
    path = REPO_ROOT / "fg_kernels" / "reference.py"
    spec = importlib.util.spec_from_file_location("_fg_bench_reference", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod.gated_linear_ref


def load_fg_op(allow_reference: bool = False) -> Tuple[Callable, str]:
    """``(op, name)``: ``torch.ops.fg.gated_linear`` once ``fg_kernels`` is built and importable.

    With ``allow_reference`` (or ``FG_BENCH_ALLOW_REFERENCE=1``) and no built op, the dense
    reference stands in so the harness can be exercised; its timings mean nothing.
    """
    allow_reference = allow_reference or os.environ.get("FG_BENCH_ALLOW_REFERENCE", "") not in ("", "0")
    try:
        import fg_kernels  # noqa: F401  (registers torch.ops.fg.*)

        op = torch.ops.fg.gated_linear
        return op, FG_OP_NAME
    except Exception as exc:  # ImportError, AttributeError/RuntimeError for a missing op
        if not allow_reference:
            raise RuntimeError(
                f"{FG_OP_NAME} is not available ({type(exc).__name__}: {exc}). Build it with "
                "`pip install --no-build-isolation -e .`, or pass --allow-reference / set "
                "FG_BENCH_ALLOW_REFERENCE=1 to exercise the harness with the reference."
            ) from exc
        return _load_reference(), REFERENCE_NAME


# --------------------------------------------------------------------------------------------
# The four variants -- the one implementation used by both the pytest suite and the report
# --------------------------------------------------------------------------------------------


def _dense_fwd(inp: Inputs, op) -> Tensor:
    return F.linear(inp.x, inp.weight, inp.bias)


def _masked_fwd(inp: Inputs, op) -> Tensor:
    return F.linear(inp.x * inp.col_gate, inp.weight, inp.bias) * inp.row_gate


def _compact_fwd(inp: Inputs, op) -> Tensor:
    # x[:, C] * g_c[C] pre-gathered; the row gate is applied in place on the fresh GEMM output.
    return F.linear(inp.xcg, inp.weight_c, inp.bias_c).mul_(inp.row_gate_c)


def _fg_fwd(inp: Inputs, op) -> Tensor:
    return op(inp.x, inp.weight, inp.bias, inp.row_gate, inp.col_gate)


def _dense_fwd_bwd(inp: Inputs, op, k: int) -> Tuple[Tensor, ...]:
    y = F.linear(inp.x_leaf, inp.weight, inp.bias_leaf)
    return torch.autograd.grad(y, (inp.x_leaf, inp.bias_leaf), inp.grad_out)


def _masked_fwd_bwd(inp: Inputs, op, k: int) -> Tuple[Tensor, ...]:
    row_gate, col_gate = inp.gate_leaves[k][:2]
    y = F.linear(inp.x_leaf * col_gate, inp.weight, inp.bias_leaf) * row_gate
    return torch.autograd.grad(y, (inp.x_leaf, inp.bias_leaf, row_gate, col_gate), inp.grad_out)


def _compact_fwd_bwd(inp: Inputs, op, k: int) -> Tuple[Tensor, ...]:
    row_gate_c, col_gate_c = inp.gate_leaves[k][2:]
    y = F.linear(inp.xc_leaf * col_gate_c, inp.weight_c, inp.bias_c_leaf) * row_gate_c
    return torch.autograd.grad(y, (inp.xc_leaf, inp.bias_c_leaf, row_gate_c, col_gate_c), inp.grad_out_c)


def _fg_fwd_bwd(inp: Inputs, op, k: int) -> Tuple[Tensor, ...]:
    row_gate, col_gate = inp.gate_leaves[k][:2]
    y = op(inp.x_leaf, inp.weight, inp.bias_leaf, row_gate, col_gate)
    return torch.autograd.grad(y, (inp.x_leaf, inp.bias_leaf, row_gate, col_gate), inp.grad_out)


_IMPLS = {
    ("dense", "fwd"): _dense_fwd,
    ("masked", "fwd"): _masked_fwd,
    ("compact-ideal", "fwd"): _compact_fwd,
    ("fg", "fwd"): _fg_fwd,
    ("dense", "fwd_bwd"): _dense_fwd_bwd,
    ("masked", "fwd_bwd"): _masked_fwd_bwd,
    ("compact-ideal", "fwd_bwd"): _compact_fwd_bwd,
    ("fg", "fwd_bwd"): _fg_fwd_bwd,
}


def timing_scope(mode: str):
    """Around a timing loop: in ``fwd`` (evaluation, inference) the gates do not change, and
    ``fg_kernels.frozen_weights`` lets the C++ op reuse its gate-folded weight block, as a user's
    evaluation does; ``fwd_bwd`` folds every call whatever the scope."""
    import contextlib

    import fg_kernels

    return fg_kernels.frozen_weights() if mode == "fwd" and fg_kernels.library_loaded() else contextlib.nullcontext()


def make_callable(variant: str, mode: str, inp: Inputs, op: Optional[Callable] = None) -> Callable[[], object]:
    """A zero-argument callable running one variant in one mode on ``inp`` (the timed unit)."""
    impl = _IMPLS[(variant, mode)]
    if variant == "fg" and op is None:
        raise ValueError("the fg variant needs the op (see load_fg_op)")
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return impl(inp, op)

    else:
        calls = [0]

        def run():  # a training step: the gate values of the other draw than last call's
            calls[0] += 1
            return impl(inp, op, (calls[0] - 1) % len(inp.gate_leaves))

    run.__name__ = f"{variant.replace('-', '_')}_{mode}"
    return run


# --------------------------------------------------------------------------------------------
# Correctness: fg against compact-ideal scattered to full size
# --------------------------------------------------------------------------------------------


def _rel_err(a: Tensor, b: Tensor) -> float:
    """fg_kernels.testing.rel_err, and inf for a shape mismatch (a harness error, not a crash)."""
    return float("inf") if a.shape != b.shape else rel_err(a, b)


def default_rtol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def check_fg(inp: Inputs, op: Callable, mode: str, rtol: Optional[float] = None) -> Dict[str, object]:
    """Compare fg with compact-ideal scattered into full-size zeros.

    fwd: the output (and inactive output columns exactly 0). fwd_bwd: the gradients for x, bias,
    row gate and column gate (zero where the gate is zero). Returns ``{"ok", "errors", "message"}``;
    an exception raised by the op counts as a failure.
    """
    rtol = default_rtol(inp.dtype) if rtol is None else rtol
    s, R, C = inp.shape, inp.row_idx, inp.col_idx
    errors: Dict[str, float] = {}
    problems = []
    try:
        got = make_callable("fg", mode, inp, op)()
        ref = make_callable("compact-ideal", mode, inp, op)()
    except Exception as exc:  # noqa: BLE001 -- report, do not time
        return {"ok": False, "errors": {}, "message": f"raised {type(exc).__name__}: {exc}"}

    if mode == "fwd":
        full = torch.zeros(s.m, s.n, dtype=ref.dtype)
        full[:, R] = ref
        errors["y"] = _rel_err(got, full)
        if got.shape == full.shape and R.numel() < s.n:
            inactive = torch.ones(s.n, dtype=torch.bool)
            inactive[R] = False
            if bool((got[:, inactive] != 0).any()):
                problems.append("inactive output columns are not exactly 0")
        # Harness sanity: masked must agree with compact-ideal too.
        masked = make_callable("masked", mode, inp, op)()
        if _rel_err(masked, full) > rtol:
            problems.append(f"HARNESS: masked differs from compact-ideal ({_rel_err(masked, full):.2e})")
    else:
        gx, gb, ggr, ggc = ref
        full_gx = torch.zeros(s.m, s.k, dtype=gx.dtype)
        full_gx[:, C] = gx
        full_gb = torch.zeros(s.n, dtype=gb.dtype)
        full_gb[R] = gb
        full_ggr = torch.zeros(s.n, dtype=ggr.dtype)
        full_ggr[R] = ggr
        full_ggc = torch.zeros(s.k, dtype=ggc.dtype)
        full_ggc[C] = ggc
        for name, a, b in zip(("grad_x", "grad_bias", "grad_row_gate", "grad_col_gate"), got,
                              (full_gx, full_gb, full_ggr, full_ggc)):
            errors[name] = float("inf") if a is None else _rel_err(a, b)

    bad = {k: v for k, v in errors.items() if not (v <= rtol)}
    if bad:
        problems.append("rel err above %.0e: %s" % (rtol, ", ".join(f"{k}={v:.2e}" for k, v in bad.items())))
    return {"ok": not problems, "errors": errors, "message": "; ".join(problems) or "ok"}


# --------------------------------------------------------------------------------------------
# Cost model (to pick repeat counts before measuring)
# --------------------------------------------------------------------------------------------


def estimated_seconds(shape: Shape, sparsity: float, variant: str, mode: str, gflops: float = 120.0) -> float:
    """Rough GEMM-only time of one call at ``gflops`` (2 threads of this machine: ~130 GFLOP/s)."""
    f = (1.0 - sparsity) ** 2 if variant in ("compact-ideal", "fg") else 1.0
    gemms = 1 if mode == "fwd" else 2  # frozen weight: forward GEMM + grad_x GEMM
    return gemms * f * shape.gemm_flop() / (gflops * 1e9)


@functools.lru_cache(maxsize=None)
def dtype_from_name(name: str) -> torch.dtype:
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
