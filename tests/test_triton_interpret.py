"""The Triton kernels (``fg_kernels.triton``) on the CPU, under the Triton interpreter, against the
pure-PyTorch reference: forward and backward of ``gated_linear`` (random zero patterns, all-zero
and all-one gates, odd sizes, 3-D x, LoRA on/off, float32 and float16) and ``gathered_linear``
(with and without row_idx / col_idx), plus the properties the GPU relies on that can be checked
without one: the active counts and index lists are runtime arguments (never ``tl.constexpr``), a
new sparsity pattern launches the kernels with exactly the same compile-relevant arguments, no
host synchronisation happens, and the op implementations pass ``torch.library.opcheck`` with the
package's fake and autograd registrations.

TRITON_INTERPRET=1 must be in the environment before ``triton`` is first imported (triton
decorates its own ``tl.*`` helpers at import time), so this module sets it before importing
triton, and restores the previous value right after. If triton was already imported without it
(e.g. a GPU run where ``fg_kernels`` registered the compiled kernels first), the whole file runs
in a subprocess instead (``test_interpreter_in_subprocess``). bfloat16 is left to the GPU tests:
the interpreter computes bfloat16 ``tl.dot`` wrongly.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Optional

import pytest
import torch

_TRITON_PREIMPORTED = "triton" in sys.modules
_SAVED_FLAG = os.environ.get("TRITON_INTERPRET")
if not _TRITON_PREIMPORTED:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip(
        "triton is not installed: the Triton kernels (fg_kernels.triton) are not tested "
        "(pip install triton)",
        allow_module_level=True,
    )
finally:
    if not _TRITON_PREIMPORTED:
        if _SAVED_FLAG is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _SAVED_FLAG

import fg_kernels.ops as fg_ops  # noqa: E402
import fg_kernels.triton as ft  # noqa: E402
from fg_kernels.reference import gated_linear_ref, gathered_linear_ref  # noqa: E402
from fg_kernels.triton import _launch  # noqa: E402

IN_PROCESS = _launch.interpreter_usable()
THIS_FILE = Path(__file__).resolve()

DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]
TENSORS = ("x", "weight", "bias", "row_gate", "col_gate", "lora_a", "lora_b")


@pytest.fixture(autouse=True)
def _interpreter_available(request):
    if request.node.name.startswith("test_interpreter_in_subprocess"):
        return
    if not IN_PROCESS:
        pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process: "
                    "covered by test_interpreter_in_subprocess")


def test_interpreter_in_subprocess():
    """Runs this file in a fresh interpreter process (TRITON_INTERPRET=1 from the start, CUDA
    hidden) when this process cannot run the Triton interpreter."""
    if IN_PROCESS:
        pytest.skip("the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(THIS_FILE)]
    res = subprocess.run(cmd, env=env, cwd=str(THIS_FILE.parent.parent), capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# Inputs and comparisons
# --------------------------------------------------------------------------------------------


def _seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture
def seed(request) -> int:
    return _seed(request)


def make_gate(n: int, gen: torch.Generator, sparsity: float) -> torch.Tensor:
    vals = 0.05 + 0.95 * torch.rand(n, generator=gen)
    if sparsity >= 1.0:
        return torch.zeros(n)
    if sparsity <= 0.0:
        return vals
    return vals * (torch.rand(n, generator=gen) >= sparsity)


def pattern_gates(pattern: str, N: int, K: int, gen: torch.Generator):
    """(row_gate, col_gate) float32 for a named zero pattern."""
    if pattern == "random":
        return make_gate(N, gen, 0.4), make_gate(K, gen, 0.4)
    if pattern == "all_zero":
        return torch.zeros(N), torch.zeros(K)
    if pattern == "all_one":
        return torch.ones(N), torch.ones(K)
    if pattern == "dense_fractional":  # no zero: the identity (direct indexing) path
        return make_gate(N, gen, 0.0), make_gate(K, gen, 0.0)
    if pattern == "rows_zero":
        return torch.zeros(N), make_gate(K, gen, 0.3)
    if pattern == "cols_zero":
        return make_gate(N, gen, 0.3), torch.zeros(K)
    if pattern == "rows_dense_cols_sparse":
        return make_gate(N, gen, 0.0), make_gate(K, gen, 0.5)
    if pattern == "rows_sparse_cols_dense":
        return make_gate(N, gen, 0.5), make_gate(K, gen, 0.0)
    if pattern == "very_sparse":
        r, c = make_gate(N, gen, 0.9), make_gate(K, gen, 0.9)
        r[N // 2] = 0.7  # at least one active row and column
        c[K - 1] = 0.3
        return r, c
    if pattern == "first_last":
        r, c = torch.zeros(N), torch.zeros(K)
        r[[0, N - 1]] = 1.0
        c[[0, K - 1]] = 0.5
        return r, c
    if pattern == "negative_zero_signed":  # -0.0 is a zero gate; any non-zero value is active
        r, c = make_gate(N, gen, 0.4), make_gate(K, gen, 0.4)
        r = r * torch.where(torch.rand(N, generator=gen) < 0.5, -1.0, 1.0)
        c = c * torch.where(torch.rand(K, generator=gen) < 0.5, -1.0, 1.0)
        return r, c
    raise ValueError(pattern)


PATTERNS = ["random", "all_zero", "all_one", "dense_fractional", "rows_zero", "cols_zero",
            "rows_dense_cols_sparse", "rows_sparse_cols_dense", "very_sparse", "first_last",
            "negative_zero_signed"]


def make_inputs(seed: int, lead, N: int, K: int, *, dtype=torch.float32, gate_dtype=None, pattern="random",
                bias=True, lora_rank=0, lora_scale=0.5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    gate_dtype = dtype if gate_dtype is None else gate_dtype
    rg, cg = pattern_gates(pattern, N, K, gen)
    d = dict(
        x=torch.randn(*lead, K, generator=gen),
        weight=torch.randn(N, K, generator=gen) / math.sqrt(max(K, 1)),
        bias=(torch.rand(N, generator=gen) + 0.5) * torch.where(torch.rand(N, generator=gen) < 0.5, -1.0, 1.0)
        if bias else None,
        row_gate=rg,
        col_gate=cg,
        lora_a=torch.randn(lora_rank, K, generator=gen) / math.sqrt(max(K, 1)) if lora_rank else None,
        lora_b=torch.randn(N, lora_rank, generator=gen) / math.sqrt(lora_rank) if lora_rank else None,
    )
    out = {n: None if t is None else t.to(gate_dtype if "gate" in n else dtype) for n, t in d.items()}
    # Rounding must not create or remove zero gates.
    assert torch.equal(out["row_gate"] != 0, rg != 0) and torch.equal(out["col_gate"] != 0, cg != 0)
    out["lora_scale"] = lora_scale
    return out


def args_of(inp: dict):
    return [inp[n] for n in TENSORS] + [inp["lora_scale"]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).norm().item() / max(b.norm().item(), 1e-300)


# float32: ~30x above honest rounding at these sizes; float16: ~10x. An indexing or gating bug
# gives errors of order 1. `mag` (the same quantity on |inputs|) covers results that cancel.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
MAG_TOL = {torch.float32: 1e-6, torch.float16: 2.0**-10}


def assert_close(out, truth, dtype, what, mag: Optional[torch.Tensor] = None):
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = rel_err(out, truth)
    if err <= TOL[dtype]:
        return
    if mag is not None:
        abs_err = (out.detach().double() - truth.detach().double()).norm().item()
        if abs_err <= MAG_TOL[dtype] * mag.double().norm().item():
            return
    raise AssertionError(f"{what}: rel err {err:.3e} > {TOL[dtype]:.1e} ({dtype})")


def ref_grads(inp: dict, names, go: torch.Tensor, *, absolute: bool = False):
    """Reference output and gradients in float64 (|inputs| and |grad| when `absolute`)."""
    f = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
    leaves = {n: None if inp[n] is None else f(inp[n]).requires_grad_(n in names) for n in TENSORS}
    y = gated_linear_ref(*[leaves[n] for n in TENSORS], inp["lora_scale"])
    if not names:
        return y.detach(), {}
    gs = torch.autograd.grad(y, [leaves[n] for n in names], f(go), allow_unused=True, materialize_grads=True)
    return y.detach(), dict(zip(names, gs))


@pytest.fixture
def poisoned():
    """Fresh torch.empty memory holds NaN while the block runs, so an output element the kernels
    forget to write is caught."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def check_forward(inp: dict, what: str):
    dtype = inp["x"].dtype
    out = ft.gated_linear(*args_of(inp))
    assert out.dtype == dtype and out.shape == (*inp["x"].shape[:-1], inp["weight"].shape[0])
    truth, _ = ref_grads(inp, (), torch.zeros(out.shape))
    assert_close(out, truth, dtype, what)
    off = inp["row_gate"] == 0
    assert (out[..., off] == 0).all(), f"{what}: outputs of zero-gated rows are not exactly 0"
    return out


def check_grads(inp: dict, names, seed: int, what: str):
    dtype = inp["x"].dtype
    N = inp["weight"].shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(*inp["x"].shape[:-1], N, generator=gen).to(dtype)
    leaves = {n: None if inp[n] is None else inp[n].detach().clone().requires_grad_(n in names) for n in TENSORS}
    y = ft.gated_linear(*[leaves[n] for n in TENSORS], inp["lora_scale"])
    gs = torch.autograd.grad(y, [leaves[n] for n in names], go, allow_unused=True, materialize_grads=True)
    _, truth = ref_grads(inp, names, go)
    _, mag = ref_grads(inp, names, go, absolute=True)
    for n, g in zip(names, gs):
        assert g.dtype == inp[n].dtype, f"{what}: grad of {n} has dtype {g.dtype}"
        assert_close(g, truth[n], dtype, f"{what}: grad {n}", mag=mag[n])
    rows_off = inp["row_gate"] == 0
    cols_off = inp["col_gate"] == 0
    g = dict(zip(names, gs))
    # A zero gate is a removed row/column: exactly zero gradient for everything behind it.
    if "x" in g:
        assert (g["x"][..., cols_off] == 0).all(), f"{what}: dx on zero columns"
    if "col_gate" in g:
        assert (g["col_gate"][cols_off] == 0).all(), f"{what}: d col_gate on zero columns"
    if "row_gate" in g:
        assert (g["row_gate"][rows_off] == 0).all(), f"{what}: d row_gate on zero rows"
    if "bias" in g:
        assert (g["bias"][rows_off] == 0).all(), f"{what}: d bias on zero rows"
    if "weight" in g:
        assert (g["weight"][rows_off] == 0).all() and (g["weight"][:, cols_off] == 0).all(), f"{what}: dW"
    if "lora_a" in g:
        assert (g["lora_a"][:, cols_off] == 0).all(), f"{what}: d lora_a on zero columns"
    if "lora_b" in g:
        assert (g["lora_b"][rows_off] == 0).all(), f"{what}: d lora_b on zero rows"


def grad_names(inp: dict):
    return [n for n in TENSORS if inp[n] is not None]


# --------------------------------------------------------------------------------------------
# No recompilation per sparsity pattern
# --------------------------------------------------------------------------------------------

KERNEL_NAMES = ("gate_meta_kernel", "gmm_kernel", "mtm_kernel", "colsum_kernel")
# Everything a kernel is specialised on (tl.constexpr): block sizes and structural flags only.
ALLOWED_CONSTEXPR = {
    "BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_P", "BLOCK_Q", "GROUP_M", "GROUP_P",
    "K_GATHER_A", "K_GATHER_B", "K_DYN", "K_IDENT_CHECK", "N_GATHER", "N_IDENT_CHECK",
    "HAS_KVAL", "HAS_NVAL", "HAS_BIAS", "HAS_LORA", "HAS_AUX", "STORE_OUT", "IDX64", "DOT_PREC",
    "P_GATHER", "Q_GATHER", "HAS_PVAL", "HAS_QVAL", "NEED_B", "NEED_G",
}


def _raw_fn(k):
    while not inspect.isfunction(k):
        k = k.fn
    return k


@pytest.mark.parametrize("interpret", [True, False], ids=["interpreted", "compiled"])
def test_active_counts_are_runtime_arguments(interpret):
    """Counts and index lists are pointers to device data, never tl.constexpr; the compiled
    kernels do not specialise on the scalars that can vary per pattern, and autotuning keys are
    full sizes, a token bucket and flags."""
    km = _launch.kernels(interpret)
    for name in KERNEL_NAMES:
        fn = _raw_fn(getattr(km, name))
        params = inspect.signature(fn).parameters
        constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        assert constexprs <= ALLOWED_CONSTEXPR, f"{name}: unexpected constexpr {constexprs - ALLOWED_CONSTEXPR}"
        for n in params:
            if any(s in n for s in ("cnt", "idx", "order", "vals", "val_ptr")):
                assert n.endswith("_ptr") and n not in constexprs, f"{name}: {n} must be a runtime pointer"
    assert "n0" in _raw_fn(km.gate_meta_kernel).__code__.co_varnames
    if not interpret:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        gm = km.gate_meta_kernel
        assert isinstance(gm, JITFunction) and {"n0", "n1"} <= set(gm.do_not_specialize)
        for name in ("gmm_kernel", "mtm_kernel"):
            k = getattr(km, name)
            if isinstance(k, Autotuner):
                assert not any("cnt" in key or "idx" in key for key in k.keys), k.keys
                assert "M_BUCKET" in k.keys and "M" not in k.keys, k.keys


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
def test_compiled_kernels_build_for_gpu_targets(arch):
    """The compiled (non-interpreted) kernels lower to PTX and SASS for Hopper and Ampere with
    triton's bundled compiler, no GPU needed: catches what the interpreter cannot (e.g. types that
    differ between the branches of an `if`). Runs in a subprocess without TRITON_INTERPRET."""
    nvidia_bin = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not nvidia_bin.exists():
        pytest.skip("triton's NVIDIA backend (bundled ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FG_TRITON_AUTOTUNE"] = "0"
    cmd = [sys.executable, "-m", "fg_kernels.triton._compile_check", "--quick", "--arch", str(arch)]
    res = subprocess.run(cmd, env=env, cwd=str(THIS_FILE.parent.parent), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert res.stdout.count("ok ") >= 5, res.stdout


def test_launch_arguments_do_not_depend_on_the_pattern(monkeypatch, seed):
    """Every launch of every kernel, over forward + backward, gets the same grid, the same
    non-tensor arguments (the compile cache key: constexprs and scalar specialisations) and the
    same tensor dtypes and shapes for 8 different gate patterns, from all-zero to all-one."""
    km = _launch.kernels(True)
    log = []

    def spy(name, kernel):
        orig_run = kernel.run

        def run(*args, grid, warmup, **kwargs):
            sig = tuple(("T", str(a.dtype), tuple(a.shape)) if isinstance(a, torch.Tensor) else a for a in args)
            log.append((name, sig, tuple(sorted(kwargs.items())), grid if not callable(grid) else "fn"))
            return orig_run(*args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(kernel, "run", run)

    for name in KERNEL_NAMES:
        spy(name, getattr(km, name))
    runs = []
    for i, pattern in enumerate(["random", "all_zero", "all_one", "very_sparse", "rows_zero",
                                 "rows_dense_cols_sparse", "first_last", "random"]):
        inp = make_inputs(seed + 17 * i, (5,), 21, 19, pattern=pattern, lora_rank=3)
        names = grad_names(inp)
        leaves = {n: None if inp[n] is None else inp[n].clone().requires_grad_(n in names) for n in TENSORS}
        log.clear()
        y = ft.gated_linear(*[leaves[n] for n in TENSORS], inp["lora_scale"])
        torch.autograd.grad(y, [leaves[n] for n in names], torch.ones_like(y))
        runs.append(list(log))
    assert len(runs[0]) >= 8
    for pattern_log in runs[1:]:
        assert pattern_log == runs[0]


def test_no_host_synchronisation(monkeypatch, seed):
    """The host never reads device data (counts, indices, gate values) in gated_linear forward or
    backward: on a GPU nothing waits for the device and CUDA graphs can capture the op."""
    inp = make_inputs(seed, (6,), 13, 11, lora_rank=2)
    names = grad_names(inp)
    leaves = {n: None if inp[n] is None else inp[n].clone().requires_grad_(n in names) for n in TENSORS}

    def forbidden(*a, **k):
        raise AssertionError("host read of device data (a synchronisation on a GPU)")

    for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    y = ft.gated_linear(*[leaves[n] for n in TENSORS], inp["lora_scale"])
    torch.autograd.grad(y, [leaves[n] for n in names], torch.ones_like(y))


# --------------------------------------------------------------------------------------------
# gated_linear forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_rank", [0, 3], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_patterns(pattern, dtype, lora_rank, seed, poisoned):
    inp = make_inputs(seed, (3, 7), 33, 37, dtype=dtype, pattern=pattern, lora_rank=lora_rank)
    out = check_forward(inp, f"forward[{pattern}]")
    if pattern in ("all_zero", "rows_zero"):
        assert (out == 0).all()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "lead,N,K",
    [((1,), 1, 1), ((7,), 1, 33), ((1,), 33, 1), ((7,), 7, 7), ((33,), 33, 33), ((2, 3, 4), 7, 33), ((), 33, 7)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_forward_sizes(lead, N, K, dtype, bias, seed, poisoned):
    inp = make_inputs(seed, lead, N, K, dtype=dtype, bias=bias, lora_rank=2)
    check_forward(inp, f"forward[{lead},{N},{K}]")


def test_forward_float32_gates_with_float16_x(seed):
    inp = make_inputs(seed, (9,), 21, 26, dtype=torch.float16, gate_dtype=torch.float32, lora_rank=2)
    check_forward(inp, "forward[fp16 x, fp32 gates]")


def test_forward_dense_equals_linear(seed):
    """All gates 1: what F.linear computes (the identity fast path)."""
    inp = make_inputs(seed, (17,), 40, 36, pattern="all_one")
    out = ft.gated_linear(*args_of(inp))
    lin = torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"])
    assert rel_err(out, lin) <= 1e-6


def test_forward_empty_tokens(seed):
    for lead in [(0,), (3, 0)]:
        inp = make_inputs(seed, lead, 9, 7, lora_rank=2)
        out = ft.gated_linear(*args_of(inp))
        assert out.shape == (*lead, 9)


def test_forward_noncontiguous(seed, poisoned):
    """x a transposed view, weight a transposed (GPT-2 Conv1D) view, LoRA factors transposed."""
    inp = make_inputs(seed, (10,), 19, 23, lora_rank=3)
    ref = check_forward(inp, "contiguous")
    nc = dict(inp)
    nc["x"] = inp["x"].t().contiguous().t()
    nc["weight"] = inp["weight"].t().contiguous().t()
    nc["lora_a"] = inp["lora_a"].t().contiguous().t()
    nc["lora_b"] = inp["lora_b"].t().contiguous().t()
    assert not nc["x"].is_contiguous() and not nc["weight"].is_contiguous()
    out = check_forward(nc, "non-contiguous")
    assert rel_err(out, ref) <= 1e-6


def test_forward_matches_cpu_op(seed):
    """The Triton kernels and the C++ CPU kernels implement the same op."""
    inp = make_inputs(seed, (2, 9), 30, 27, lora_rank=4)
    a = ft.gated_linear(*args_of(inp))
    b = torch.ops.fg.gated_linear(*args_of(inp))
    assert rel_err(a, b) <= 1e-5
    assert torch.equal(a == 0, b == 0)


# --------------------------------------------------------------------------------------------
# gated_linear backward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_rank", [0, 3], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_grads_patterns(pattern, dtype, lora_rank, seed, poisoned):
    inp = make_inputs(seed, (3, 7), 33, 37, dtype=dtype, pattern=pattern, lora_rank=lora_rank)
    check_grads(inp, grad_names(inp), seed, f"grads[{pattern}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "lead,N,K",
    [((1,), 1, 1), ((7,), 1, 33), ((1,), 33, 1), ((33,), 7, 7), ((2, 3, 4), 33, 33), ((), 7, 33)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_grads_sizes(lead, N, K, dtype, seed, poisoned):
    inp = make_inputs(seed, lead, N, K, dtype=dtype, lora_rank=2)
    check_grads(inp, grad_names(inp), seed, f"grads[{lead},{N},{K}]")


@pytest.mark.parametrize(
    "names",
    [("x",), ("row_gate",), ("col_gate",), ("bias",), ("weight",), ("lora_a",), ("lora_b",),
     ("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b")],
    ids=lambda n: "+".join(n),
)
def test_grads_subsets(names, seed):
    """Only the requested gradients (frozen weight by default, as in FineGates fine-tuning)."""
    inp = make_inputs(seed, (4, 3), 26, 18, lora_rank=3)
    check_grads(inp, list(names), seed, f"grads[{'+'.join(names)}]")


def test_grads_noncontiguous_grad_out(seed):
    """An expanded (stride-0) and a transposed grad_out."""
    inp = make_inputs(seed, (8,), 17, 15, lora_rank=2)
    names = grad_names(inp)
    _, truth = ref_grads(inp, names, torch.ones(8, 17))
    for go in (torch.ones(1, 1).expand(8, 17), torch.ones(17, 8).t()):
        leaves = {n: None if inp[n] is None else inp[n].clone().requires_grad_() for n in TENSORS}
        y = ft.gated_linear(*[leaves[n] for n in TENSORS], inp["lora_scale"])
        gs = torch.autograd.grad(y, [leaves[n] for n in names], go)
        for n, g in zip(names, gs):
            assert_close(g, truth[n], torch.float32, f"grad {n} (grad_out strides {go.stride()})")


MASKS = [
    (True, True, True, True, True, True, True),
    (True, False, True, True, True, True, True),
    (False, False, False, True, False, False, False),
    (False, False, False, False, True, False, False),
    (True, False, False, False, False, False, False),
    (False, True, False, False, False, False, True),
    (False, False, True, False, False, True, False),
    (False, False, False, False, False, False, False),
]


@pytest.mark.parametrize("lora_rank", [0, 3], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_backward_op_matches_cpu_op(mask, lora_rank, seed):
    """gated_linear_backward (the function registered for CUDA) against the C++ CPU kernel of the
    same schema: every output's shape and dtype (empty (0,) when not selected) and values."""
    inp = make_inputs(seed, (2, 5), 23, 19, lora_rank=lora_rank)
    x, w = inp["x"], inp["weight"]
    y = torch.ops.fg.gated_linear(*args_of(inp))
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    need_x = mask[1] or mask[4] or mask[5] or mask[6]
    args = (go, x if need_x else None, w, inp["row_gate"], inp["col_gate"], inp["lora_a"], inp["lora_b"],
            inp["lora_scale"], y if mask[3] else None, list(mask))
    mine = ft.gated_linear_backward(*args)
    theirs = torch.ops.fg.gated_linear_backward(*args)
    fake = fg_ops._gated_linear_backward_fake(*args) if hasattr(fg_ops, "_gated_linear_backward_fake") else None
    assert len(mine) == 7
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"output {i}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if fake is not None:
            assert a.shape == fake[i].shape and a.dtype == fake[i].dtype, f"output {i} vs fake"
        if b.numel():
            assert rel_err(a, b) <= 1e-5 or (a - b).abs().max().item() <= 1e-5, f"output {i}"


def test_backward_requires_x_and_output():
    inp = make_inputs(0, (3,), 5, 4)
    go = torch.ones(3, 5)
    with pytest.raises(ValueError, match=r"\bx\b"):
        ft.gated_linear_backward(go, None, inp["weight"], inp["row_gate"], inp["col_gate"], None, None, 1.0, None,
                                 [False, False, False, False, True, False, False])
    with pytest.raises(ValueError, match="output"):
        ft.gated_linear_backward(go, inp["x"], inp["weight"], inp["row_gate"], inp["col_gate"], None, None, 1.0,
                                 None, [False, False, False, True, False, False, False])


def test_backward_empty_tokens(seed):
    inp = make_inputs(seed, (0,), 9, 7, lora_rank=2)
    names = grad_names(inp)
    leaves = {n: None if inp[n] is None else inp[n].clone().requires_grad_() for n in TENSORS}
    y = ft.gated_linear(*[leaves[n] for n in TENSORS], inp["lora_scale"])
    gs = torch.autograd.grad(y, [leaves[n] for n in names], torch.ones_like(y), allow_unused=True,
                             materialize_grads=True)
    for n, g in zip(names, gs):
        assert g.shape == inp[n].shape and (g == 0).all(), n


# --------------------------------------------------------------------------------------------
# gathered_linear
# --------------------------------------------------------------------------------------------


def _index(spec: Optional[str], full: int, n: int, gen: torch.Generator, dtype=torch.int64):
    if spec is None:
        return None
    idx = torch.randperm(full, generator=gen)[:n]
    if spec == "sorted":
        idx = idx.sort().values
    return idx.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("col_spec", [None, "sorted", "unsorted"], ids=lambda s: f"col_{s}")
@pytest.mark.parametrize("row_spec", [None, "sorted", "unsorted"], ids=lambda s: f"row_{s}")
def test_gathered_linear(row_spec, col_spec, dtype, seed, poisoned):
    gen = torch.Generator().manual_seed(seed)
    kx, out_f, nR, nC = 37, 35, 17, 21
    ri = _index(row_spec, out_f, nR, gen)
    ci = _index(col_spec, kx, nC, gen, torch.int32 if col_spec == "unsorted" else torch.int64)
    out_features = out_f if ri is not None else nR
    x = torch.randn(3, 5, kx if ci is not None else nC, generator=gen).to(dtype)
    w = (torch.randn(nR, nC, generator=gen) / math.sqrt(nC)).to(dtype)
    b = torch.randn(nR, generator=gen).to(dtype)
    y = ft.gathered_linear(x, w, b, ri, ci, out_features)
    truth = gathered_linear_ref(x.double(), w.double(), b.double(), ri, ci, out_features)
    assert y.dtype == dtype
    assert_close(y, truth, dtype, f"gathered[{row_spec},{col_spec}]")
    if ri is not None:
        off = torch.ones(out_f, dtype=torch.bool)
        off[ri.long()] = False
        assert (y[..., off] == 0).all()
    if dtype == torch.float32:
        y_cpu = torch.ops.fg.gathered_linear(x, w, b, ri, ci, out_features)
        assert rel_err(y, y_cpu) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 1, 33, 33), (33, 7, 7, 7), (1, 33, 5, 33)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gathered_linear_sizes(shape, seed):
    M, nR, nC, full = shape
    gen = torch.Generator().manual_seed(seed)
    ri = _index("unsorted", full + 2, nR, gen)
    ci = _index("sorted", nC + 3, nC, gen)
    x = torch.randn(M, nC + 3, generator=gen)
    w = torch.randn(nR, nC, generator=gen)
    for b in (torch.randn(nR, generator=gen), None):
        y = ft.gathered_linear(x, w, b, ri, ci, full + 2)
        truth = gathered_linear_ref(x.double(), w.double(), None if b is None else b.double(), ri, ci, full + 2)
        assert_close(y, truth, torch.float32, f"gathered sizes {shape}")


def test_gathered_linear_grads_and_empty(seed):
    gen = torch.Generator().manual_seed(seed)
    ri, ci = _index("unsorted", 12, 5, gen), _index("sorted", 9, 6, gen)
    x = torch.randn(4, 9, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True)
    go = torch.randn(4, 12, generator=gen)
    g1 = torch.autograd.grad(ft.gathered_linear(x, w, b, ri, ci, 12), (x, w, b), go)
    g2 = torch.autograd.grad(gathered_linear_ref(x, w, b, ri, ci, 12), (x, w, b), go)
    for a, r in zip(g1, g2):
        assert_close(a, r, torch.float32, "gathered grads")
    y = ft.gathered_linear(torch.randn(0, 9), w.detach(), None, ri, ci, 12)
    assert y.shape == (0, 12)


# --------------------------------------------------------------------------------------------
# Bad input: a Python exception naming the argument
# --------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    inp = make_inputs(0, (5,), 12, 10, lora_rank=2)

    def call(**over):
        d = dict(inp)
        d.update(over)
        return ft.gated_linear(*args_of(d))

    with pytest.raises(TypeError, match=r"\bx\b.*dtype|dtype.*\bx\b"):
        call(**{n: (None if inp[n] is None else inp[n].double()) for n in TENSORS})
    with pytest.raises(ValueError, match=r"\bx\b"):
        call(x=torch.randn(5, 11))
    with pytest.raises(ValueError, match="weight"):
        call(weight=torch.randn(12, 10, 1))
    with pytest.raises(TypeError, match="weight"):
        call(weight=inp["weight"].half())
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.randn(11))
    with pytest.raises(ValueError, match="row_gate"):
        call(row_gate=torch.ones(11))
    with pytest.raises(ValueError, match="col_gate"):
        call(col_gate=torch.ones(10, 1))
    with pytest.raises(TypeError, match="col_gate"):
        call(col_gate=torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="lora"):
        call(lora_b=None)
    with pytest.raises(ValueError, match="lora_b"):
        call(lora_b=torch.randn(12, 3))
    w, x = torch.randn(4, 3), torch.randn(2, 6)
    with pytest.raises(IndexError, match="col_idx"):
        ft.gathered_linear(x, w, None, None, torch.tensor([0, 1, 6]), 4)
    with pytest.raises(IndexError, match="row_idx"):
        ft.gathered_linear(x, w, None, torch.tensor([0, 1, 2, -1]), torch.tensor([0, 1, 2]), 8)
    with pytest.raises(TypeError, match="row_idx"):
        ft.gathered_linear(x, w, None, torch.tensor([0.0, 1, 2, 3]), torch.tensor([0, 1, 2]), 8)
    with pytest.raises(ValueError, match="out_features"):
        ft.gathered_linear(x[:, :3], w, None, None, None, 5)


# --------------------------------------------------------------------------------------------
# opcheck: the Triton implementations behind the package's fake and autograd registrations
# --------------------------------------------------------------------------------------------

_TEST_NS = "fg_triton_itest"
_test_lib = None


def _test_ops():
    """The three fg schemas in a test namespace, implemented for the CPU by the Triton functions
    (interpreted) exactly as cuda_registration wires them for CUDA, with fg_kernels.ops' fakes and
    its autograd formula."""
    global _test_lib
    ns = getattr(torch.ops, _TEST_NS)
    if _test_lib is not None:
        return ns
    needed = ("_gated_linear_fake", "_gated_linear_backward_fake", "_gathered_linear_fake",
              "_gated_setup_context", "_gathered_setup_context", "_gathered_backward")
    if not all(hasattr(fg_ops, n) for n in needed):
        pytest.skip("fg_kernels.ops no longer exposes its fake/autograd functions under the expected names")
    lib = torch.library.Library(_TEST_NS, "DEF")
    for op in ("gated_linear", "gated_linear_backward", "gathered_linear"):
        schema = str(getattr(torch.ops.fg, op).default._schema).split("::", 1)[1]
        lib.define(schema)
    lib.impl("gated_linear", ft.gated_linear_forward, "CPU")
    lib.impl("gated_linear_backward", ft.gated_linear_backward, "CPU")
    lib.impl("gathered_linear", ft.gathered_linear_forward, "CPU")
    torch.library.register_fake(f"{_TEST_NS}::gated_linear", fg_ops._gated_linear_fake, lib=lib)
    torch.library.register_fake(f"{_TEST_NS}::gated_linear_backward", fg_ops._gated_linear_backward_fake, lib=lib)
    torch.library.register_fake(f"{_TEST_NS}::gathered_linear", fg_ops._gathered_linear_fake, lib=lib)

    def gated_backward(ctx, grad):
        x, weight, row_gate, col_gate, lora_a, lora_b, output = ctx.saved_tensors
        grads = getattr(torch.ops, _TEST_NS).gated_linear_backward(
            grad, x, weight, row_gate, col_gate, lora_a, lora_b, ctx.lora_scale, output, ctx.mask
        )
        return (*(gr if m else None for gr, m in zip(grads, ctx.mask)), None)

    torch.library.register_autograd(f"{_TEST_NS}::gated_linear", gated_backward,
                                    setup_context=fg_ops._gated_setup_context, lib=lib)
    torch.library.register_autograd(f"{_TEST_NS}::gathered_linear", fg_ops._gathered_backward,
                                    setup_context=fg_ops._gathered_setup_context, lib=lib)
    _test_lib = lib
    return ns


@pytest.mark.parametrize("case", ["lora_frozenW", "all_zero", "trainW_3d"])
def test_opcheck_triton_implementation(case, seed):
    ops = _test_ops()
    if case == "lora_frozenW":
        inp, req = make_inputs(seed, (2, 5), 13, 8, lora_rank=2), ("x", "bias", "row_gate", "col_gate",
                                                                    "lora_a", "lora_b")
    elif case == "all_zero":
        inp, req = make_inputs(seed, (5,), 10, 7, pattern="all_zero", lora_rank=1), ("x", "bias", "row_gate",
                                                                                      "col_gate")
    else:
        inp, req = make_inputs(seed, (2, 3), 12, 6), TENSORS
    leaves = {n: None if inp[n] is None else inp[n].clone().requires_grad_(n in req) for n in TENSORS}
    args = tuple(leaves[n] for n in TENSORS[:5])
    kwargs = dict(lora_a=leaves["lora_a"], lora_b=leaves["lora_b"], lora_scale=inp["lora_scale"])
    torch.library.opcheck(ops.gated_linear.default, args, kwargs)


def test_opcheck_triton_gathered(seed):
    ops = _test_ops()
    gen = torch.Generator().manual_seed(seed)
    ri, ci = _index("unsorted", 11, 5, gen), _index("sorted", 9, 6, gen)
    x = torch.randn(4, 9, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True)
    torch.library.opcheck(ops.gathered_linear.default, (x, w, b, ri, ci, 11))
    torch.library.opcheck(ops.gathered_linear.default, (x[:, :6], w, None, None, None, 5))


# --------------------------------------------------------------------------------------------
# A whole model through both paths: the C++ CPU kernel and the Triton kernels
# --------------------------------------------------------------------------------------------


def test_sparsified_model_same_through_cpu_kernel_and_triton():
    """A tiny LLaMA with gates (some closed) gives the same loss and gate gradients through
    torch.ops.fg (C++ on CPU) and through fg_kernels.triton under the interpreter."""
    transformers = pytest.importorskip("transformers")
    import finegates

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    finegates.sparsify(model, target_sparsity=0.3, lora_rank=2)
    with torch.no_grad():
        for _, layer in finegates.gated_layers(model):
            for gates in (layer.row_gates, layer.col_gates):
                closed = torch.rand(gates.theta.shape) < 0.3
                gates.theta.masked_fill_(closed, -5.0)
            layer.lora_b.normal_(0, 0.1)  # non-zero LoRA so its path is exercised too
    ids = torch.randint(0, 64, (2, 9))

    def loss_and_grads(backend):
        finegates.set_backend(model, backend)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss_cpu, g_cpu = loss_and_grads("ops")
    loss_tri, g_tri = loss_and_grads("triton")
    finegates.set_backend(model, "ops")
    assert any("theta" in n for n in g_cpu) and any("lora" in n for n in g_cpu)
    assert g_cpu.keys() == g_tri.keys()
    torch.testing.assert_close(loss_tri, loss_cpu, rtol=1e-5, atol=1e-6)
    for n in g_cpu:
        torch.testing.assert_close(g_tri[n], g_cpu[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_triton_outputs_are_not_views():
    """Like the CPU kernel, the Triton forwards return their output in its final shape (a view
    would make autograd refuse in-place use of the op's output on CUDA)."""
    x = torch.randn(2, 3, 5)
    y = ft.gated_linear_forward(x, torch.randn(4, 5), None, torch.ones(4), torch.ones(5))
    assert y._base is None and y.shape == (2, 3, 4)
    z = ft.gathered_linear_forward(x, torch.randn(2, 5), None, torch.tensor([0, 3]), None, 4)
    assert z._base is None and z.shape == (2, 3, 4)
