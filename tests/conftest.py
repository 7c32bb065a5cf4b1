"""The one test harness of the ``fg`` ops: backends, sample inputs, the reference comparison and
output poisoning, shared by every test file (as pytorch/extension-cpp and bitsandbytes do).

Backends (``BACKENDS``; tests parametrize over them with ``backend_params``):

* ``cpu``: ``torch.ops.fg.*`` on CPU tensors (the C++/OpenMP kernels);
* ``triton``: ``torch.ops.fg_triton.*`` on CPU tensors, i.e. the Triton kernels under the Triton
  interpreter (CI's check of the GPU kernels). bfloat16 *values* are not compared there: the
  interpreter computes bfloat16 ``tl.dot`` wrongly. Needs TRITON_INTERPRET=1 before triton is first
  imported, which this file arranges on a machine without CUDA;
* ``cuda``: ``torch.ops.fg.*`` on CUDA tensors (the compiled Triton kernels); skipped without a GPU.

Every backend gets the same inputs (drawn on the CPU from a seed, then moved to its device), the
same tolerances (``fg_kernels.testing``) and the same asserts. The compiled ops are imported
unconditionally: if ``fg_kernels`` (or its compiled ``_C``) is missing, every test must *fail*.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Sequence


def _start_triton_interpreter() -> Optional[str]:
    """Imports triton in interpreter mode when this machine has no GPU (the ``triton`` backend).
    Returns why that backend cannot run in this process, or None."""
    import torch

    if torch.cuda.is_available():
        return "this process runs the compiled Triton kernels (CUDA); CI runs the interpreter"
    if "triton" in sys.modules:
        return "triton was imported before the tests could select its interpreter"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton): the Triton kernels are not tested"
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return None


TRITON_SKIP_REASON = _start_triton_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402

import fg_kernels  # noqa: E402,F401  -- registers torch.ops.fg.*; must fail loudly when missing
from fg_kernels.reference import gated_linear_ref  # noqa: E402
from fg_kernels.testing import LOW_PRECISION, abs_err, assert_matches, make_gate, rel_err  # noqa: E402,F401

if TRITON_SKIP_REASON is None:
    import fg_kernels.triton  # noqa: E402,F401  -- defines torch.ops.fg_triton.*

# Errors a bad input may raise (the contract: a Python exception naming the argument).
BAD_INPUT_ERRORS = (ValueError, TypeError, IndexError, RuntimeError)
GRAD_NAMES_ALL = ("x", "weight", "bias", "row_gate", "col_gate", "lora_a", "lora_b")
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: tests that take more than ~20 s (still run by default)"
    )
    config.addinivalue_line("markers", "gpu: tests that need a CUDA device (skip without one)")


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One implementation of the ``fg`` schemas: its ops namespace, device, the dtypes whose
    values it is held to, and why it cannot run here (None when it can)."""

    name: str
    namespace: str
    device: str
    value_dtypes: tuple
    skip_reason: Optional[str]

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def gated_linear(self, *args, **kwargs) -> torch.Tensor:
        return self.ops.gated_linear(*args, **kwargs)

    def gated_linear_backward(self, *args) -> tuple:
        return self.ops.gated_linear_backward(*args)

    def gathered_linear(self, *args) -> torch.Tensor:
        return self.ops.gathered_linear(*args)

    def __repr__(self) -> str:
        return self.name


ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = (
    Backend("cpu", "fg", "cpu", ALL_DTYPES, None),
    Backend("triton", "fg_triton", "cpu", (torch.float32, torch.float16, torch.float64), TRITON_SKIP_REASON),
    Backend("cuda", "fg", "cuda", ALL_DTYPES, None if torch.cuda.is_available() else "needs a CUDA device"),
)
BACKEND_BY_NAME = {b.name: b for b in BACKENDS}


def _param(values, backend: Backend, id_: str):
    marks = [pytest.mark.gpu] if backend.device == "cuda" else []
    if backend.skip_reason:
        marks.append(pytest.mark.skip(reason=f"{backend.name} backend: {backend.skip_reason}"))
    return pytest.param(*values, marks=marks, id=id_)


def backend_params(names: Sequence[str] = ("cpu", "triton", "cuda")):
    """``@pytest.mark.parametrize("backend", backend_params())``: every backend, or those named."""
    return [_param((BACKEND_BY_NAME[n],), BACKEND_BY_NAME[n], n) for n in names]


def backend_dtype_params(dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
                         names: Sequence[str] = ("cpu", "triton", "cuda")):
    """``@pytest.mark.parametrize("backend,dtype", backend_dtype_params(...))``: each backend with
    each of ``dtypes`` whose values it is held to (``Backend.value_dtypes``)."""
    out = []
    for n in names:
        b = BACKEND_BY_NAME[n]
        for d in dtypes:
            if d in b.value_dtypes:
                out.append(_param((b, d), b, f"{n}-{DTYPE_IDS[d]}"))
    return out


# Backends that run compiled kernels: the large grids (the interpreter is ~100x slower; the shared
# sample cases run on every backend).
COMPILED = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


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
    def device(self) -> torch.device:
        return self.x.device

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
    device: str = "cpu",
) -> GatedInputs:
    """Seeded random inputs for ``gated_linear`` on ``device``; x has shape ``(*lead, K)``.

    Drawn on the CPU, so a seed gives the same values on every backend. Values are O(1) outputs:
    weights are scaled by 1/sqrt(K); the bias is O(1) and non-zero on every row (so exact zeros on
    inactive rows are a real check).
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
    return inp.map(lambda n, t: t.to(device))


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




def grads_of(fn, inp: GatedInputs, names: Sequence[str], grad_out: torch.Tensor):
    """``torch.autograd.grad`` of ``(fn(inp) * grad_out).sum()`` w.r.t. the named inputs.

    Works on fresh leaf copies so the caller's tensors are never mutated.
    """
    leaves = inp.map(lambda n, t: t.detach().clone().requires_grad_(n in names))
    y = fn(leaves)
    ts = [getattr(leaves, n) for n in names]
    # materialize_grads: an input the backward leaves undefined (None) counts as a zero gradient.
    gs = torch.autograd.grad(y, ts, grad_out.to(device=y.device, dtype=y.dtype), materialize_grads=True)
    return y.detach(), dict(zip(names, gs))


def ref_fn(inp: GatedInputs) -> torch.Tensor:
    return gated_linear_ref(*inp.args(), **inp.kwargs())


def op_fn(backend: Backend):
    """``inputs -> output`` through ``backend``'s gated_linear."""
    return lambda inp: backend.gated_linear(*inp.args(), **inp.kwargs())


def check_gated_forward(inp: GatedInputs, backend: Backend, *, what: str = "gated_linear") -> torch.Tensor:
    """Run the op on ``inp`` and compare with the reference; also the exact-zero contract."""
    out = op_fn(backend)(inp)
    assert out.dtype == inp.x.dtype, f"{what}: output dtype {out.dtype} != x dtype {inp.x.dtype}"
    assert out.shape == (*inp.x.shape[:-1], inp.weight.shape[0])
    truth = ref_forward(inp, torch.float64)
    lowp = ref_forward(inp) if out.dtype in LOW_PRECISION else None
    assert_matches(out, truth, lowp_ref=lowp, what=what, scale=ref_forward(magnitude(inp)))
    inactive = out[..., ~inp.row_on]
    assert (inactive == 0).all(), f"{what}: output on zero-gated rows is not exactly 0"
    return out


# --------------------------------------------------------------------------------------------
# Output poisoning
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def poisoned_memory(*nbytes_hint: int):
    """Make freshly allocated memory hold NaNs while the block runs.

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


# --------------------------------------------------------------------------------------------
# Gate patterns and the gradient check, shared by every backend
# --------------------------------------------------------------------------------------------


def pattern_gates(name: str, N: int, K: int, gen: torch.Generator, dtype=torch.float32, device="cpu"):
    """(row_gate, col_gate) for a named gate pattern, on ``device``."""
    def gate(n, sparsity, kind="fractional", dt=dtype):
        return make_gate(n, gen=gen, sparsity=sparsity, kind=kind, dtype=dt)

    if name == "all_zero":
        r, c = torch.zeros(N, dtype=dtype), torch.zeros(K, dtype=dtype)
    elif name == "rows_zero":
        r, c = torch.zeros(N, dtype=dtype), gate(K, 0.3)
    elif name == "cols_zero":
        r, c = gate(N, 0.3), torch.zeros(K, dtype=dtype)
    elif name == "all_one":
        r, c = torch.ones(N, dtype=dtype), torch.ones(K, dtype=dtype)
    elif name == "fractional_dense":  # every gate in (0, 1], none zero
        r, c = gate(N, 0.0), gate(K, 0.0)
    elif name == "binary_sparse":
        r, c = gate(N, 0.5, "binary"), gate(K, 0.5, "binary")
    elif name == "very_sparse":
        r, c = gate(N, 0.9), gate(K, 0.9)
    elif name == "rows_dense_cols_sparse":
        r, c = gate(N, 0.0), gate(K, 0.5)
    elif name == "rows_sparse_cols_dense":
        r, c = gate(N, 0.5), gate(K, 0.0)
    elif name == "one_active":
        r, c = torch.zeros(N, dtype=dtype), torch.zeros(K, dtype=dtype)
        r[N // 2] = 0.75
        c[K - 1] = 0.5
    elif name == "first_last_only":  # boundaries of the index range
        r, c = torch.zeros(N, dtype=dtype), torch.zeros(K, dtype=dtype)
        r[[0, N - 1]] = 1.0
        c[[0, K - 1]] = 1.0
    elif name == "negative_zero":  # -0.0 == 0: a removed row/column like +0.0
        r, c = gate(N, 0.4), gate(K, 0.4)
        r[r == 0] = -0.0
        c[c == 0] = -0.0
    elif name == "tiny":  # small but normal floats: still active rows/columns
        r = gate(N, 0.3, dt=torch.float32) * 10.0 ** (-30 * torch.rand(N, generator=gen))
        c = gate(K, 0.3, dt=torch.float32) * 10.0 ** (-6 * torch.rand(K, generator=gen))
        r, c = r.to(dtype), c.to(dtype)
    elif name == "signed":  # the formula holds for any gate value, not only [0, 1]
        r = gate(N, 0.3, dt=torch.float32) * (4 * torch.rand(N, generator=gen) - 2)
        c = gate(K, 0.3, dt=torch.float32) * (4 * torch.rand(K, generator=gen) - 2)
        r, c = r.to(dtype), c.to(dtype)
    else:
        raise ValueError(name)
    return r.to(device), c.to(device)


GATE_PATTERNS = [
    "all_zero", "rows_zero", "cols_zero", "all_one", "fractional_dense", "binary_sparse", "very_sparse",
    "rows_dense_cols_sparse", "rows_sparse_cols_dense", "one_active", "first_last_only", "negative_zero",
    "tiny", "signed",
]


def grad_names(inp: GatedInputs, weight_trainable: bool = True):
    """The inputs of ``inp`` that can have a gradient (the weight only when it trains)."""
    names = [n for n in GRAD_NAMES_ALL if getattr(inp, n) is not None]
    if not weight_trainable:
        names.remove("weight")
    return names


def assert_zero_gate_grads(inp: GatedInputs, g: Dict[str, torch.Tensor]) -> None:
    """Exactly zero gradient for everything a zero gate removes."""
    r_off, c_off = ~inp.row_on, ~inp.col_on
    if "x" in g:
        assert (g["x"][..., c_off] == 0).all(), "grad x: inactive columns not exactly 0"
    if "row_gate" in g:
        assert (g["row_gate"][r_off] == 0).all(), "grad row_gate: zero gates got gradient"
    if "col_gate" in g:
        assert (g["col_gate"][c_off] == 0).all(), "grad col_gate: zero gates got gradient"
    if "bias" in g:
        assert (g["bias"][r_off] == 0).all(), "grad bias: inactive rows not exactly 0"
    if "weight" in g:
        assert (g["weight"][r_off, :] == 0).all(), "grad weight: inactive rows not exactly 0"
        assert (g["weight"][:, c_off] == 0).all(), "grad weight: inactive cols not exactly 0"
    if "lora_a" in g:
        assert (g["lora_a"][:, c_off] == 0).all(), "grad lora_a: inactive cols not exactly 0"
    if "lora_b" in g:
        assert (g["lora_b"][r_off, :] == 0).all(), "grad lora_b: inactive rows not exactly 0"


def check_gated_grads(inp: GatedInputs, names, backend: Backend, *, seed: int, what: str = "gated_linear"):
    """Gradients through ``backend``'s op vs through the reference (float64 truth; the
    low-precision rule for bf16/fp16), plus the zero-gate contract. Returns (y, grads)."""
    n_out = inp.weight.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(*inp.x.shape[:-1], n_out, generator=gen).to(device=inp.device, dtype=inp.x.dtype)
    y, g_op = grads_of(op_fn(backend), inp, names, go)
    _, g_truth = grads_of(ref_fn, upcast(inp), names, go.double())
    _, g_mag = grads_of(ref_fn, magnitude(inp), names, go.double().abs())
    g_lowp = grads_of(ref_fn, inp, names, go)[1] if inp.x.dtype in LOW_PRECISION else None
    for n in names:
        assert g_op[n].dtype == getattr(inp, n).dtype, f"{what}: grad of {n} has dtype {g_op[n].dtype}"
        assert g_op[n].device == inp.device, f"{what}: grad of {n} on {g_op[n].device}"
        assert_matches(
            g_op[n], g_truth[n], lowp_ref=None if g_lowp is None else g_lowp[n],
            grad=True, what=f"{what}: grad {n}", compute_dtype=inp.x.dtype, scale=g_mag[n],
        )
    assert_zero_gate_grads(inp, g_op)
    return y, g_op
