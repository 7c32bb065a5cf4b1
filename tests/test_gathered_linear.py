"""``fg::gathered_linear`` (inference on a compacted layer) against the reference.

``y[..., row_idx] = x[..., col_idx] @ weight_c.T + bias_c``, every other output exactly 0;
``col_idx=None``: x is already compact; ``row_idx=None``: the output stays compact.
Indices are assumed unique (uniqueness is not part of what is tested). The op has autograd for
x, weight_c and bias_c (``fg_kernels.registration``), tested against the reference. Every test runs
on every backend (``conftest.BACKENDS``); bad input is in test_bad_input.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fg_kernels
from conftest import (
    BAD_INPUT_ERRORS,
    COMPILED,
    LOW_PRECISION,
    assert_matches,
    backend_dtype_params,
    backend_params,
    make_gated_inputs,
    op_fn,
    poisoned_memory,
    rel_err,
)
from fg_kernels.reference import gathered_linear_ref

LOWP = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class GatheredInputs:
    x: torch.Tensor
    weight_c: torch.Tensor
    bias_c: Optional[torch.Tensor]
    row_idx: Optional[torch.Tensor]
    col_idx: Optional[torch.Tensor]
    out_features: int

    def args(self):
        return (self.x, self.weight_c, self.bias_c, self.row_idx, self.col_idx, self.out_features)

    def with_(self, **kw) -> "GatheredInputs":
        d = dict(self.__dict__)
        d.update(kw)
        return GatheredInputs(**d)

    def abs64(self) -> "GatheredInputs":
        """float64 absolute values: the reference on them gives the cancellation-free scale."""
        c = lambda t: None if t is None else t.detach().double().abs()  # noqa: E731
        return self.with_(x=c(self.x), weight_c=c(self.weight_c), bias_c=c(self.bias_c))

    def cast(self, dtype) -> "GatheredInputs":
        c = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
        return self.with_(x=c(self.x), weight_c=c(self.weight_c), bias_c=c(self.bias_c))

    def to(self, device) -> "GatheredInputs":
        c = lambda t: None if t is None else t.to(device)  # noqa: E731
        return self.with_(**{n: c(getattr(self, n)) for n in ("x", "weight_c", "bias_c", "row_idx", "col_idx")})

    @property
    def device(self) -> torch.device:
        return self.x.device


def _index(spec: str, full: int, gen: torch.Generator) -> Optional[torch.Tensor]:
    """An index list over ``range(full)`` (unique entries)."""
    if spec == "none":
        return None
    if spec == "all":
        return torch.arange(full)
    if spec == "empty":
        return torch.empty(0, dtype=torch.int64)
    if spec == "single":
        return torch.tensor([full - 1])
    keep = torch.randperm(full, generator=gen)[: max(1, (3 * full) // 5)]
    if spec == "sorted":
        return keep.sort().values
    if spec == "unsorted":
        # Make sure it really is unsorted when there are at least two entries.
        keep = keep.sort(descending=True).values if keep.numel() > 1 else keep
        return keep[torch.randperm(keep.numel(), generator=gen)] if keep.numel() > 2 else keep
    raise ValueError(spec)


def make_gathered_inputs(seed, lead, n_full, k_full, *, row_spec="sorted", col_spec="sorted",
                         dtype=torch.float32, bias=True, device="cpu") -> GatheredInputs:
    gen = torch.Generator().manual_seed(seed)
    row_idx = _index(row_spec, n_full, gen)
    col_idx = _index(col_spec, k_full, gen)
    R = n_full if row_idx is None else row_idx.numel()
    C = k_full if col_idx is None else col_idx.numel()
    k_in = k_full if col_idx is not None else C
    x = torch.randn(*lead, k_in, generator=gen)
    w = torch.randn(R, C, generator=gen) / math.sqrt(max(C, 1))
    b = torch.rand(R, generator=gen) + 0.5 if bias else None
    out_features = n_full if row_idx is not None else R
    return GatheredInputs(x, w, b, row_idx, col_idx, out_features).cast(dtype).to(device)


def op(inp: GatheredInputs, backend) -> torch.Tensor:
    return backend.gathered_linear(*inp.args())


def ref(inp: GatheredInputs, dtype=None) -> torch.Tensor:
    src = inp if dtype is None else inp.cast(dtype)
    with torch.no_grad():
        return gathered_linear_ref(*src.args())


def _inactive_mask(inp: GatheredInputs) -> torch.Tensor:
    """True on output features outside row_idx."""
    mask = torch.ones(inp.out_features, dtype=torch.bool, device=inp.device)
    if inp.row_idx is None:
        mask[:] = False
    else:
        mask[inp.row_idx.long()] = False
    return mask


def check_forward(inp: GatheredInputs, backend, what="gathered_linear") -> torch.Tensor:
    out = op(inp, backend)
    assert out.dtype == inp.x.dtype
    assert out.shape == (*inp.x.shape[:-1], inp.out_features)
    truth = ref(inp, torch.float64)
    lowp = ref(inp) if inp.x.dtype in LOW_PRECISION else None
    assert_matches(out, truth, lowp_ref=lowp, what=what, scale=ref(inp.abs64()))
    assert (out[..., _inactive_mask(inp)] == 0).all(), f"{what}: outputs outside row_idx not exactly 0"
    return out


ROW_SPECS = ["none", "sorted", "unsorted", "empty", "all", "single"]
COL_SPECS = ["none", "sorted", "unsorted", "empty", "all", "single"]


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(LOWP))
@pytest.mark.parametrize("col_spec", COL_SPECS, ids=lambda s: f"col_{s}")
@pytest.mark.parametrize("row_spec", ROW_SPECS, ids=lambda s: f"row_{s}")
def test_forward_index_specs(row_spec, col_spec, backend, dtype, seed):
    inp = make_gathered_inputs(seed, (3, 7), 41, 37, row_spec=row_spec, col_spec=col_spec, dtype=dtype,
                               device=backend.device)
    out = check_forward(inp, backend, what=f"gathered_linear[{row_spec},{col_spec}]")
    if row_spec == "empty":
        assert (out == 0).all()
    if col_spec == "empty" and row_spec != "empty":
        # Nothing to multiply: active outputs are exactly the bias.
        rows = slice(None) if inp.row_idx is None else inp.row_idx
        assert torch.equal(out[..., rows], inp.bias_c.expand(*out.shape[:-1], -1))


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float32, torch.bfloat16), COMPILED))
@pytest.mark.parametrize("N,K", [(1, 1), (7, 129), (129, 7), (129, 129)], ids=lambda v: str(v))
@pytest.mark.parametrize("M", [1, 7, 129], ids=lambda v: f"M{v}")
def test_forward_sizes(M, N, K, backend, dtype, seed):
    inp = make_gathered_inputs(seed, (M,), N, K, row_spec="unsorted", col_spec="unsorted", dtype=dtype,
                               device=backend.device)
    check_forward(inp, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(), (1,), (2, 3, 4), (0,), (2, 0)], ids=["1d", "1x", "4d", "empty", "2x0"])
def test_forward_x_rank(lead, bias, backend, seed):
    inp = make_gathered_inputs(seed, lead, 17, 23, row_spec="unsorted", col_spec="sorted", bias=bias,
                               device=backend.device)
    out = check_forward(inp, backend)
    assert out.shape == (*lead, 17)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("col_spec", ["none", "unsorted"])
@pytest.mark.parametrize("layout", ["transposed", "sliced_last", "sliced_rows", "permuted_3d", "expanded"])
def test_forward_noncontiguous_x(layout, col_spec, backend, dtype, seed):
    lead = (4, 6) if layout in ("permuted_3d", "expanded") else (12,)
    inp = make_gathered_inputs(seed, lead, 30, 26, row_spec="unsorted", col_spec=col_spec, dtype=dtype,
                               device=backend.device)
    x = inp.x
    nan = dict(fill_value=float("nan"), dtype=dtype, device=x.device)
    if layout == "transposed":
        v = x.t().contiguous().t()
    elif layout == "sliced_last":
        big = torch.full((*x.shape[:-1], 2 * x.shape[-1]), **nan)
        big[..., ::2] = x
        v = big[..., ::2]
    elif layout == "sliced_rows":
        big = torch.full((2 * x.shape[0], x.shape[1]), **nan)
        big[::2] = x
        v = big[::2]
    elif layout == "permuted_3d":
        v = x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    else:  # expanded: stride 0 in a leading dim
        v = x[:1].expand_as(x)
    assert not v.is_contiguous()
    check_forward(inp.with_(x=v), backend, what=f"gathered_linear[x {layout}]")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["transposed", "row_sliced", "col_sliced"])
def test_forward_noncontiguous_weight(layout, backend, seed):
    inp = make_gathered_inputs(seed, (9,), 30, 26, row_spec="unsorted", col_spec="unsorted", device=backend.device)
    w = inp.weight_c
    R, C = w.shape
    nan = dict(fill_value=float("nan"), device=w.device)
    if layout == "transposed":
        v = w.t().contiguous().t()
    elif layout == "row_sliced":
        big = torch.full((2 * R, C), **nan)
        big[::2] = w
        v = big[::2]
    else:
        big = torch.full((R, 2 * C), **nan)
        big[:, ::2] = w
        v = big[:, ::2]
    assert torch.equal(v, w) and not v.is_contiguous()
    check_forward(inp.with_(weight_c=v), backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["row_idx", "col_idx", "bias_c"])
def test_forward_strided_small_args(name, backend, seed):
    """Strided index/bias tensors: the right answer or a clear error naming the argument."""
    inp = make_gathered_inputs(seed, (5,), 20, 24, row_spec="unsorted", col_spec="unsorted", device=backend.device)
    t = getattr(inp, name)
    big = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
    big[::2] = t
    inp = inp.with_(**{name: big[::2]})
    try:
        out = op(inp, backend)
    except BAD_INPUT_ERRORS as e:
        assert name in str(e), f"error for strided {name} does not name it: {e}"
        return
    assert_matches(out, ref(inp, torch.float64), what=f"strided {name}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("which", ["row_idx", "col_idx", "both"])
def test_int32_indices(which, backend, seed):
    """int32 indices: accepted with the same result as int64, or rejected naming the argument."""
    inp = make_gathered_inputs(seed, (6,), 25, 19, row_spec="unsorted", col_spec="unsorted", device=backend.device)
    expect = op(inp, backend)
    kw = {}
    if which in ("row_idx", "both"):
        kw["row_idx"] = inp.row_idx.int()
    if which in ("col_idx", "both"):
        kw["col_idx"] = inp.col_idx.int()
    try:
        out = op(inp.with_(**kw), backend)
    except BAD_INPUT_ERRORS as e:
        assert any(n in str(e) for n in kw), f"int32 index error names none of {list(kw)}: {e}"
        return
    assert torch.equal(out, expect)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,value,match", [
    ("row_idx", 25, r"row_idx values must lie in \[0, 25\)"),
    ("col_idx", -1, r"col_idx values must lie in \[0, 19\)"),
    ("row_idx", "repeat", r"row_idx values must be distinct"),
], ids=["row-high", "col-negative", "row-repeated"])
def test_index_list_written_after_a_call_is_checked_again(name, value, match, backend, seed):
    """Index values are checked once per tensor (no host sync per call on a GPU), and again after
    an in-place write: a layer whose indices went bad after a first call is refused, not run."""
    inp = make_gathered_inputs(seed, (4,), 25, 19, row_spec="unsorted", col_spec="unsorted", device=backend.device)
    op(inp, backend)
    op(inp, backend)
    idx = getattr(inp, name)
    idx[1] = idx[0] if value == "repeat" else value
    with pytest.raises(BAD_INPUT_ERRORS, match=match):
        op(inp, backend)


def _write_around_the_version_counter(idx: torch.Tensor, how: str, value: int) -> None:
    if how == ".data":
        idx.data[1] = value
    elif how == "numpy":
        idx.numpy()[1] = value
    else:
        torch.tensor([], dtype=idx.dtype).set_(idx.untyped_storage())[1] = value


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("how", [".data", "numpy", "storage"])
@pytest.mark.parametrize("name,value", [("col_idx", 10 ** 6), ("col_idx", 2 ** 40), ("row_idx", -1), ("row_idx", "repeat")])
def test_an_index_written_around_the_version_counter_never_reaches_a_kernel(name, value, how, backend, seed):
    """After a good call, a bad value written where the version counter cannot see it is refused (a
    backend that checks every call) or never read (the kernel reads the copy that was checked): the
    result is that of the checked indices, never an out-of-bounds read or a dropped row."""
    if backend.device != "cpu":
        pytest.skip("writes through numpy and host storage need CPU tensors")
    inp = make_gathered_inputs(seed, (4,), 25, 19, row_spec="unsorted", col_spec="unsorted", device=backend.device)
    want = op(inp, backend)
    idx = getattr(inp, name)
    _write_around_the_version_counter(idx, how, int(idx[0]) if value == "repeat" else value)
    try:
        got = op(inp, backend)
    except BAD_INPUT_ERRORS:
        return
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_a_huge_out_features_without_tokens_allocates_nothing(backend):
    """out_features is the caller's number: no backend sizes a buffer by it before a token needs
    one (the C++ distinctness check used a bitmap of out_features entries: std::bad_alloc at 2**40)."""
    x = torch.randn(0, 4, device=backend.device)
    w = torch.randn(2, 4, device=backend.device)
    y = backend.gathered_linear(x, w, None, torch.tensor([1, 0], device=backend.device), None, 2 ** 40)
    assert y.shape == (0, 2 ** 40)
    with pytest.raises(BAD_INPUT_ERRORS, match="row_idx values must be distinct"):
        backend.gathered_linear(x, w, None, torch.tensor([1, 1], device=backend.device), None, 2 ** 40)


@pytest.mark.parametrize("backend", backend_params())
def test_a_checked_index_buffer_can_be_swapped(backend, seed):
    """torch.utils.swap_tensors works on an index list a call has checked (a weak reference to it
    made swap_tensors refuse), and the swapped-in values are checked in turn."""
    inp = make_gathered_inputs(seed, (4,), 25, 19, row_spec="unsorted", col_spec="unsorted", device=backend.device)
    op(inp, backend)
    fresh = inp.col_idx.flip(0).clone()
    torch.utils.swap_tensors(inp.col_idx, fresh)
    torch.testing.assert_close(op(inp, backend), ref(inp), rtol=1e-4, atol=1e-4)
    bad = inp.col_idx.clone()
    bad[0] = 19
    torch.utils.swap_tensors(inp.col_idx, bad)
    with pytest.raises(BAD_INPUT_ERRORS, match=r"col_idx values must lie in \[0, 19\)"):
        op(inp, backend)


def test_index_values_read_once_per_tensor(monkeypatch):
    """The shared check reads an unchanged index list once; a new bound or a write reads it again."""
    from fg_kernels import contract

    reads = []
    real_unique = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **k: reads.append(1) or real_unique(*a, **k))
    idx = torch.tensor([3, 0, 2])
    for _ in range(3):
        contract.check_index_values(idx, 4, "row_idx", "out_features", distinct=True)
    assert len(reads) == 1
    contract.check_index_values(idx, 5, "row_idx", "out_features", distinct=True)
    assert len(reads) == 2
    idx[0] = 1
    contract.check_index_values(idx, 5, "row_idx", "out_features", distinct=True)
    assert len(reads) == 3
    with torch.inference_mode():
        frozen = torch.tensor([1, 0])
    for _ in range(2):
        contract.check_index_values(frozen, 2, "row_idx", "out_features", distinct=True)
    assert len(reads) == 5, "an inference tensor has no version counter: it is read at every call"


@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_python_wrapper_matches_op(backend, seed):
    inp = make_gathered_inputs(seed, (2, 5), 21, 18, row_spec="unsorted", col_spec="unsorted", device=backend.device)
    a = op(inp, backend)
    b = fg_kernels.gathered_linear(*inp.args())
    assert torch.equal(a, b)
    assert_matches(a, ref(inp, torch.float64))


@pytest.mark.parametrize("backend", backend_params())
def test_inputs_not_modified(backend, seed):
    inp = make_gathered_inputs(seed, (8,), 21, 18, row_spec="unsorted", col_spec="unsorted", device=backend.device)
    before = [None if t is None else t.clone() for t in inp.args()[:5]]
    op(inp, backend)
    for t, b in zip(inp.args()[:5], before):
        assert (t is None and b is None) or torch.equal(t, b)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(LOWP))
@pytest.mark.parametrize("lora_rank", [0, 3], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.9])
def test_compaction_matches_gated_linear(sparsity, lora_rank, backend, dtype, seed):
    """Folding the gates into a compact weight: gathered_linear == gated_linear (eval)."""
    g = make_gated_inputs(seed, (3, 8), 40, 33, dtype=torch.float32, lora_rank=lora_rank,
                          lora_scale=0.5, row_sparsity=sparsity, col_sparsity=sparsity, device=backend.device)
    R = g.row_on.nonzero().flatten()
    C = g.col_on.nonzero().flatten()
    w = g.weight
    if lora_rank:
        w = w + g.lora_scale * g.lora_b @ g.lora_a
    wc = (g.row_gate[:, None] * w * g.col_gate[None, :])[R][:, C]
    bc = (g.row_gate * g.bias)[R]
    x = g.x.to(dtype)
    gated = op_fn(backend)(g.map(lambda n, t: t.to(dtype)))
    gath = backend.gathered_linear(x, wc.to(dtype), bc.to(dtype), R, C, 40)
    assert (gath[..., ~g.row_on] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(gath, gated) <= tol, rel_err(gath, gated)
    # The compact chain: keep the output compact and scatter it by hand.
    compact = backend.gathered_linear(x[..., C], wc.to(dtype), bc.to(dtype), None, None, R.numel())
    assert compact.shape == (3, 8, R.numel())
    assert rel_err(compact, gath[..., R]) <= (1e-6 if dtype == torch.float32 else 2.0**-8)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("row_spec", ["sorted", "unsorted", "empty", "single"])
def test_poisoned_memory(row_spec, backend, dtype, seed):
    inp = make_gathered_inputs(seed, (3, 11), 40, 30, row_spec=row_spec, col_spec="unsorted", dtype=dtype,
                               device=backend.device)
    nbytes = 3 * 11 * 40 * inp.x.element_size()
    with poisoned_memory(nbytes, 3 * 11 * inp.weight_c.shape[0] * inp.x.element_size()):
        assert torch.empty(8, dtype=dtype, device=backend.device).isnan().all()
        out = op(inp, backend)
    assert not out.isnan().any(), "NaN in output: uninitialised memory leaked"
    assert (out[..., _inactive_mask(inp)] == 0).all()
    assert_matches(out, ref(inp, torch.float64), lowp_ref=None if dtype == torch.float32 else ref(inp))


# ---------------------------------------------------------------------------------------------
# Autograd (the op registers a backward for x, weight_c and bias_c)
# ---------------------------------------------------------------------------------------------


def _grads(fn, inp: GatheredInputs, names, go):
    leaves = {n: getattr(inp, n).detach().clone().requires_grad_() for n in names}
    y = fn(inp.with_(**leaves))
    return y.detach(), dict(zip(names, torch.autograd.grad(y, [leaves[n] for n in names], go.to(y.dtype),
                                                           materialize_grads=True)))


def _op_fn(backend):
    return lambda inp: op(inp, backend)


def _ref_fn(inp):
    return gathered_linear_ref(*inp.args())


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("names", [("x",), ("x", "weight_c", "bias_c"), ("weight_c",), ("bias_c",)],
                         ids=lambda t: "+".join(t))
@pytest.mark.parametrize("specs", [("sorted", "unsorted"), ("none", "none"), ("unsorted", "none"),
                                   ("none", "sorted"), ("empty", "sorted"), ("sorted", "empty"),
                                   ("empty", "empty")], ids=lambda t: f"{t[0]}-{t[1]}")
def test_grads(specs, names, backend, dtype, seed):
    inp = make_gathered_inputs(seed, (3, 9), 28, 22, row_spec=specs[0], col_spec=specs[1], dtype=dtype,
                               device=backend.device)
    go = torch.randn(3, 9, inp.out_features, generator=torch.Generator().manual_seed(seed)).to(inp.device, dtype)
    _, g = _grads(_op_fn(backend), inp, names, go)
    _, t = _grads(_ref_fn, inp.cast(torch.float64), names, go.double())
    lowp = _grads(_ref_fn, inp, names, go)[1] if dtype in LOW_PRECISION else None
    for n in names:
        assert g[n].dtype == dtype
        assert_matches(g[n], t[n], lowp_ref=None if lowp is None else lowp[n], grad=True, what=f"grad {n}")
    if "x" in names and inp.col_idx is not None:
        off = torch.ones(inp.x.shape[-1], dtype=torch.bool, device=inp.device)
        off[inp.col_idx] = False
        assert (g["x"][..., off] == 0).all(), "grad x: columns outside col_idx not exactly 0"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("row_spec", ["none", "unsorted"])
@pytest.mark.parametrize("lead", [(), (6,), (2, 3)], ids=["1d", "2d", "3d"])
def test_output_is_not_a_view_and_inplace_backward(lead, row_spec, backend, seed):
    """A fresh output, not a view of an internal buffer; in-place ops on it before backward work."""
    inp = make_gathered_inputs(seed, lead, 20, 16, row_spec=row_spec, col_spec="unsorted", device=backend.device)
    out = op(inp, backend)
    assert out._base is None and not out._is_view(), "gathered_linear returned a view"
    x = inp.x.clone().requires_grad_()
    y = op(inp.with_(x=x), backend)
    y.mul_(3.0)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(inp.device)
    (gx,) = torch.autograd.grad(y, [x], go)
    x64 = inp.x.double().requires_grad_()
    (tx,) = torch.autograd.grad(_ref_fn(inp.cast(torch.float64).with_(x=x64)) * 3.0, [x64], go.double())
    assert_matches(gx, tx, grad=True, what="grad x after in-place op on the output")


# ---------------------------------------------------------------------------------------------
# gradcheck (float64), opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("specs", [("unsorted", "sorted"), ("none", "none"), ("empty", "unsorted")],
                         ids=lambda t: f"{t[0]}-{t[1]}")
def test_gradcheck_float64(specs, backend, seed):
    inp = make_gathered_inputs(seed, (2, 3), 7, 6, row_spec=specs[0], col_spec=specs[1], dtype=torch.float64,
                               device=backend.device)
    args = [t.detach().clone().requires_grad_() for t in (inp.x, inp.weight_c, inp.bias_c)]

    def f(x, w, b):
        return backend.gathered_linear(x, w, b, inp.row_idx, inp.col_idx, inp.out_features)

    assert torch.autograd.gradcheck(f, args, fast_mode=backend.name == "triton")


def _opcheck_cases():
    c = []

    def add(name, req, *args, **kw):
        c.append(pytest.param(args, kw, req, id=name))

    add("sorted", (), 1, (5,), 12, 10)
    add("unsorted_nobias_3d", (), 2, (2, 3), 12, 10, row_spec="unsorted", col_spec="unsorted", bias=False)
    add("compact", (), 3, (4,), 12, 10, row_spec="none", col_spec="none")
    add("empty_rows", (), 4, (4,), 12, 10, row_spec="empty", col_spec="sorted")
    add("lowp", (), 5, (4,), 12, 10, dtype="lowp")
    add("grad", ("x", "weight_c", "bias_c"), 6, (4,), 12, 10, row_spec="unsorted")
    add("x1d_grad", ("x",), 7, (), 12, 10, col_spec="none")
    add("fp64_grad", ("x", "weight_c", "bias_c"), 8, (3,), 9, 7, row_spec="unsorted", dtype=torch.float64)
    return c


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("args,kw,req", _opcheck_cases())
def test_opcheck_gathered_linear(args, kw, req, backend):
    if kw.get("dtype") == "lowp":  # bfloat16 where the backend computes it, else float16
        kw = dict(kw, dtype=torch.bfloat16 if torch.bfloat16 in backend.value_dtypes else torch.float16)
    inp = make_gathered_inputs(*args, device=backend.device, **kw)
    inp = inp.with_(**{n: getattr(inp, n).clone().requires_grad_() for n in req})
    torch.library.opcheck(backend.ops.gathered_linear.default, inp.args())


@pytest.mark.parametrize("backend", backend_params())
def test_compile_aot_eager_new_indices_no_recompile(backend, seed):
    """fullgraph compile, forward + backward; new index sets of the same sizes reuse the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def gath(x, w, b, r, c):
        return backend.gathered_linear(x, w, b, r, c, 33)

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(gath, backend=cnt, fullgraph=True)
    dev = backend.device
    base = make_gathered_inputs(seed, (4, 5), 33, 27, device=dev)
    gen = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(4, 5, 33, generator=gen).to(dev)
    for i in range(4):
        r = torch.randperm(33, generator=gen)[: base.row_idx.numel()].to(dev)
        c = torch.randperm(27, generator=gen)[: base.col_idx.numel()].to(dev)
        inp = base.with_(row_idx=r, col_idx=c)
        res = []
        for f in (gath, fn):
            x = inp.x.clone().requires_grad_()
            w = inp.weight_c.clone().requires_grad_()
            y = f(x, w, inp.bias_c, r, c)
            res.append((y.detach(), torch.autograd.grad(y, [x, w], go)))
        (ye, ge), (yc, gc) = res
        torch.testing.assert_close(yc, ye)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)
        assert (yc[..., _inactive_mask(inp)] == 0).all()
        assert cnt.frame_count == 1, f"new index set #{i} triggered a recompile"
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_compile_inductor_forward(backend, seed):
    """Inference under inductor, fullgraph, with surrounding generated code; two index sets."""
    torch._dynamo.reset()

    def f(x, w, b, r, c):
        return torch.nn.functional.gelu(backend.gathered_linear(x + 1.0, w, b, r, c, 20)) * 2.0

    fn = torch.compile(f, backend="inductor", fullgraph=True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        inp = make_gathered_inputs(int(torch.randint(0, 2**30, (1,), generator=gen)), (6,), 20, 14,
                                   row_spec="unsorted", col_spec="unsorted")
        args = inp.args()[:5]
        with torch.no_grad():
            torch.testing.assert_close(fn(*args), f(*args))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(COMPILED))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(
    M=st.integers(0, 40),
    n_full=st.integers(1, 70),
    k_full=st.integers(1, 70),
    row_frac=st.floats(0.0, 1.0),
    col_frac=st.floats(0.0, 1.0),
    row_none=st.booleans(),
    col_none=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_forward_backward(backend, M, n_full, k_full, row_frac, col_frac, row_none, col_none, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    R = torch.randperm(n_full, generator=gen)[: round(row_frac * n_full)]
    C = torch.randperm(k_full, generator=gen)[: round(col_frac * k_full)]
    x = torch.randn(M, k_full if not col_none else C.numel(), generator=gen)
    w = torch.randn(R.numel(), C.numel(), generator=gen)
    b = torch.randn(R.numel(), generator=gen) if bias else None
    inp = GatheredInputs(x, w, b, None if row_none else R, None if col_none else C,
                         R.numel() if row_none else n_full).to(backend.device)
    check_forward(inp, backend)
    go = torch.randn(M, inp.out_features, generator=gen).to(backend.device)
    names = ("x", "weight_c") + (("bias_c",) if bias else ())
    _, g = _grads(_op_fn(backend), inp, names, go)
    _, t = _grads(_ref_fn, inp.cast(torch.float64), names, go.double())
    _, mag = _grads(_ref_fn, inp.abs64(), names, go.double().abs())
    for n in names:
        assert_matches(g[n], t[n], grad=True, what=f"grad {n}", scale=mag[n])
