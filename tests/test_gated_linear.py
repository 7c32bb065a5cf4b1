"""``fg::gated_linear`` against the pure-PyTorch reference on every backend: values, gradients,
gradcheck, opcheck, torch.compile.

Every test draws fresh seeded random inputs (``conftest.make_gated_inputs``) on the backend's
device and compares the op with ``fg_kernels.reference.gated_linear_ref`` evaluated in float64 on
the same inputs. The shared cases run on every backend (``backend_params()``); the large grids on
the compiled ones (``COMPILED``), the interpreter being about 100x slower.
"""

from __future__ import annotations

import math

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fg_kernels
from fg_kernels import contract
from torch._subclasses.fake_tensor import FakeTensorMode
from conftest import (
    BAD_INPUT_ERRORS,
    COMPILED,
    GATE_PATTERNS,
    GRAD_NAMES_ALL,
    GatedInputs,
    assert_matches,
    assert_zero_gate_grads,
    backend_dtype_params,
    backend_params,
    check_gated_forward,
    check_gated_grads,
    grad_names,
    grads_of,
    make_gated_inputs,
    op_fn,
    pattern_gates,
    poisoned_memory,
    ref_fn,
    ref_forward,
    rel_err,
    upcast,
)

LOWP = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes of the value suites


def _tol(dtype) -> float:
    """A bound for comparing two results of the op itself in ``dtype``."""
    return {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 2.0**-8)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


SIZES = [1, 7, 129]


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.bfloat16), COMPILED))
@pytest.mark.parametrize("K", SIZES, ids=lambda v: f"K{v}")
@pytest.mark.parametrize("N", SIZES, ids=lambda v: f"N{v}")
@pytest.mark.parametrize("M", SIZES, ids=lambda v: f"M{v}")
def test_forward_size_grid(M, N, K, backend, dtype, seed):
    inp = make_gated_inputs(seed, (M,), N, K, dtype=dtype, device=backend.device)
    check_gated_forward(inp, backend)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(LOWP))
@pytest.mark.parametrize("lora_rank", [0, 4], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("pattern", GATE_PATTERNS)
def test_forward_gate_patterns(pattern, lora_rank, backend, dtype, seed):
    N, K = 37, 45
    inp = make_gated_inputs(seed, (3, 11), N, K, dtype=dtype, lora_rank=lora_rank, lora_scale=0.5,
                            device=backend.device)
    gen = torch.Generator().manual_seed(seed + 7)
    inp.row_gate, inp.col_gate = pattern_gates(pattern, N, K, gen, dtype, backend.device)
    out = check_gated_forward(inp, backend, what=f"gated_linear[{pattern}]")
    if pattern in ("all_zero", "rows_zero"):
        assert (out == 0).all()
    if pattern == "cols_zero":
        # No input column survives: each active row is exactly row_gate * bias (one rounding).
        expect = (inp.row_gate.to(dtype) * inp.bias).expand_as(out)
        assert rel_err(out, expect) <= _tol(dtype)


@pytest.mark.parametrize("backend", backend_params())
def test_forward_dense_path_equals_linear(backend, seed):
    """All gates 1 (the dense path): exactly what F.linear computes, up to fp32 rounding."""
    inp = make_gated_inputs(seed, (65,), 96, 80, gate_kind="ones", device=backend.device)
    out = op_fn(backend)(inp)
    lin = torch.nn.functional.linear(inp.x, inp.weight, inp.bias)
    assert rel_err(out, lin) <= 1e-6


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize(
    "lead", [(), (1,), (6,), (2, 5), (2, 3, 4), (0,), (3, 0)],
    ids=lambda s: "x" + "x".join(map(str, s)) if s else "1d",
)
def test_forward_x_rank(lead, backend, dtype, seed):
    """1-D, 2-D, 3-D and 4-D x, and empty leading dimensions."""
    inp = make_gated_inputs(seed, lead, 19, 23, dtype=dtype, lora_rank=2, device=backend.device)
    out = check_gated_forward(inp, backend)
    assert out.shape == (*lead, 19)
    if lead and math.prod(lead) > 0:
        # Leading dims are independent tokens: the same as calling on the flattened 2-D x.
        flat = op_fn(backend)(inp.map(lambda n, t: t.reshape(-1, t.shape[-1]) if n == "x" else t))
        assert torch.equal(out.reshape(-1, 19), flat) or rel_err(out.reshape(-1, 19), flat) <= 1e-6


def _x_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as 2-D/3-D ``x``, in a non-contiguous layout (on x's device)."""
    *lead, K = x.shape
    nan = dict(fill_value=float("nan"), dtype=x.dtype, device=x.device)
    if layout == "transposed":  # stride (1, M)
        v = x.reshape(-1, K).t().contiguous().t().reshape(*lead, K)
    elif layout == "sliced_last":  # stride 2 along K
        w = torch.full((*lead, 2 * K), **nan)
        w[..., ::2] = x
        v = w[..., ::2]
    elif layout == "sliced_rows":
        w = torch.full((2 * lead[0], *lead[1:], K), **nan)
        w[::2] = x
        v = w[::2]
    elif layout == "narrow":  # storage offset + row padding
        w = torch.full((*lead, K + 5), **nan)
        w[..., 3:3 + K] = x
        v = w[..., 3:3 + K]
    elif layout == "permuted":  # 3-D stored as (K, B, T)
        v = x.permute(-1, *range(len(lead))).contiguous().permute(*range(1, len(lead) + 1), 0)
    elif layout == "expanded":  # stride 0 in a leading dim
        return x[:1].expand_as(x)
    else:
        raise ValueError(layout)
    assert torch.equal(v, x)
    if layout != "permuted" or len(lead) > 1:
        assert not v.is_contiguous()
    return v


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("lead", [(13,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("layout", ["transposed", "sliced_last", "sliced_rows", "narrow", "permuted", "expanded"])
def test_forward_noncontiguous_x(layout, lead, backend, dtype, seed):
    inp = make_gated_inputs(seed, lead, 21, 30, dtype=dtype, device=backend.device)
    inp.x = _x_layout(inp.x, layout)
    check_gated_forward(inp, backend, what=f"gated_linear[x {layout}]")


def _weight_layout(w: torch.Tensor, layout: str) -> torch.Tensor:
    N, K = w.shape
    nan = dict(fill_value=float("nan"), dtype=w.dtype, device=w.device)
    if layout == "conv1d_t":  # GPT-2 Conv1D keeps (K, N); the layer passes weight.t()
        v = w.t().contiguous().t()
    elif layout == "row_sliced":
        big = torch.full((2 * N, K), **nan)
        big[::2] = w
        v = big[::2]
    elif layout == "col_sliced":
        big = torch.full((N, 2 * K), **nan)
        big[:, ::2] = w
        v = big[:, ::2]
    elif layout == "offset_narrow":
        big = torch.full((N + 2, K + 3), **nan)
        big[1:1 + N, 2:2 + K] = w
        v = big[1:1 + N, 2:2 + K]
    else:
        raise ValueError(layout)
    assert torch.equal(v, w) and not v.is_contiguous()
    return v


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("lora_rank", [0, 3], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("layout", ["conv1d_t", "row_sliced", "col_sliced", "offset_narrow"])
def test_forward_noncontiguous_weight(layout, lora_rank, backend, dtype, seed):
    inp = make_gated_inputs(seed, (2, 9), 33, 26, dtype=dtype, lora_rank=lora_rank, device=backend.device)
    inp.weight = _weight_layout(inp.weight, layout)
    check_gated_forward(inp, backend, what=f"gated_linear[weight {layout}]")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["bias", "row_gate", "col_gate", "lora_a", "lora_b"])
def test_forward_noncontiguous_small_args(name, backend, seed):
    """Strided bias/gates/LoRA: either the right answer or a clear error naming the argument
    (DESIGN: 'contiguity it cannot handle' is reported, never a silent wrong answer)."""
    inp = make_gated_inputs(seed, (9,), 20, 24, lora_rank=3, device=backend.device)
    t = getattr(inp, name)
    big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    setattr(inp, name, big[..., ::2])
    try:
        out = op_fn(backend)(inp)
    except BAD_INPUT_ERRORS as e:
        assert name in str(e), f"error for strided {name} does not name it: {e}"
        return
    assert_matches(out, ref_forward(inp, torch.float64), what=f"strided {name}")
    assert (out[..., ~inp.row_on] == 0).all()


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5], ids=["dense", "sparse"])
def test_forward_bias(bias, sparsity, backend, dtype, seed):
    inp = make_gated_inputs(seed, (17,), 40, 31, dtype=dtype, bias=bias, row_sparsity=sparsity,
                            col_sparsity=sparsity, device=backend.device)
    out = check_gated_forward(inp, backend)
    if bias:
        # The bias must actually be used (guards against a test that passes with bias ignored).
        inp_nb = GatedInputs(inp.x, inp.weight, None, inp.row_gate, inp.col_gate)
        diff = out.float() - op_fn(backend)(inp_nb).float()
        expect = (inp.row_gate.float() * inp.bias.float()).expand_as(diff)
        assert rel_err(diff, expect) <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend", backend_params())
def test_inactive_rows_exact_zero_with_large_bias(backend, seed):
    """Zero-gated rows are exactly 0 even where the bias is large (and the weight row is huge)."""
    inp = make_gated_inputs(seed, (4, 8), 30, 25, row_sparsity=0.5, col_sparsity=0.3, device=backend.device)
    inp.bias = torch.full((30,), 1e4, device=backend.device)
    inp.weight = inp.weight.clone()
    inp.weight[~inp.row_on] *= 1e6
    out = check_gated_forward(inp, backend)
    assert (out[..., ~inp.row_on] == 0).all()
    assert (out[..., inp.row_on] != 0).all()


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("lora_scale", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("lora_rank", [1, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.5], ids=["dense", "sparse"])
def test_forward_lora(lora_rank, lora_scale, sparsity, backend, dtype, seed):
    inp = make_gated_inputs(seed, (2, 7), 29, 34, dtype=dtype, lora_rank=lora_rank, lora_scale=lora_scale,
                            row_sparsity=sparsity, col_sparsity=sparsity, device=backend.device)
    out = check_gated_forward(inp, backend)
    # LoRA must contribute: compare against the op without LoRA.
    base = op_fn(backend)(GatedInputs(*inp.args()))
    if lora_scale == 0.0:
        assert rel_err(out, base) <= _tol(dtype)
    elif inp.row_on.any() and inp.col_on.any():
        assert rel_err(out, base) > 1e-2


@pytest.mark.parametrize("backend", backend_params())
def test_forward_lora_zero_b_equals_no_lora(backend, seed):
    """Freshly initialised LoRA (B = 0) is the identity on the layer."""
    inp = make_gated_inputs(seed, (11,), 24, 18, lora_rank=4, device=backend.device)
    inp.lora_b = torch.zeros_like(inp.lora_b)
    out = op_fn(backend)(inp)
    base = op_fn(backend)(GatedInputs(*inp.args()))
    assert rel_err(out, base) <= 1e-6


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.bfloat16, torch.float16)))
@pytest.mark.parametrize("lora_rank", [0, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.4, 1.0])
def test_forward_fp32_gates_lowp_x(sparsity, lora_rank, backend, dtype, seed):
    """float32 gates with bfloat16/float16 activations (gates kept in fp32 by the layer)."""
    inp = make_gated_inputs(seed, (3, 10), 27, 36, dtype=dtype, gate_dtype=torch.float32, row_sparsity=sparsity,
                            col_sparsity=sparsity, lora_rank=lora_rank, device=backend.device)
    # Gate values that the low precision cannot represent exactly: the op may use them in fp32 or round them.
    assert not torch.equal(inp.row_gate, inp.row_gate.to(dtype).float()) or sparsity == 1.0
    out = check_gated_forward(inp, backend)
    assert out.dtype == dtype


@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_python_wrapper_matches_op(backend, seed):
    inp = make_gated_inputs(seed, (2, 6), 15, 22, lora_rank=2, lora_scale=0.5, device=backend.device)
    a = torch.ops.fg.gated_linear(*inp.args(), **inp.kwargs())
    b = fg_kernels.gated_linear(*inp.args(), **inp.kwargs())
    c = torch.ops.fg.gated_linear.default(*inp.args(), inp.lora_a, inp.lora_b, inp.lora_scale)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert_matches(a, ref_forward(inp, torch.float64))


@pytest.mark.parametrize("backend", backend_params())
def test_inputs_not_modified(backend, seed):
    inp = make_gated_inputs(seed, (9,), 20, 16, lora_rank=2, device=backend.device)
    before = {n: t.clone() for n, t in inp.tensors().items()}
    op_fn(backend)(inp)
    for n, t in inp.tensors().items():
        assert torch.equal(t, before[n]), f"op modified its input {n}"


# ---------------------------------------------------------------------------------------------
# Output poisoning: the op allocates its outputs; uninitialised memory must never leak
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("pattern", ["all_zero", "rows_zero", "cols_zero", "very_sparse", "binary_sparse", "all_one"])
def test_poisoned_memory_forward_and_backward(pattern, backend, dtype, seed):
    N, K = 40, 35
    inp = make_gated_inputs(seed, (3, 11), N, K, dtype=dtype, lora_rank=2, device=backend.device)
    gen = torch.Generator().manual_seed(seed + 3)
    inp.row_gate, inp.col_gate = pattern_gates(pattern, N, K, gen, dtype, backend.device)
    out_bytes = 3 * 11 * N * inp.x.element_size()
    names = grad_names(inp)
    with poisoned_memory(out_bytes, inp.x.numel() * inp.x.element_size(), inp.weight.numel() * 4):
        # Sanity of the poisoning itself: a fresh allocation really is NaN.
        assert torch.empty(N, dtype=dtype, device=backend.device).isnan().all()
        out = op_fn(backend)(inp)
        go = torch.randn(*out.shape, generator=gen).to(device=backend.device, dtype=dtype)
        _, g = grads_of(op_fn(backend), inp, names, go)
    assert not out.isnan().any(), "NaN in output: uninitialised memory leaked"
    assert (out[..., ~inp.row_on] == 0).all()
    assert_matches(out, ref_forward(inp, torch.float64), lowp_ref=None if dtype == torch.float32 else ref_forward(inp))
    for n, t in g.items():
        assert not t.isnan().any(), f"NaN in grad {n}: uninitialised memory leaked"
    assert_zero_gate_grads(inp, g)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(COMPILED))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lora_rank", [0, 4], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("weight_trainable", [False, True], ids=["frozenW", "trainW"])
@pytest.mark.parametrize("shape", [((7,), 33, 40), ((2, 5), 129, 7), ((129,), 17, 129), ((1,), 1, 1)],
                         ids=["7x40->33", "2x5x7->129", "129x129->17", "1x1->1"])
def test_grads_fp32(shape, weight_trainable, lora_rank, bias, backend, seed):
    lead, N, K = shape
    inp = make_gated_inputs(seed, lead, N, K, bias=bias, lora_rank=lora_rank, lora_scale=0.5, device=backend.device)
    y, _ = check_gated_grads(inp, grad_names(inp, weight_trainable), backend, seed=seed)
    assert_matches(y, ref_forward(inp, torch.float64))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("pattern", GATE_PATTERNS)
def test_grads_gate_patterns(pattern, backend, seed):
    N, K = 31, 26
    inp = make_gated_inputs(seed, (3, 6), N, K, lora_rank=2, lora_scale=0.5, device=backend.device)
    gen = torch.Generator().manual_seed(seed + 5)
    inp.row_gate, inp.col_gate = pattern_gates(pattern, N, K, gen, torch.float32, backend.device)
    _, g = check_gated_grads(inp, grad_names(inp), backend, seed=seed)
    if pattern == "all_zero":
        for n, t in g.items():
            assert (t == 0).all(), f"all gates zero: grad {n} not exactly 0"


@pytest.mark.parametrize("backend", backend_params())
def test_zero_gate_gradient_semantics(backend, seed):
    """The removed-row/column contract, with non-trivial values everywhere else."""
    N, K = 48, 40
    inp = make_gated_inputs(seed, (2, 16), N, K, lora_rank=4, lora_scale=0.5, row_sparsity=0.5, col_sparsity=0.5,
                            device=backend.device)
    assert (~inp.row_on).any() and (~inp.col_on).any() and inp.row_on.any() and inp.col_on.any()
    _, g = check_gated_grads(inp, grad_names(inp), backend, seed=seed)
    # ... and the active parts really carry gradient (the zeros checked are not trivially true).
    r_on, c_on = inp.row_on, inp.col_on
    assert (g["x"][..., c_on] != 0).any()
    assert (g["row_gate"][r_on] != 0).all()
    assert (g["col_gate"][c_on] != 0).all()
    assert (g["bias"][r_on] != 0).all()
    assert (g["weight"][r_on][:, c_on] != 0).all()
    assert (g["lora_a"][:, c_on] != 0).any()
    assert (g["lora_b"][r_on] != 0).any()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", GRAD_NAMES_ALL)
def test_grads_single_input(name, backend, seed):
    """Only one input requires grad (exercises the needs_input_grad paths of the backward)."""
    inp = make_gated_inputs(seed, (5, 4), 22, 19, lora_rank=3, lora_scale=0.5, device=backend.device)
    check_gated_grads(inp, [name], backend, seed=seed)


@pytest.mark.parametrize("backend", backend_params())
def test_no_input_requires_grad(backend, seed):
    inp = make_gated_inputs(seed, (5,), 12, 9, lora_rank=2, device=backend.device)
    assert not op_fn(backend)(inp).requires_grad
    with torch.no_grad():
        leaves = inp.map(lambda n, t: t.clone().requires_grad_())
        assert not op_fn(backend)(leaves).requires_grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("lead", [(), (3, 4), (0,)], ids=["1d", "3d", "empty"])
def test_grads_x_rank(lead, backend, seed):
    inp = make_gated_inputs(seed, lead, 16, 21, lora_rank=2, device=backend.device)
    check_gated_grads(inp, grad_names(inp), backend, seed=seed)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["transposed", "sliced_last", "expanded"])
def test_grads_noncontiguous(layout, backend, seed):
    """Non-contiguous x and a GPT-2-style transposed weight, differentiated through the layouts."""
    dev = backend.device
    inp = make_gated_inputs(seed, (12,), 25, 18, lora_rank=2, device=dev)
    go = torch.randn(12, 25, generator=torch.Generator().manual_seed(seed)).to(dev)

    def run(x_leaf, w_base, b_leaf, dtype):
        # x enters in `layout`, the weight as the transpose of a (K, N) Conv1D storage.
        x_in = _x_layout(x_leaf, layout) if layout != "expanded" else x_leaf[:1].expand_as(x_leaf)
        others = [getattr(inp, n).to(dtype) for n in ("row_gate", "col_gate", "lora_a", "lora_b")]
        if dtype == torch.float64:
            y = fg_kernels.reference.gated_linear_ref(x_in, w_base.t(), b_leaf, *others, 1.0)
        else:
            y = backend.gated_linear(x_in, w_base.t(), b_leaf, *others[:2], lora_a=others[2], lora_b=others[3])
        return y, torch.autograd.grad(y, [x_leaf, w_base, b_leaf], go.to(dtype))

    leaves = lambda dt: (inp.x.detach().to(dt).clone().requires_grad_(),  # noqa: E731
                         inp.weight.detach().t().contiguous().to(dt).requires_grad_(),
                         inp.bias.detach().to(dt).clone().requires_grad_())
    y, (gx, gw, gb) = run(*leaves(torch.float32), torch.float32)
    y64, (tx, tw, tb) = run(*leaves(torch.float64), torch.float64)
    assert_matches(y.detach(), y64.detach())
    assert_matches(gx, tx, grad=True, what="grad x")
    assert_matches(gw, tw, grad=True, what="grad weight (K,N) storage")
    assert_matches(gb, tb, grad=True, what="grad bias")


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.bfloat16, torch.float16)))
@pytest.mark.parametrize("gate_dtype", ["x", torch.float32], ids=["xgates", "fp32gates"])
@pytest.mark.parametrize("lora_rank", [0, 4], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("weight_trainable", [False, True], ids=["frozenW", "trainW"])
def test_grads_low_precision(weight_trainable, lora_rank, gate_dtype, backend, dtype, seed):
    """bf16/fp16 gradients: at most 2x the error of the reference's own autograd in that dtype."""
    inp = make_gated_inputs(seed, (3, 17), 33, 40, dtype=dtype, gate_dtype=dtype if gate_dtype == "x" else gate_dtype,
                            lora_rank=lora_rank, lora_scale=0.5, device=backend.device)
    check_gated_grads(inp, grad_names(inp, weight_trainable), backend, seed=seed)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("lead", [(), (6,), (2, 3)], ids=["1d", "2d", "3d"])
def test_output_is_not_a_view(lead, backend, seed):
    """The schema returns a fresh Tensor: it must not be a view of an internal buffer (autograd
    forbids in-place ops on views returned by a custom op's forward)."""
    inp = make_gated_inputs(seed, lead, 14, 10, device=backend.device)
    out = op_fn(backend)(inp)
    assert out._base is None and not out._is_view(), "gated_linear returned a view"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("row_gate_grad", [False, True], ids=["no_row_gate_grad", "row_gate_grad"])
@pytest.mark.parametrize("lead", [(), (6,), (2, 3)], ids=["1d", "2d", "3d"])
def test_inplace_on_output_then_backward(lead, row_gate_grad, backend, seed):
    """The output is a fresh tensor, not a view. Without row_gate's gradient it can be modified
    in place before backward like F.linear's (``h += residual``): right grads. With it, the op
    saves its output (d row_gate = sum(dy*y)/row_gate, no extra buffer) and, like torch.exp,
    an in-place change must raise autograd's clear version-check error, never a wrong gradient."""
    inp = make_gated_inputs(seed, lead, 14, 10, lora_rank=2, device=backend.device)
    names = grad_names(inp)
    if not row_gate_grad:
        names.remove("row_gate")
    go = torch.randn(*lead, 14, generator=torch.Generator().manual_seed(seed)).to(backend.device)

    def op_inplace(i):
        y = op_fn(backend)(i)
        y.mul_(3.0)
        return y

    if row_gate_grad:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            grads_of(op_inplace, inp, names, go)
        return
    y, g = grads_of(op_inplace, inp, names, go)
    ty, tg = grads_of(lambda i: ref_fn(i) * 3.0, upcast(inp), names, go.double())
    assert_matches(y, ty)
    for n in names:
        assert_matches(g[n], tg[n], grad=True, what=f"grad {n} after in-place op on the output")


@pytest.mark.parametrize("backend", backend_params())
def test_grads_accumulate_into_leaves(backend, seed):
    """.backward() twice accumulates (the op's grads are ordinary autograd grads)."""
    inp = make_gated_inputs(seed, (6,), 14, 10, lora_rank=2, device=backend.device)
    leaves = inp.map(lambda n, t: t.clone().requires_grad_())
    for _ in range(2):
        op_fn(backend)(leaves).sum().backward()
    ref_leaves = upcast(inp).map(lambda n, t: t.requires_grad_())
    ref_fn(ref_leaves).sum().backward()
    for n in GatedInputs.TENSOR_NAMES:
        t = getattr(leaves, n)
        assert_matches(t.grad, 2 * getattr(ref_leaves, n).grad, grad=True, what=f"accumulated grad {n}")


@pytest.mark.parametrize("shape", [dict(lora_rank=2), dict(bias=False, row_sparsity=0.0, col_sparsity=0.0)],
                         ids=["lora-gaps", "open-no-lora"])
@pytest.mark.parametrize("backend", backend_params())
def test_double_backward_is_refused_by_name(backend, shape, seed):
    """The backward kernels are differentiable once. create_graph=True still gives the exact first
    gradients (a gradient penalty's value is right); a second backward through them raises the
    contract's error instead of reading a second derivative of 0. Every gate open is its own case:
    the backward then writes dx by a GEMM into its output, which grad mode refuses."""
    from fg_kernels.contract import DOUBLE_BACKWARD_ERROR

    inp = make_gated_inputs(seed, (6,), 14, 10, device=backend.device, **shape)
    leaves = inp.map(lambda n, t: t.clone().requires_grad_())
    names = ("x", "row_gate", "col_gate")
    first = torch.autograd.grad(op_fn(backend)(leaves).square().sum(), [getattr(leaves, n) for n in names],
                                create_graph=True)
    ref_leaves = upcast(inp).map(lambda n, t: t.requires_grad_())
    want = torch.autograd.grad(ref_fn(ref_leaves).square().sum(), [getattr(ref_leaves, n) for n in names])
    for n, g, w in zip(names, first, want):
        assert g.requires_grad, f"grad {n} under create_graph must stay in the graph"
        assert_matches(g, w, grad=True, what=f"first grad {n} under create_graph")
    with pytest.raises(RuntimeError, match=re.escape(DOUBLE_BACKWARD_ERROR)):
        torch.autograd.grad(sum(g.square().sum() for g in first), [getattr(leaves, n) for n in names])


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


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("lora_rank", [0, 3], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_backward_op_output_mask(mask, lora_rank, backend, seed):
    """fg::gated_linear_backward called directly: a selected gradient equals the reference's, an
    unselected one (or a LoRA slot without LoRA) is an empty (0,) tensor of its slot's dtype, and
    the fake kernel gives every output's shape and dtype."""
    inp = make_gated_inputs(seed, (2, 5), 23, 19, lora_rank=lora_rank, lora_scale=0.5, device=backend.device)
    y = op_fn(backend)(inp)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(backend.device)
    plan = contract.backward_plan(mask, True, lora_rank > 0)
    args = (go, inp.x if plan.needs_x else None, inp.weight, inp.row_gate, inp.col_gate, inp.lora_a, inp.lora_b,
            0.5, y if mask[3] else None, list(mask))
    grads = backend.gated_linear_backward(*args)
    with FakeTensorMode() as mode:
        fake = backend.ops.gated_linear_backward(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                   for a in args])
    names = [n for n, m in zip(GRAD_NAMES_ALL, plan.mask) if m]
    truth = grads_of(ref_fn, upcast(inp), names, go.double())[1] if names else {}
    for i, (name, g) in enumerate(zip(GRAD_NAMES_ALL, grads)):
        assert g.shape == fake[i].shape and g.dtype == fake[i].dtype, f"{name}: {g.shape}/{g.dtype} vs fake"
        if not plan.mask[i]:
            slot_dtype = (inp.row_gate if name == "row_gate" else inp.col_gate if name == "col_gate" else inp.weight).dtype
            assert g.shape == (0,) and g.dtype == slot_dtype, f"{name}: not an empty tensor of dtype {slot_dtype}"
            continue
        assert g.dtype == getattr(inp, name).dtype and g.shape == getattr(inp, name).shape, name
        assert_matches(g, truth[name], grad=True, what=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# gradcheck (float64): the gates are parametrised by their non-zero entries, because a zero gate
# is a removed row/column whose gradient is 0 by contract (a finite difference would reopen it)
# ---------------------------------------------------------------------------------------------


def _gradcheck_cases():
    return {
        "sparse_lora": dict(lead=(2, 3), lora_rank=2, row_sparsity=0.4, col_sparsity=0.4),
        "dense_nobias": dict(lead=(4,), bias=False, row_sparsity=0.0, col_sparsity=0.0),
        "rows_only_x1d": dict(lead=(), lora_rank=1, row_sparsity=0.5, col_sparsity=0.0),
    }


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(_gradcheck_cases()))
def test_gradcheck_float64(case, backend, seed):
    kw = dict(_gradcheck_cases()[case])
    inp = make_gated_inputs(seed, kw.pop("lead"), 6, 5, dtype=torch.float64, device=backend.device, **kw)
    row_on, col_on = inp.row_on, inp.col_on

    def f(x, weight, bias, row_vals, col_vals, lora_a, lora_b):
        row_gate = torch.zeros_like(inp.row_gate).masked_scatter(row_on, row_vals)
        col_gate = torch.zeros_like(inp.col_gate).masked_scatter(col_on, col_vals)
        return backend.gated_linear(x, weight, bias, row_gate, col_gate, lora_a, lora_b, 0.5)

    args = [inp.x, inp.weight, inp.bias, inp.row_gate[row_on], inp.col_gate[col_on], inp.lora_a, inp.lora_b]
    args = [None if t is None else t.detach().clone().requires_grad_() for t in args]
    assert torch.autograd.gradcheck(f, args, fast_mode=backend.name == "triton")


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def _opcheck_cases():
    cases = []

    def add(name, kw, req):
        cases.append(pytest.param(kw, req, id=name))

    add("basic_grad", dict(seed=1, lead=(6,), N=11, K=9), ("x", "bias", "row_gate", "col_gate"))
    add("nobias_nograd", dict(seed=2, lead=(6,), N=11, K=9, bias=False), ())
    add("lora_frozenW", dict(seed=3, lead=(2, 5), N=13, K=8, lora_rank=4, lora_scale=0.5),
        ("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b"))
    add("zero_gates", dict(seed=4, lead=(5,), N=10, K=7, row_sparsity=1.0, col_sparsity=1.0, lora_rank=1),
        ("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b"))
    add("trainW_3d", dict(seed=5, lead=(2, 3), N=12, K=6, lora_rank=2), GRAD_NAMES_ALL)
    add("x_1d", dict(seed=6, lead=(), N=9, K=5), ("x", "weight", "row_gate", "col_gate"))
    add("lowp_fp32gates", dict(seed=7, lead=(4,), N=10, K=12, dtype="lowp", gate_dtype=torch.float32),
        ("x", "bias", "row_gate", "col_gate"))
    add("dense_gates", dict(seed=8, lead=(4,), N=10, K=12, gate_kind="ones"), ("x", "weight", "bias"))
    add("fp64", dict(seed=9, lead=(3,), N=7, K=6, dtype=torch.float64, lora_rank=2), GRAD_NAMES_ALL)
    return cases


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kw,req", _opcheck_cases())
def test_opcheck_gated_linear(kw, req, backend):
    kw = dict(kw)
    if kw.get("dtype") == "lowp":  # bfloat16 where the backend computes it, else float16
        kw["dtype"] = torch.bfloat16 if torch.bfloat16 in backend.value_dtypes else torch.float16
    inp = make_gated_inputs(kw.pop("seed"), kw.pop("lead"), kw.pop("N"), kw.pop("K"), device=backend.device, **kw)
    inp = inp.map(lambda n, t: t.clone().requires_grad_(n in req))
    kwargs = dict(lora_a=inp.lora_a, lora_b=inp.lora_b, lora_scale=inp.lora_scale)
    torch.library.opcheck(backend.ops.gated_linear.default, inp.args(), kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def _eager_and_compiled(fn_eager, fn_compiled, inp: GatedInputs, names, go):
    outs = []
    for fn in (fn_eager, fn_compiled):
        leaves = inp.map(lambda n, t: t.detach().clone().requires_grad_(n in names))
        y = fn(*[getattr(leaves, n) for n in GatedInputs.TENSOR_NAMES])
        gs = torch.autograd.grad(y, [getattr(leaves, n) for n in names], go)
        outs.append((y.detach(), gs))
    return outs


@pytest.mark.parametrize("backend", backend_params())
def test_compile_aot_eager_fwd_bwd_no_recompile_on_new_pattern(backend, seed):
    """fullgraph compile (aot_eager) of forward+backward; new gate patterns reuse the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def op(x, w, b, rg, cg, la, lb):
        return backend.gated_linear(x, w, b, rg, cg, la, lb, 0.5)

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(op, backend=cnt, fullgraph=True)
    N, K = 24, 20
    base = make_gated_inputs(seed, (4, 5), N, K, lora_rank=2, lora_scale=0.5, device=backend.device)
    names = list(GRAD_NAMES_ALL)
    go = torch.randn(4, 5, N, generator=torch.Generator().manual_seed(seed)).to(backend.device)
    gen = torch.Generator().manual_seed(seed + 11)
    for pattern in ["binary_sparse", "very_sparse", "all_zero", "all_one", "fractional_dense"]:
        inp = GatedInputs(*base.args(), lora_a=base.lora_a, lora_b=base.lora_b, lora_scale=0.5)
        inp.row_gate, inp.col_gate = pattern_gates(pattern, N, K, gen, torch.float32, backend.device)
        (ye, ge), (yc, gc) = _eager_and_compiled(op, fn, inp, names, go)
        torch.testing.assert_close(yc, ye)
        for n, a, b in zip(names, gc, ge):
            torch.testing.assert_close(a, b, msg=lambda m: f"[{pattern}] grad {n}: {m}")
        assert_zero_gate_grads(inp, dict(zip(names, gc)))
        assert cnt.frame_count == 1, f"gate pattern {pattern!r} triggered a recompile"
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", backend_params())
def test_compile_aot_eager_new_token_count(backend, seed):
    """A different number of tokens (dynamic M) still gives correct results."""
    def op(x, w, b, rg, cg, la, lb):
        return backend.gated_linear(x, w, b, rg, cg, la, lb, 0.5)

    torch._dynamo.reset()
    fn = torch.compile(op, backend="aot_eager", fullgraph=True)
    for M in (5, 9, 17):
        inp = make_gated_inputs(seed + M, (M,), 13, 11, lora_rank=2, lora_scale=0.5, device=backend.device)
        go = torch.randn(M, 13, generator=torch.Generator().manual_seed(M)).to(backend.device)
        (ye, ge), (yc, gc) = _eager_and_compiled(op, fn, inp, list(GRAD_NAMES_ALL), go)
        torch.testing.assert_close(yc, ye)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_compile_refuses_bad_shape_at_trace_time(backend, seed):
    """The fake kernel states the contract: a gate of the wrong length fails while tracing, with
    the kernel's own message naming the argument."""
    torch._dynamo.reset()
    inp = make_gated_inputs(seed, (4,), 9, 7, device=backend.device)
    fn = torch.compile(lambda x, w, b, rg, cg: backend.gated_linear(x, w, b, rg, cg), backend="aot_eager",
                       fullgraph=True)
    with pytest.raises(Exception, match=r"col_gate must be 1-D of length 7"):
        fn(inp.x, inp.weight, inp.bias, inp.row_gate, torch.ones(8, device=backend.device))
    torch._dynamo.reset()


@pytest.mark.slow  # ~35 s with a cold inductor cache on 2 cores (~3 s warm)
@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_compile_inductor_fwd_bwd(backend, seed):
    """Inductor (generates C++ around the opaque custom op), fullgraph, forward + backward."""
    torch._dynamo.reset()

    def f(x, w, b, rg, cg, la, lb):
        # Surrounding pointwise work so inductor really generates and fuses code around the op.
        y = backend.gated_linear(x * 2.0, w, b, rg, cg, la, lb, 0.5)
        return torch.relu(y) + 1.0

    fn = torch.compile(f, backend="inductor", fullgraph=True)
    N, K = 16, 12
    names = list(GRAD_NAMES_ALL)
    base = make_gated_inputs(seed, (6,), N, K, lora_rank=2)
    go = torch.randn(6, N, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 2)
    for pattern in ("binary_sparse", "very_sparse"):
        inp = GatedInputs(*base.args(), lora_a=base.lora_a, lora_b=base.lora_b)
        inp.row_gate, inp.col_gate = pattern_gates(pattern, N, K, gen, torch.float32)
        (ye, ge), (yc, gc) = _eager_and_compiled(f, fn, inp, names, go)
        torch.testing.assert_close(yc, ye)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(COMPILED))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(
    M=st.integers(1, 70),
    N=st.integers(1, 70),
    K=st.integers(1, 70),
    row_sparsity=st.floats(0.0, 1.0),
    col_sparsity=st.floats(0.0, 1.0),
    bias=st.booleans(),
    lora_rank=st.sampled_from([0, 1, 3]),
    weight_trainable=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_forward_backward(backend, M, N, K, row_sparsity, col_sparsity, bias, lora_rank,
                                   weight_trainable, seed):
    inp = make_gated_inputs(seed, (M,), N, K, bias=bias, lora_rank=lora_rank, lora_scale=0.5,
                            row_sparsity=row_sparsity, col_sparsity=col_sparsity, device=backend.device)
    check_gated_forward(inp, backend)
    check_gated_grads(inp, grad_names(inp, weight_trainable), backend, seed=seed)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.bfloat16, torch.float16)))
def test_autocast_runs_the_op_in_the_autocast_dtype(backend, dtype, seed):
    """Under torch.autocast, float32 x, weight, bias and LoRA run in the autocast dtype (the
    autocast rule of the fg ops); the float32 gates stay float32 and get float32 gradients."""
    inp = make_gated_inputs(seed, (7,), 24, 20, lora_rank=2, device=backend.device)  # all float32
    leaves = inp.map(lambda n, t: t.detach().clone().requires_grad_(n in ("row_gate", "lora_a")))
    with torch.autocast(backend.device, dtype=dtype):
        out = op_fn(backend)(leaves)
    assert out.dtype == dtype
    lowp = inp.map(lambda n, t: t if n in ("row_gate", "col_gate") else t.to(dtype))
    check_gated_forward(lowp, backend)  # the same op on inputs cast by hand ...
    torch.testing.assert_close(out, op_fn(backend)(lowp), rtol=0, atol=0)  # ... gives the same bits
    out.float().sum().backward()
    assert leaves.row_gate.grad.dtype == torch.float32 and leaves.lora_a.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("closed", [2, 10], ids=["few-closed", "many-closed"])
def test_non_finite_values_at_closed_rows_and_columns_stay_out(closed, backend):
    """A closed column contributes nothing and a closed row is exactly 0, also when what they would
    multiply is inf or NaN: x non-finite at a closed column, an inf column gate beside a closed row.
    With few closed the C++ op keeps the sets whole (zero gates folded into the block), with many it
    gathers them; both answer alike, and like every other backend."""
    dev = backend.device
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 30, generator=g).to(dev)
    w = torch.randn(20, 30, generator=g).to(dev)
    b = torch.randn(20, generator=g).to(dev)
    col_gate = torch.ones(30, device=dev)
    col_gate[:closed] = 0.0
    row_gate = torch.ones(20, device=dev)
    row_gate[3] = 0.0
    x_bad = x.clone()
    x_bad[:, 0] = float("nan")
    x_bad[2, 1] = float("inf")
    clean = backend.gated_linear(x, w, b, row_gate, col_gate)
    got = backend.gated_linear(x_bad, w, b, row_gate, col_gate)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, clean, rtol=1e-5, atol=1e-5)  # the whole and the gathered path round alike
    inf_gate = col_gate.clone()
    inf_gate[-1] = float("inf")
    y = backend.gated_linear(x, w, b, row_gate, inf_gate)
    assert torch.equal(y[:, 3], torch.zeros(6, device=dev))
    # the backward: no gradient through a closed row or column, whatever x and dy hold there
    dy = torch.randn(6, 20, generator=g).to(dev)
    dy_bad = dy.clone()
    dy_bad[:, 3] = float("nan")
    grads = []
    for xi, dyi in ((x, dy), (x_bad, dy_bad)):
        leaves = [t.clone().requires_grad_() for t in (xi, w, b, row_gate, col_gate)]
        backend.gated_linear(*leaves).backward(dyi)
        grads.append([t.grad for t in leaves])
    for name, clean_g, bad_g in zip(("x", "weight", "bias", "row_gate", "col_gate"), *grads):
        assert torch.isfinite(bad_g).all(), name
        torch.testing.assert_close(bad_g, clean_g, rtol=1e-5, atol=1e-5, msg=name)
