"""``fg::gated_linear`` against the pure-PyTorch reference: values, gradients, opcheck, compile.

Every test draws fresh seeded random inputs (see ``conftest.make_gated_inputs``) and compares the
op with ``fg_kernels.reference.gated_linear_ref`` evaluated in float64 on the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fg_kernels
from conftest import (
    BAD_INPUT_ERRORS,
    GatedInputs,
    assert_matches,
    check_gated_forward,
    grads_of,
    magnitude,
    make_gate,
    make_gated_inputs,
    op_fn,
    op_forward,
    poisoned_memory,
    ref_fn,
    ref_forward,
    rel_err,
    upcast,
)

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]

GRAD_NAMES_ALL = ("x", "weight", "bias", "row_gate", "col_gate", "lora_a", "lora_b")


def _grad_names(inp: GatedInputs, weight_trainable: bool):
    names = [n for n in GRAD_NAMES_ALL if getattr(inp, n) is not None]
    if not weight_trainable:
        names.remove("weight")
    return names


def _check_grads(inp: GatedInputs, names, *, seed: int, what: str = "gated_linear"):
    """Gradients through the op vs through the reference (float64 truth; bf16 rule for bf16)."""
    n_out = inp.weight.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(*inp.x.shape[:-1], n_out, generator=gen).to(inp.x.dtype)
    y, g_op = grads_of(op_fn, inp, names, go)
    _, g_truth = grads_of(ref_fn, upcast(inp), names, go.double())
    _, g_mag = grads_of(ref_fn, magnitude(inp), names, go.double().abs())
    g_lowp = None
    if inp.x.dtype != torch.float32:
        _, g_lowp = grads_of(ref_fn, inp, names, go)
    for n in names:
        assert g_op[n].dtype == getattr(inp, n).dtype, f"grad of {n} has dtype {g_op[n].dtype}"
        assert_matches(
            g_op[n], g_truth[n], lowp_ref=None if g_lowp is None else g_lowp[n],
            grad=True, what=f"{what}: grad {n}", compute_dtype=inp.x.dtype, scale=g_mag[n],
        )
    return y, g_op


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


SIZES = [1, 7, 129]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("K", SIZES, ids=lambda v: f"K{v}")
@pytest.mark.parametrize("N", SIZES, ids=lambda v: f"N{v}")
@pytest.mark.parametrize("M", SIZES, ids=lambda v: f"M{v}")
def test_forward_size_grid(M, N, K, dtype, seed):
    inp = make_gated_inputs(seed, (M,), N, K, dtype=dtype, row_sparsity=0.4, col_sparsity=0.4)
    check_gated_forward(inp)


def _pattern_gates(name: str, N: int, K: int, gen: torch.Generator, dtype):
    """(row_gate, col_gate) for a named gate pattern."""
    if name == "all_zero":
        return torch.zeros(N, dtype=dtype), torch.zeros(K, dtype=dtype)
    if name == "rows_zero":
        return torch.zeros(N, dtype=dtype), make_gate(K, gen=gen, sparsity=0.3, dtype=dtype)
    if name == "cols_zero":
        return make_gate(N, gen=gen, sparsity=0.3, dtype=dtype), torch.zeros(K, dtype=dtype)
    if name == "all_one":
        return torch.ones(N, dtype=dtype), torch.ones(K, dtype=dtype)
    if name == "fractional_dense":  # every gate in (0, 1], none zero
        return make_gate(N, gen=gen, sparsity=0.0, dtype=dtype), make_gate(K, gen=gen, sparsity=0.0, dtype=dtype)
    if name == "binary_sparse":
        return (make_gate(N, gen=gen, sparsity=0.5, kind="binary", dtype=dtype),
                make_gate(K, gen=gen, sparsity=0.5, kind="binary", dtype=dtype))
    if name == "very_sparse":
        return make_gate(N, gen=gen, sparsity=0.9, dtype=dtype), make_gate(K, gen=gen, sparsity=0.9, dtype=dtype)
    if name == "one_active":
        r = torch.zeros(N, dtype=dtype)
        c = torch.zeros(K, dtype=dtype)
        r[N // 2] = 0.75
        c[K - 1] = 0.5
        return r, c
    if name == "first_last_only":  # boundaries of the index range
        r = torch.zeros(N, dtype=dtype)
        c = torch.zeros(K, dtype=dtype)
        r[[0, N - 1]] = 1.0
        c[[0, K - 1]] = 1.0
        return r, c
    if name == "negative_zero":  # -0.0 == 0: a removed row/column like +0.0
        r = make_gate(N, gen=gen, sparsity=0.4, dtype=dtype)
        c = make_gate(K, gen=gen, sparsity=0.4, dtype=dtype)
        r[r == 0] = -0.0
        c[c == 0] = -0.0
        return r, c
    if name == "tiny":  # small but normal floats: still active rows/columns
        r = make_gate(N, gen=gen, sparsity=0.3, dtype=torch.float32)
        c = make_gate(K, gen=gen, sparsity=0.3, dtype=torch.float32)
        r = r * 10.0 ** (-30 * torch.rand(N, generator=gen))
        c = c * 10.0 ** (-6 * torch.rand(K, generator=gen))
        return r.to(dtype), c.to(dtype)
    if name == "signed":  # the formula holds for any gate value, not only [0, 1]
        r = make_gate(N, gen=gen, sparsity=0.3, dtype=torch.float32) * (4 * torch.rand(N, generator=gen) - 2)
        c = make_gate(K, gen=gen, sparsity=0.3, dtype=torch.float32) * (4 * torch.rand(K, generator=gen) - 2)
        return r.to(dtype), c.to(dtype)
    raise ValueError(name)


GATE_PATTERNS = [
    "all_zero", "rows_zero", "cols_zero", "all_one", "fractional_dense", "binary_sparse",
    "very_sparse", "one_active", "first_last_only", "negative_zero", "tiny", "signed",
]


@pytest.mark.parametrize("lora_rank", [0, 4], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pattern", GATE_PATTERNS)
def test_forward_gate_patterns(pattern, dtype, lora_rank, seed):
    N, K = 37, 45
    inp = make_gated_inputs(seed, (3, 11), N, K, dtype=dtype, lora_rank=lora_rank, lora_scale=0.5)
    gen = torch.Generator().manual_seed(seed + 7)
    inp.row_gate, inp.col_gate = _pattern_gates(pattern, N, K, gen, dtype)
    out = check_gated_forward(inp, what=f"gated_linear[{pattern}]")
    if pattern in ("all_zero", "rows_zero"):
        assert (out == 0).all()
    if pattern == "cols_zero":
        # No input column survives: each active row is exactly row_gate * bias (one rounding).
        expect = (inp.row_gate.to(dtype) * inp.bias).expand_as(out)
        assert rel_err(out, expect) <= (1e-6 if dtype == torch.float32 else 2.0**-8)


def test_forward_dense_path_equals_linear(seed):
    """All gates 1 (the dense path): exactly what F.linear computes, up to fp32 rounding."""
    inp = make_gated_inputs(seed, (65,), 96, 80, gate_kind="ones")
    out = op_forward(inp)
    lin = torch.nn.functional.linear(inp.x, inp.weight, inp.bias)
    assert rel_err(out, lin) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "lead", [(), (1,), (6,), (2, 5), (2, 3, 4), (0,), (3, 0)],
    ids=lambda s: "x" + "x".join(map(str, s)) if s else "1d",
)
def test_forward_x_rank(lead, dtype, seed):
    """1-D, 2-D, 3-D and 4-D x, and empty leading dimensions."""
    inp = make_gated_inputs(seed, lead, 19, 23, dtype=dtype, lora_rank=2)
    out = check_gated_forward(inp)
    assert out.shape == (*lead, 19)
    if lead and math.prod(lead) > 0:
        # Leading dims are independent tokens: the same as calling on the flattened 2-D x.
        flat = op_forward(inp.map(lambda n, t: t.reshape(-1, t.shape[-1]) if n == "x" else t))
        assert torch.equal(out.reshape(-1, 19), flat) or rel_err(out.reshape(-1, 19), flat) <= 1e-6


def _x_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as 2-D/3-D ``x``, in a non-contiguous layout."""
    *lead, K = x.shape
    if layout == "transposed":  # stride (1, M)
        v = x.reshape(-1, K).t().contiguous().t().reshape(*lead, K)
    elif layout == "sliced_last":  # stride 2 along K
        w = torch.full((*lead, 2 * K), float("nan"), dtype=x.dtype)
        w[..., ::2] = x
        v = w[..., ::2]
    elif layout == "sliced_rows":
        w = torch.full((2 * lead[0], *lead[1:], K), float("nan"), dtype=x.dtype)
        w[::2] = x
        v = w[::2]
    elif layout == "narrow":  # storage offset + row padding
        w = torch.full((*lead, K + 5), float("nan"), dtype=x.dtype)
        w[..., 3:3 + K] = x
        v = w[..., 3:3 + K]
    elif layout == "permuted":  # 3-D stored as (K, B, T)
        v = x.permute(-1, *range(len(lead))).contiguous().permute(*range(1, len(lead) + 1), 0)
    elif layout == "expanded":  # stride 0 in a leading dim
        v = x[:1].expand_as(x)
        return v
    else:
        raise ValueError(layout)
    assert torch.equal(v, x)
    if layout != "permuted" or len(lead) > 1:
        assert not v.is_contiguous()
    return v


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(13,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("layout", ["transposed", "sliced_last", "sliced_rows", "narrow", "permuted", "expanded"])
def test_forward_noncontiguous_x(layout, lead, dtype, seed):
    inp = make_gated_inputs(seed, lead, 21, 30, dtype=dtype)
    inp.x = _x_layout(inp.x, layout)
    check_gated_forward(inp, what=f"gated_linear[x {layout}]")


def _weight_layout(w: torch.Tensor, layout: str) -> torch.Tensor:
    N, K = w.shape
    if layout == "conv1d_t":  # GPT-2 Conv1D keeps (K, N); the layer passes weight.t()
        v = w.t().contiguous().t()
    elif layout == "row_sliced":
        big = torch.full((2 * N, K), float("nan"), dtype=w.dtype)
        big[::2] = w
        v = big[::2]
    elif layout == "col_sliced":
        big = torch.full((N, 2 * K), float("nan"), dtype=w.dtype)
        big[:, ::2] = w
        v = big[:, ::2]
    elif layout == "offset_narrow":
        big = torch.full((N + 2, K + 3), float("nan"), dtype=w.dtype)
        big[1:1 + N, 2:2 + K] = w
        v = big[1:1 + N, 2:2 + K]
    else:
        raise ValueError(layout)
    assert torch.equal(v, w) and not v.is_contiguous()
    return v


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lora_rank", [0, 3], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("layout", ["conv1d_t", "row_sliced", "col_sliced", "offset_narrow"])
def test_forward_noncontiguous_weight(layout, lora_rank, dtype, seed):
    inp = make_gated_inputs(seed, (2, 9), 33, 26, dtype=dtype, lora_rank=lora_rank)
    inp.weight = _weight_layout(inp.weight, layout)
    check_gated_forward(inp, what=f"gated_linear[weight {layout}]")


@pytest.mark.parametrize("name", ["bias", "row_gate", "col_gate", "lora_a", "lora_b"])
def test_forward_noncontiguous_small_args(name, seed):
    """Strided bias/gates/LoRA: either the right answer or a clear error naming the argument
    (DESIGN: 'contiguity it cannot handle' is reported, never a silent wrong answer)."""
    inp = make_gated_inputs(seed, (9,), 20, 24, lora_rank=3)
    t = getattr(inp, name)
    big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
    big[..., ::2] = t
    setattr(inp, name, big[..., ::2])
    try:
        out = op_forward(inp)
    except BAD_INPUT_ERRORS as e:
        assert name in str(e), f"error for strided {name} does not name it: {e}"
        return
    assert_matches(out, ref_forward(inp, torch.float64), what=f"strided {name}")
    assert (out[..., ~inp.row_on] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5], ids=["dense", "sparse"])
def test_forward_bias(bias, sparsity, dtype, seed):
    inp = make_gated_inputs(seed, (17,), 40, 31, dtype=dtype, bias=bias,
                            row_sparsity=sparsity, col_sparsity=sparsity)
    out = check_gated_forward(inp)
    if bias:
        # The bias must actually be used (guards against a test that passes with bias ignored).
        inp_nb = GatedInputs(inp.x, inp.weight, None, inp.row_gate, inp.col_gate)
        diff = out.float() - op_forward(inp_nb).float()
        expect = (inp.row_gate.float() * inp.bias.float()).expand_as(diff)
        assert rel_err(diff, expect) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_inactive_rows_exact_zero_with_large_bias(seed):
    """Zero-gated rows are exactly 0 even where the bias is large (and the weight row is huge)."""
    inp = make_gated_inputs(seed, (4, 8), 30, 25, row_sparsity=0.5, col_sparsity=0.3)
    inp.bias = torch.full((30,), 1e4)
    inp.weight = inp.weight.clone()
    inp.weight[~inp.row_on] *= 1e6
    out = check_gated_forward(inp)
    assert (out[..., ~inp.row_on] == 0).all()
    assert (out[..., inp.row_on] != 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lora_scale", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("lora_rank", [1, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.5], ids=["dense", "sparse"])
def test_forward_lora(lora_rank, lora_scale, sparsity, dtype, seed):
    inp = make_gated_inputs(seed, (2, 7), 29, 34, dtype=dtype, lora_rank=lora_rank,
                            lora_scale=lora_scale, row_sparsity=sparsity, col_sparsity=sparsity)
    out = check_gated_forward(inp)
    # LoRA must contribute: compare against the op without LoRA.
    base = op_forward(GatedInputs(*inp.args()))
    if lora_scale == 0.0:
        assert rel_err(out, base) <= (1e-6 if dtype == torch.float32 else 2.0**-8)
    elif inp.row_on.any() and inp.col_on.any():
        assert rel_err(out, base) > 1e-2


def test_forward_lora_zero_b_equals_no_lora(seed):
    """Freshly initialised LoRA (B = 0) is the identity on the layer."""
    inp = make_gated_inputs(seed, (11,), 24, 18, lora_rank=4)
    inp.lora_b = torch.zeros_like(inp.lora_b)
    out = op_forward(inp)
    base = op_forward(GatedInputs(*inp.args()))
    assert rel_err(out, base) <= 1e-6


@pytest.mark.parametrize("lora_rank", [0, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.4, 1.0])
def test_forward_fp32_gates_bf16_x(sparsity, lora_rank, seed):
    """float32 gates with bfloat16 activations (gates kept in fp32 by the layer)."""
    inp = make_gated_inputs(seed, (3, 10), 27, 36, dtype=torch.bfloat16, gate_dtype=torch.float32,
                            row_sparsity=sparsity, col_sparsity=sparsity, lora_rank=lora_rank)
    # Gate values that bf16 cannot represent exactly: the op may use them in fp32 or round them.
    assert not torch.equal(inp.row_gate, inp.row_gate.bfloat16().float()) or sparsity == 1.0
    out = check_gated_forward(inp)
    assert out.dtype == torch.bfloat16


def test_python_wrapper_matches_op(seed):
    inp = make_gated_inputs(seed, (2, 6), 15, 22, lora_rank=2, lora_scale=0.5)
    a = torch.ops.fg.gated_linear(*inp.args(), **inp.kwargs())
    b = fg_kernels.gated_linear(*inp.args(), **inp.kwargs())
    c = torch.ops.fg.gated_linear.default(*inp.args(), inp.lora_a, inp.lora_b, inp.lora_scale)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert_matches(a, ref_forward(inp, torch.float64))


def test_inputs_not_modified(seed):
    inp = make_gated_inputs(seed, (9,), 20, 16, lora_rank=2)
    before = {n: t.clone() for n, t in inp.tensors().items()}
    op_forward(inp)
    for n, t in inp.tensors().items():
        assert torch.equal(t, before[n]), f"op modified its input {n}"


# ---------------------------------------------------------------------------------------------
# Output poisoning: the op allocates its outputs; uninitialised memory must never leak
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pattern", ["all_zero", "rows_zero", "cols_zero", "very_sparse", "binary_sparse", "all_one"])
def test_poisoned_memory_forward_and_backward(pattern, dtype, seed):
    N, K = 70, 50
    inp = make_gated_inputs(seed, (4, 33), N, K, dtype=dtype, lora_rank=2)
    gen = torch.Generator().manual_seed(seed + 3)
    inp.row_gate, inp.col_gate = _pattern_gates(pattern, N, K, gen, dtype)
    out_bytes = 4 * 33 * N * inp.x.element_size()
    names = _grad_names(inp, weight_trainable=True)
    with poisoned_memory(out_bytes, inp.x.numel() * inp.x.element_size(), inp.weight.numel() * 4):
        # Sanity of the poisoning itself: a fresh allocation really is NaN.
        assert torch.empty(N, dtype=dtype).isnan().all()
        out = op_forward(inp)
        go = torch.randn(*out.shape, generator=gen).to(dtype)
        _, g = grads_of(op_fn, inp, names, go)
    assert not out.isnan().any(), "NaN in output: uninitialised memory leaked"
    assert (out[..., ~inp.row_on] == 0).all()
    truth = ref_forward(inp, torch.float64)
    assert_matches(out, truth, lowp_ref=None if dtype == torch.float32 else ref_forward(inp))
    for n, t in g.items():
        assert not t.isnan().any(), f"NaN in grad {n}: uninitialised memory leaked"
    _assert_zero_gate_grads(inp, g)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _assert_zero_gate_grads(inp: GatedInputs, g):
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


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lora_rank", [0, 4], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("weight_trainable", [False, True], ids=["frozenW", "trainW"])
@pytest.mark.parametrize("shape", [((7,), 33, 40), ((2, 5), 129, 7), ((129,), 17, 129), ((1,), 1, 1)],
                         ids=["7x40->33", "2x5x7->129", "129x129->17", "1x1->1"])
def test_grads_fp32(shape, weight_trainable, lora_rank, bias, seed):
    lead, N, K = shape
    inp = make_gated_inputs(seed, lead, N, K, bias=bias, lora_rank=lora_rank, lora_scale=0.5,
                            row_sparsity=0.4, col_sparsity=0.4)
    names = _grad_names(inp, weight_trainable)
    y, g = _check_grads(inp, names, seed=seed)
    _assert_zero_gate_grads(inp, g)
    assert_matches(y, ref_forward(inp, torch.float64))


@pytest.mark.parametrize("pattern", ["all_zero", "rows_zero", "cols_zero", "all_one", "one_active", "tiny", "signed"])
def test_grads_gate_patterns(pattern, seed):
    N, K = 31, 26
    inp = make_gated_inputs(seed, (3, 6), N, K, lora_rank=2, lora_scale=0.5)
    gen = torch.Generator().manual_seed(seed + 5)
    inp.row_gate, inp.col_gate = _pattern_gates(pattern, N, K, gen, torch.float32)
    names = _grad_names(inp, weight_trainable=True)
    _, g = _check_grads(inp, names, seed=seed)
    _assert_zero_gate_grads(inp, g)
    if pattern == "all_zero":
        for n, t in g.items():
            assert (t == 0).all(), f"all gates zero: grad {n} not exactly 0"


def test_zero_gate_gradient_semantics(seed):
    """The removed-row/column contract, with non-trivial values everywhere else."""
    N, K = 48, 40
    inp = make_gated_inputs(seed, (2, 16), N, K, lora_rank=4, lora_scale=0.5,
                            row_sparsity=0.5, col_sparsity=0.5)
    assert (~inp.row_on).any() and (~inp.col_on).any() and inp.row_on.any() and inp.col_on.any()
    names = _grad_names(inp, weight_trainable=True)
    _, g = _check_grads(inp, names, seed=seed)
    _assert_zero_gate_grads(inp, g)
    # ... and the active parts really carry gradient (the zeros above are not trivially true).
    r_on, c_on = inp.row_on, inp.col_on
    assert (g["x"][..., c_on] != 0).any()
    assert (g["row_gate"][r_on] != 0).all()
    assert (g["col_gate"][c_on] != 0).all()
    assert (g["bias"][r_on] != 0).all()
    assert (g["weight"][r_on][:, c_on] != 0).all()
    assert (g["lora_a"][:, c_on] != 0).any()
    assert (g["lora_b"][r_on] != 0).any()


@pytest.mark.parametrize("name", GRAD_NAMES_ALL)
def test_grads_single_input(name, seed):
    """Only one input requires grad (exercises the needs_input_grad paths of the backward)."""
    inp = make_gated_inputs(seed, (5, 4), 22, 19, lora_rank=3, lora_scale=0.5)
    _, g = _check_grads(inp, [name], seed=seed)
    _assert_zero_gate_grads(inp, g)


def test_no_input_requires_grad(seed):
    inp = make_gated_inputs(seed, (5,), 12, 9, lora_rank=2)
    out = op_forward(inp)
    assert not out.requires_grad
    with torch.no_grad():
        leaves = inp.map(lambda n, t: t.clone().requires_grad_())
        assert not op_forward(leaves).requires_grad


@pytest.mark.parametrize("lead", [(), (3, 4), (0,)], ids=["1d", "3d", "empty"])
def test_grads_x_rank(lead, seed):
    inp = make_gated_inputs(seed, lead, 16, 21, lora_rank=2)
    _check_grads(inp, _grad_names(inp, True), seed=seed)


@pytest.mark.parametrize("layout", ["transposed", "sliced_last", "expanded"])
def test_grads_noncontiguous(layout, seed):
    """Non-contiguous x and a GPT-2-style transposed weight, differentiated."""
    inp = make_gated_inputs(seed, (12,), 25, 18, lora_rank=2)
    inp.x = _x_layout(inp.x, layout)
    inp.weight = _weight_layout(inp.weight, "conv1d_t")
    names = _grad_names(inp, weight_trainable=True)
    n_out = inp.weight.shape[0]
    go = torch.randn(12, n_out, generator=torch.Generator().manual_seed(seed))
    # Keep the layouts on the leaves (grads_of clones, which would make them contiguous).
    leaves = {n: t.detach().requires_grad_(n in names) if n != "x" else t for n, t in inp.tensors().items()}
    x_leaf = inp.x.detach().clone().requires_grad_()
    x_in = _x_layout(x_leaf, layout) if layout != "expanded" else x_leaf[:1].expand_as(x_leaf)
    w_base = inp.weight.detach().t().contiguous().requires_grad_()  # (K, N) storage, like Conv1D
    w_in = w_base.t()
    y = torch.ops.fg.gated_linear(x_in, w_in, leaves["bias"], leaves["row_gate"], leaves["col_gate"],
                                  lora_a=leaves["lora_a"], lora_b=leaves["lora_b"], lora_scale=1.0)
    gx, gw, gb = torch.autograd.grad(y, [x_leaf, w_base, leaves["bias"]], go)
    x64 = x_leaf.detach().double().requires_grad_()
    w64 = w_base.detach().double().requires_grad_()
    b64 = leaves["bias"].detach().double().requires_grad_()
    x64_in = _x_layout(x64, layout) if layout != "expanded" else x64[:1].expand_as(x64)
    y64 = fg_kernels.reference.gated_linear_ref(
        x64_in, w64.t(), b64, inp.row_gate.double(), inp.col_gate.double(),
        inp.lora_a.double(), inp.lora_b.double(), 1.0)
    tx, tw, tb = torch.autograd.grad(y64, [x64, w64, b64], go.double())
    assert_matches(y.detach(), y64.detach())
    assert_matches(gx, tx, grad=True, what="grad x")
    assert_matches(gw, tw, grad=True, what="grad weight (K,N) storage")
    assert_matches(gb, tb, grad=True, what="grad bias")


@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float32], ids=["bf16gates", "fp32gates"])
@pytest.mark.parametrize("lora_rank", [0, 4], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("weight_trainable", [False, True], ids=["frozenW", "trainW"])
def test_grads_bf16(weight_trainable, lora_rank, gate_dtype, seed):
    """bf16 gradients: at most 2x the error of the reference's own bf16 autograd (+ floor)."""
    inp = make_gated_inputs(seed, (3, 17), 33, 40, dtype=torch.bfloat16, gate_dtype=gate_dtype,
                            lora_rank=lora_rank, lora_scale=0.5)
    names = _grad_names(inp, weight_trainable)
    _, g = _check_grads(inp, names, seed=seed)
    _assert_zero_gate_grads(inp, g)


@pytest.mark.parametrize("lead", [(), (6,), (2, 3)], ids=["1d", "2d", "3d"])
def test_output_is_not_a_view(lead, seed):
    """The schema returns a fresh Tensor: it must not be a view of an internal buffer (autograd
    forbids in-place ops on views returned by a custom op's forward)."""
    inp = make_gated_inputs(seed, lead, 14, 10)
    out = op_forward(inp)
    assert out._base is None and not out._is_view(), "gated_linear returned a view"


@pytest.mark.parametrize("row_gate_grad", [False, True], ids=["no_row_gate_grad", "row_gate_grad"])
@pytest.mark.parametrize("lead", [(), (6,), (2, 3)], ids=["1d", "2d", "3d"])
def test_inplace_on_output_then_backward(lead, row_gate_grad, seed):
    """The output is a fresh tensor, not a view. Without row_gate's gradient it can be modified
    in place before backward like F.linear's (``h += residual``): right grads. With it, the op
    saves its output (d row_gate = sum(dy*y)/row_gate, no extra buffer) and, like torch.exp,
    an in-place change must raise autograd's clear version-check error, never a wrong gradient."""
    inp = make_gated_inputs(seed, lead, 14, 10, lora_rank=2)
    names = _grad_names(inp, weight_trainable=True)
    if not row_gate_grad:
        names.remove("row_gate")
    go = torch.randn(*lead, 14, generator=torch.Generator().manual_seed(seed))

    def op_inplace(i):
        y = op_fn(i)
        y.mul_(3.0)
        return y

    if row_gate_grad:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            grads_of(op_inplace, inp, names, go)
        return

    def ref_scaled(i):
        return ref_fn(i) * 3.0

    y, g = grads_of(op_inplace, inp, names, go)
    ty, tg = grads_of(ref_scaled, upcast(inp), names, go.double())
    assert_matches(y, ty)
    for n in names:
        assert_matches(g[n], tg[n], grad=True, what=f"grad {n} after in-place op on the output")


def test_grads_accumulate_into_leaves(seed):
    """.backward() twice accumulates (the op's grads are ordinary autograd grads)."""
    inp = make_gated_inputs(seed, (6,), 14, 10, lora_rank=2)
    leaves = inp.map(lambda n, t: t.clone().requires_grad_())
    for _ in range(2):
        op_forward(leaves).sum().backward()
    ref_leaves = upcast(inp).map(lambda n, t: t.requires_grad_())
    ref_fn(ref_leaves).sum().backward()
    for n in GatedInputs.TENSOR_NAMES:
        t = getattr(leaves, n)
        assert_matches(t.grad, 2 * getattr(ref_leaves, n).grad, grad=True, what=f"accumulated grad {n}")


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def _opcheck_cases():
    cases = []

    def add(name, inp, req):
        cases.append(pytest.param(inp, req, id=name))

    add("basic_grad", make_gated_inputs(1, (6,), 11, 9), ("x", "bias", "row_gate", "col_gate"))
    add("nobias_nograd", make_gated_inputs(2, (6,), 11, 9, bias=False), ())
    add("lora_frozenW", make_gated_inputs(3, (2, 5), 13, 8, lora_rank=4, lora_scale=0.5),
        ("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b"))
    add("zero_gates", make_gated_inputs(4, (5,), 10, 7, row_sparsity=1.0, col_sparsity=1.0, lora_rank=1),
        ("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b"))
    add("trainW_3d", make_gated_inputs(5, (2, 3), 12, 6, lora_rank=2), GRAD_NAMES_ALL)
    add("x_1d", make_gated_inputs(6, (), 9, 5), ("x", "weight", "row_gate", "col_gate"))
    add("bf16_fp32gates", make_gated_inputs(7, (4,), 10, 12, dtype=torch.bfloat16, gate_dtype=torch.float32),
        ("x", "bias", "row_gate", "col_gate"))
    add("dense_gates", make_gated_inputs(8, (4,), 10, 12, gate_kind="ones"), ("x", "weight", "bias"))
    return cases


@pytest.mark.parametrize("inp,req", _opcheck_cases())
def test_opcheck_gated_linear(inp: GatedInputs, req):
    inp = inp.map(lambda n, t: t.clone().requires_grad_(n in req))
    args = inp.args()
    kwargs = dict(lora_a=inp.lora_a, lora_b=inp.lora_b, lora_scale=inp.lora_scale)
    torch.library.opcheck(torch.ops.fg.gated_linear.default, args, kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def _gl(x, w, b, rg, cg, la, lb):
    return torch.ops.fg.gated_linear(x, w, b, rg, cg, la, lb, 0.5)


def _eager_and_compiled(fn_compiled, inp: GatedInputs, names, go):
    outs = []
    for fn in (_gl, fn_compiled):
        leaves = inp.map(lambda n, t: t.detach().clone().requires_grad_(n in names))
        y = fn(*[getattr(leaves, n) for n in GatedInputs.TENSOR_NAMES])
        gs = torch.autograd.grad(y, [getattr(leaves, n) for n in names], go)
        outs.append((y.detach(), gs))
    return outs


def test_compile_aot_eager_fwd_bwd_no_recompile_on_new_pattern(seed):
    """fullgraph compile (aot_eager) of forward+backward; new gate patterns reuse the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(_gl, backend=cnt, fullgraph=True)
    N, K = 24, 20
    base = make_gated_inputs(seed, (4, 5), N, K, lora_rank=2, lora_scale=0.5)
    names = list(GRAD_NAMES_ALL)
    go = torch.randn(4, 5, N, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 11)
    for i, pattern in enumerate(["binary_sparse", "very_sparse", "all_zero", "all_one", "fractional_dense"]):
        inp = GatedInputs(*base.args(), lora_a=base.lora_a, lora_b=base.lora_b, lora_scale=0.5)
        inp.row_gate, inp.col_gate = _pattern_gates(pattern, N, K, gen, torch.float32)
        (ye, ge), (yc, gc) = _eager_and_compiled(fn, inp, names, go)
        torch.testing.assert_close(yc, ye)
        for n, a, b in zip(names, gc, ge):
            torch.testing.assert_close(a, b, msg=lambda m: f"[{pattern}] grad {n}: {m}")
        _assert_zero_gate_grads(inp, dict(zip(names, gc)))
        assert cnt.frame_count == 1, f"gate pattern {pattern!r} triggered a recompile"
    torch._dynamo.reset()


def test_compile_aot_eager_new_token_count(seed):
    """A different number of tokens (dynamic M) still gives correct results."""
    torch._dynamo.reset()
    fn = torch.compile(_gl, backend="aot_eager", fullgraph=True)
    for M in (5, 9, 17):
        inp = make_gated_inputs(seed + M, (M,), 13, 11, lora_rank=2, lora_scale=0.5)
        go = torch.randn(M, 13, generator=torch.Generator().manual_seed(M))
        (ye, ge), (yc, gc) = _eager_and_compiled(fn, inp, list(GRAD_NAMES_ALL), go)
        torch.testing.assert_close(yc, ye)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


@pytest.mark.slow  # ~35 s with a cold inductor cache on 2 cores (~3 s warm)
def test_compile_inductor_fwd_bwd(seed):
    """Inductor (generates C++ around the opaque custom op), fullgraph, forward + backward."""
    torch._dynamo.reset()

    def f(x, w, b, rg, cg, la, lb):
        # Surrounding pointwise work so inductor really generates and fuses code around the op.
        y = torch.ops.fg.gated_linear(x * 2.0, w, b, rg, cg, la, lb, 0.5)
        return torch.relu(y) + 1.0

    fn = torch.compile(f, backend="inductor", fullgraph=True)
    N, K = 16, 12
    names = list(GRAD_NAMES_ALL)
    base = make_gated_inputs(seed, (6,), N, K, lora_rank=2)
    go = torch.randn(6, N, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 2)
    for pattern in ("binary_sparse", "very_sparse"):
        inp = GatedInputs(*base.args(), lora_a=base.lora_a, lora_b=base.lora_b)
        inp.row_gate, inp.col_gate = _pattern_gates(pattern, N, K, gen, torch.float32)
        res = []
        for fun in (f, fn):
            leaves = inp.map(lambda n, t: t.detach().clone().requires_grad_(n in names))
            y = fun(*[getattr(leaves, n) for n in GatedInputs.TENSOR_NAMES])
            res.append((y.detach(), torch.autograd.grad(y, [getattr(leaves, n) for n in names], go)))
        (ye, ge), (yc, gc) = res
        torch.testing.assert_close(yc, ye)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
def test_property_forward_backward(M, N, K, row_sparsity, col_sparsity, bias, lora_rank,
                                   weight_trainable, seed):
    inp = make_gated_inputs(seed, (M,), N, K, bias=bias, lora_rank=lora_rank, lora_scale=0.5,
                            row_sparsity=row_sparsity, col_sparsity=col_sparsity)
    check_gated_forward(inp)
    names = _grad_names(inp, weight_trainable)
    _, g = _check_grads(inp, names, seed=seed)
    _assert_zero_gate_grads(inp, g)
