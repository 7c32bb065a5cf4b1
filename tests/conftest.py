"""Shared helpers for the ``fg`` op tests: seeded inputs, error metric, tolerances, poisoning.

The compiled ops are imported unconditionally: if ``fg_kernels`` (or its compiled ``_C``
extension) is missing, every test in this folder must *fail*, not skip. Only GPU-specific tests
may skip on a CPU-only machine.

Accuracy rule (see ``assert_matches``):

* The truth is always the pure-PyTorch reference (``fg_kernels.reference``) evaluated in float64
  on exactly the inputs the op saw (low-precision inputs are upcast, so rounding of the inputs is
  not counted as error).
* float32: ``rel_err(op, truth) <= 1e-5``. Measured headroom: the reference itself computed in
  float32 lands at 1e-7..3e-7 of float64 for every output and gradient at the sizes used here
  (up to 129 features, ~500 tokens), so 1e-5 is ~30x above honest float32 rounding and far below
  any indexing/gating bug (which gives errors of order 1).
* bfloat16 (the flash-attention rule): the op's error may be at most ``2x`` the error of the
  reference computed *in bfloat16* on the same inputs, plus a floor of one bf16 ulp (2**-8, the
  op may round its fp32 accumulator once more than the reference does for tiny problems where
  the bf16 reference happens to be exact), and never more than an absolute sanity cap of 1e-2
  (forward) / 3e-2 (gradients, whose reductions over tokens round more often).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import pytest
import torch

import fg_kernels  # noqa: F401  -- registers torch.ops.fg.*; must fail loudly when missing
from fg_kernels.reference import gated_linear_ref

# Errors a bad input may raise (the contract: a Python exception naming the argument).
BAD_INPUT_ERRORS = (ValueError, TypeError, IndexError, RuntimeError)

LOWP_DTYPES = (torch.bfloat16,)

# (forward, gradient) tolerances.
FP32_FWD_TOL = 1e-5
FP32_GRAD_TOL = 1e-5
FP32_CANCEL_FLOOR = 1e-6  # see assert_matches(scale=...)
BF16_FLOOR = 2.0**-8  # one bf16 ulp at 1.0 (eps); see module docstring
BF16_FWD_CAP = 1e-2
BF16_GRAD_CAP = 3e-2


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: tests that take more than ~20 s (still run by default)"
    )
    config.addinivalue_line("markers", "gpu: tests that need a CUDA device (skip without one)")


# --------------------------------------------------------------------------------------------
# Error metric and assertion
# --------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / max(||b||, tiny)`` computed in float64 (Frobenius norms)."""
    a64 = a.detach().to(torch.float64)
    b64 = b.detach().to(torch.float64)
    assert a64.shape == b64.shape, f"shape mismatch {tuple(a64.shape)} vs {tuple(b64.shape)}"
    denom = max(b64.norm().item(), torch.finfo(torch.float64).tiny)
    return (a64 - b64).norm().item() / denom


def assert_matches(
    out: torch.Tensor,
    truth: torch.Tensor,
    *,
    lowp_ref: Optional[torch.Tensor] = None,
    grad: bool = False,
    what: str = "output",
    compute_dtype: Optional[torch.dtype] = None,
    scale: Optional[torch.Tensor] = None,
) -> None:
    """Assert ``out`` (the op's result) matches ``truth`` (float64 reference).

    For low-precision ``out`` pass ``lowp_ref``: the reference computed in ``out``'s dtype on the
    same inputs; the op may be at most twice as wrong as it (plus the bf16 floor, within a cap).
    ``compute_dtype`` (default ``out.dtype``) picks the rule: a float32 gradient of a float32 gate
    used in a bfloat16 computation is held to the bf16 rule.

    ``scale`` (optional): the same quantity computed on absolute values (``|x|``, ``|W|``, ...;
    see ``magnitude``). Where the true result nearly cancels (``||truth|| << ||scale||``), a
    relative error says nothing about the kernel; the comparison then also passes when the
    absolute error is within rounding of the magnitude: ``||out - truth|| <= c * ||scale||``,
    ``c = 1e-6`` (fp32; ~sqrt(K) ulps for K <= 129) or ``2**-8`` (bf16). Indexing/gating bugs
    give errors of the order of ``||scale||`` itself and are still caught.
    """
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(out).any(), f"{what}: op produced NaN"
    assert not torch.isinf(out).any() or torch.isinf(truth).any(), f"{what}: op produced inf"
    err = rel_err(out, truth)
    compute_dtype = out.dtype if compute_dtype is None else compute_dtype
    if scale is not None:
        abs_err = (out.detach().double() - truth.detach().double()).norm().item()
        c = FP32_CANCEL_FLOOR if compute_dtype == torch.float32 else BF16_FLOOR
        if abs_err <= c * scale.detach().double().norm().item():
            return
    if compute_dtype == torch.float32:
        tol = FP32_GRAD_TOL if grad else FP32_FWD_TOL
        assert err <= tol, f"{what}: float32 rel err {err:.3e} > {tol:.1e}"
    elif compute_dtype == torch.bfloat16:
        assert lowp_ref is not None, "bf16 comparison needs the bf16 reference"
        base = rel_err(lowp_ref, truth)
        cap = BF16_GRAD_CAP if grad else BF16_FWD_CAP
        tol = min(2.0 * base + BF16_FLOOR, cap)
        assert err <= tol, (
            f"{what}: bf16 rel err {err:.3e} > {tol:.3e} "
            f"(bf16 reference err {base:.3e}, floor {BF16_FLOOR:.1e}, cap {cap:.1e})"
        )
    else:  # pragma: no cover - only fp32/bf16 are tested against the reference
        raise AssertionError(f"unexpected dtype {compute_dtype}")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_gate(
    n: int,
    *,
    gen: torch.Generator,
    sparsity: float = 0.0,
    kind: str = "fractional",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A gate vector of length ``n``.

    ``sparsity``: probability of each entry being exactly zero (the pattern is random; 0 and 1
    give no zeros / all zeros). ``kind``: ``"fractional"`` -> active values uniform in
    (0.05, 1]; ``"binary"`` -> active values exactly 1; ``"ones"`` -> all ones (ignores sparsity).
    """
    if kind == "ones":
        return torch.ones(n, dtype=dtype)
    if kind == "binary":
        vals = torch.ones(n)
    elif kind == "fractional":
        vals = 0.05 + 0.95 * torch.rand(n, generator=gen)
    else:
        raise ValueError(kind)
    if sparsity >= 1.0:
        keep = torch.zeros(n, dtype=torch.bool)
    elif sparsity <= 0.0:
        keep = torch.ones(n, dtype=torch.bool)
    else:
        keep = torch.rand(n, generator=gen) >= sparsity
    g = (vals * keep).to(dtype)
    # Rounding to a low-precision dtype must not create or remove zeros.
    assert torch.equal(g != 0, keep)
    return g


@dataclass
class GatedInputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    row_gate: torch.Tensor
    col_gate: torch.Tensor
    lora_a: Optional[torch.Tensor] = None
    lora_b: Optional[torch.Tensor] = None
    lora_scale: float = 1.0

    TENSOR_NAMES = ("x", "weight", "bias", "row_gate", "col_gate", "lora_a", "lora_b")

    def args(self):
        return (self.x, self.weight, self.bias, self.row_gate, self.col_gate)

    def kwargs(self):
        return dict(lora_a=self.lora_a, lora_b=self.lora_b, lora_scale=self.lora_scale)

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.TENSOR_NAMES if getattr(self, n) is not None}

    def map(self, fn) -> "GatedInputs":
        """New inputs with ``fn`` applied to every tensor (None stays None)."""
        kw = {n: (None if getattr(self, n) is None else fn(n, getattr(self, n)))
              for n in self.TENSOR_NAMES}
        return GatedInputs(**kw, lora_scale=self.lora_scale)

    @property
    def row_on(self) -> torch.Tensor:
        return self.row_gate != 0

    @property
    def col_on(self) -> torch.Tensor:
        return self.col_gate != 0


def make_gated_inputs(
    seed: int,
    lead: Sequence[int],
    N: int,
    K: int,
    *,
    dtype: torch.dtype = torch.float32,
    gate_dtype: Optional[torch.dtype] = None,
    bias: bool = True,
    lora_rank: int = 0,
    lora_scale: float = 1.0,
    row_sparsity: float = 0.4,
    col_sparsity: float = 0.4,
    gate_kind: str = "fractional",
    row_gate_kind: Optional[str] = None,
    col_gate_kind: Optional[str] = None,
) -> GatedInputs:
    """Seeded random inputs for ``gated_linear``; x has shape ``(*lead, K)``.

    Values are O(1) outputs: weights are scaled by 1/sqrt(K); the bias is O(1) and non-zero on
    every row (so exact zeros on inactive rows are a real check).
    """
    gen = torch.Generator().manual_seed(seed)
    gate_dtype = dtype if gate_dtype is None else gate_dtype
    x = torch.randn(*lead, K, generator=gen)
    weight = torch.randn(N, K, generator=gen) / math.sqrt(max(K, 1))
    b = (torch.rand(N, generator=gen) + 0.5) * torch.where(torch.rand(N, generator=gen) < 0.5, -1.0, 1.0)
    row_gate = make_gate(N, gen=gen, sparsity=row_sparsity, kind=row_gate_kind or gate_kind, dtype=gate_dtype)
    col_gate = make_gate(K, gen=gen, sparsity=col_sparsity, kind=col_gate_kind or gate_kind, dtype=gate_dtype)
    lora_a = lora_b = None
    if lora_rank:
        lora_a = torch.randn(lora_rank, K, generator=gen) / math.sqrt(max(K, 1))
        lora_b = torch.randn(N, lora_rank, generator=gen) / math.sqrt(lora_rank)
    inp = GatedInputs(
        x=x.to(dtype),
        weight=weight.to(dtype),
        bias=b.to(dtype) if bias else None,
        row_gate=row_gate,
        col_gate=col_gate,
        lora_a=None if lora_a is None else lora_a.to(dtype),
        lora_b=None if lora_b is None else lora_b.to(dtype),
        lora_scale=lora_scale,
    )
    return inp


def upcast(inp: GatedInputs, dtype: torch.dtype = torch.float64) -> GatedInputs:
    """Same values in ``dtype`` (exact for fp32/bf16 -> fp64), detached, leaves."""
    return inp.map(lambda n, t: t.detach().to(dtype))


def ref_forward(inp: GatedInputs, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Reference output computed in ``dtype`` (default: the inputs' own dtypes)."""
    src = inp if dtype is None else inp.map(lambda n, t: t.detach().to(dtype))
    with torch.no_grad():
        return gated_linear_ref(*src.args(), **src.kwargs())


def magnitude(inp: GatedInputs) -> GatedInputs:
    """float64 absolute values of every input (and of lora_scale): feeding them to the reference
    gives the scale of each output/gradient entry without cancellation."""
    m = inp.map(lambda n, t: t.detach().double().abs())
    m.lora_scale = abs(inp.lora_scale)
    return m


def op_forward(inp: GatedInputs) -> torch.Tensor:
    return torch.ops.fg.gated_linear(*inp.args(), **inp.kwargs())


def grads_of(fn, inp: GatedInputs, names: Sequence[str], grad_out: torch.Tensor):
    """``torch.autograd.grad`` of ``(fn(inp) * grad_out).sum()`` w.r.t. the named inputs.

    Works on fresh leaf copies so the caller's tensors are never mutated.
    """
    leaves = inp.map(lambda n, t: t.detach().clone().requires_grad_(n in names))
    y = fn(leaves)
    ts = [getattr(leaves, n) for n in names]
    # materialize_grads: an input the backward leaves undefined (None) counts as a zero gradient.
    gs = torch.autograd.grad(y, ts, grad_out.to(y.dtype), materialize_grads=True)
    return y.detach(), dict(zip(names, gs))


def ref_fn(inp: GatedInputs) -> torch.Tensor:
    return gated_linear_ref(*inp.args(), **inp.kwargs())


def op_fn(inp: GatedInputs) -> torch.Tensor:
    return torch.ops.fg.gated_linear(*inp.args(), **inp.kwargs())


def check_gated_forward(inp: GatedInputs, *, what: str = "gated_linear") -> torch.Tensor:
    """Run the op on ``inp`` and compare with the reference; also the exact-zero contract."""
    out = op_forward(inp)
    assert out.dtype == inp.x.dtype, f"{what}: output dtype {out.dtype} != x dtype {inp.x.dtype}"
    assert out.shape == (*inp.x.shape[:-1], inp.weight.shape[0])
    truth = ref_forward(inp, torch.float64)
    lowp = ref_forward(inp) if out.dtype != torch.float32 else None
    assert_matches(out, truth, lowp_ref=lowp, what=what, scale=ref_forward(magnitude(inp)))
    inactive = out[..., ~inp.row_on]
    assert (inactive == 0).all(), f"{what}: output on zero-gated rows is not exactly 0"
    return out


# --------------------------------------------------------------------------------------------
# Output poisoning
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def poisoned_memory(*nbytes_hint: int):
    """Make freshly allocated CPU memory hold NaNs while the block runs.

    Two independent mechanisms, so a kernel that forgets to write part of its output (and relies on
    ``torch.empty`` happening to return zeros) is caught:

    1. ``torch.utils.deterministic.fill_uninitialized_memory`` with deterministic algorithms on:
       every ``at::empty`` going through the dispatcher is filled with NaN (ints: max value).
    2. Blocks of the hinted sizes (and a range of other sizes) are filled with NaN and freed just
       before, so the allocator hands them out again to allocations that bypass (1).
    """
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    sizes = set(int(s) for s in nbytes_hint if s > 0)
    sizes |= {1 << k for k in range(6, 21)}
    junk = [torch.full((max(s // 4, 1),), float("nan")) for s in sorted(sizes)]
    del junk
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


@pytest.fixture
def seed(request) -> int:
    """A per-test deterministic seed derived from the test id (stable across runs)."""
    import zlib

    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture
def one_thread():
    """Tiny matmuls: intra-op threads only add overhead (10x and more when another process holds
    one of this 2-core machine's cores). Files of small-model tests use it for every test via
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_accelerate(one_thread):
    """A fresh Accelerate state before and after a test that runs the command line in-process
    (``AcceleratorState`` is a process-wide singleton that would carry over between runs)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
