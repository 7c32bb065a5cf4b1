"""Bad input to every ``fg`` op, one table for every backend and for the fake kernels.

Each row starts from valid arguments, breaks one thing, and names the exception type and the words
the message must contain (the argument and what was expected). The same row must fail the same way
on the C++ CPU kernels, on the Triton kernels (interpreter on CPU, compiled on CUDA) and in the fake
kernels that torch.compile traces with (``fake``), whose ``torch._check`` calls state the contract of
``fg_kernels.contract``. Index *values* are data the fake kernels cannot see: those rows skip ``fake``.
Never a crash, never a silent wrong answer (docs/design.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import BACKEND_BY_NAME, ALL_DTYPES, DTYPE_IDS, backend_params

N, K = 12, 10


# --------------------------------------------------------------------------------------------
# Valid arguments of each op (CPU; moved to the runner's device at the call)
# --------------------------------------------------------------------------------------------


def gated_args(dtype=torch.float32) -> Dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return dict(x=t(5, K), weight=t(N, K) / math.sqrt(K), bias=t(N), row_gate=torch.rand(N, generator=gen).to(dtype),
                col_gate=torch.rand(K, generator=gen).to(dtype), lora_a=t(2, K), lora_b=t(N, 2), lora_scale=0.5)


def backward_args(dtype=torch.float32) -> Dict[str, object]:
    gen = torch.Generator().manual_seed(1)
    t = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return dict(grad_out=t(3, 5), x=t(3, 4), weight=t(5, 4), row_gate=torch.ones(5, dtype=dtype),
                col_gate=torch.ones(4, dtype=dtype), lora_a=None, lora_b=None, lora_scale=1.0, output=t(3, 5),
                output_mask=[True] * 7)


def gathered_args(dtype=torch.float32) -> Dict[str, object]:
    gen = torch.Generator().manual_seed(2)
    return dict(x=torch.randn(4, 16, generator=gen).to(dtype), weight_c=torch.randn(5, 6, generator=gen).to(dtype),
                bias_c=torch.randn(5, generator=gen).to(dtype), row_idx=torch.tensor([0, 3, 7, 11, 19]),
                col_idx=torch.tensor([1, 2, 5, 8, 13, 15]), out_features=20)


BUILD = {"gated_linear": gated_args, "gated_linear_backward": backward_args, "gathered_linear": gathered_args}


def _with(**over) -> Callable[[dict], dict]:
    """A mutation that replaces arguments; a callable value gets the valid arguments."""
    def mutate(args: dict) -> dict:
        out = dict(args)
        for k, v in over.items():
            out[k] = v(args) if callable(v) else v
        return out

    return mutate


def _all_to(dtype) -> Callable[[dict], dict]:
    return lambda args: {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                         for k, v in args.items()}


@dataclass
class Case:
    op: str
    mutate: Callable[[dict], dict]
    error: type
    words: str  # regex the message must match
    data: bool = False  # the failure depends on index values (fake kernels cannot see them)


CASES = {
    # ----- gated_linear: x, weight, bias -----
    "fwd-x-scalar": Case("gated_linear", _with(x=torch.tensor(1.0)), ValueError, r"\bx must have at least 1 dimension"),
    "fwd-x-K+1": Case("gated_linear", _with(x=torch.randn(5, K + 1)), ValueError, r"\bx must have last dimension in_features = weight.shape\[1\] = 10"),
    "fwd-x-K-1": Case("gated_linear", _with(x=torch.randn(5, K - 1)), ValueError, r"\bx must have last dimension in_features"),
    "fwd-x-int64": Case("gated_linear", _all_to(torch.int64), TypeError, r"\bx must have dtype float32, float16, bfloat16 or float64"),
    "fwd-x-bool": Case("gated_linear", _all_to(torch.bool), TypeError, r"\bx must have dtype float32, float16, bfloat16 or float64"),
    "fwd-weight-1d": Case("gated_linear", _with(weight=torch.randn(N * K)), ValueError, r"weight must be 2-D \(out_features, in_features\)"),
    "fwd-weight-3d": Case("gated_linear", _with(weight=torch.randn(1, N, K)), ValueError, r"weight must be 2-D"),
    "fwd-weight-0d": Case("gated_linear", _with(weight=torch.tensor(1.0)), ValueError, r"weight must be 2-D"),
    "fwd-weight-dtype": Case("gated_linear", _with(weight=lambda a: a["weight"].bfloat16()), TypeError, r"weight must have the dtype of x"),
    "fwd-bias-long": Case("gated_linear", _with(bias=torch.randn(N + 1)), ValueError, r"bias must be 1-D of length 12 \(out_features"),
    "fwd-bias-short": Case("gated_linear", _with(bias=torch.randn(N - 1)), ValueError, r"bias must be 1-D of length 12"),
    "fwd-bias-2d": Case("gated_linear", _with(bias=torch.randn(1, N)), ValueError, r"bias must be 1-D of length 12"),
    "fwd-bias-0d": Case("gated_linear", _with(bias=torch.tensor(1.0)), ValueError, r"bias must be 1-D of length 12"),
    "fwd-bias-dtype": Case("gated_linear", _with(bias=lambda a: a["bias"].bfloat16()), TypeError, r"bias must have the dtype of x"),
    # ----- gated_linear: gates -----
    **{f"fwd-{g}-{shape}": Case("gated_linear", _with(**{g: t}), ValueError, rf"{g} must be 1-D of length {n}")
       for g, n in (("row_gate", N), ("col_gate", K))
       for shape, t in (("long", torch.ones(n + 1)), ("short", torch.ones(n - 1)), ("2d", torch.ones(1, n)),
                        ("0d", torch.tensor(1.0)), ("empty", torch.ones(0)))},
    **{f"fwd-{g}-{DTYPE_IDS.get(dt, str(dt))}": Case("gated_linear", _with(**{g: (lambda g_, dt_: lambda a: a[g_].to(dt_))(g, dt)}),
                                                     TypeError, rf"{g} must have the dtype of x .* or float32")
       for g in ("row_gate", "col_gate") for dt in (torch.float64, torch.int64, torch.bool, torch.bfloat16)},
    "fwd-row_gate-fp16-bf16x": Case("gated_linear", lambda a: dict(_all_to(torch.bfloat16)(a), row_gate=a["row_gate"].half()),
                                    TypeError, r"row_gate must have the dtype of x .* or float32"),
    # ----- gated_linear: LoRA -----
    "fwd-lora_a-alone": Case("gated_linear", _with(lora_b=None), ValueError, r"lora_a and lora_b must be given together \(got only lora_a\)"),
    "fwd-lora_b-alone": Case("gated_linear", _with(lora_a=None), ValueError, r"lora_a and lora_b must be given together \(got only lora_b\)"),
    "fwd-lora-rank-mismatch": Case("gated_linear", _with(lora_b=torch.randn(N, 3)), ValueError, r"lora_b must be 2-D \(out_features=12, rank=2\)"),
    "fwd-lora_a-K": Case("gated_linear", _with(lora_a=torch.randn(2, K + 1)), ValueError, r"lora_a must be 2-D \(rank, in_features=10\)"),
    "fwd-lora_b-N": Case("gated_linear", _with(lora_b=torch.randn(N + 1, 2)), ValueError, r"lora_b must be 2-D \(out_features=12"),
    "fwd-lora_a-1d": Case("gated_linear", _with(lora_a=lambda a: a["lora_a"].flatten()), ValueError, r"lora_a must be 2-D"),
    "fwd-lora_b-3d": Case("gated_linear", _with(lora_b=lambda a: a["lora_b"][None]), ValueError, r"lora_b must be 2-D"),
    "fwd-lora_a-dtype": Case("gated_linear", _with(lora_a=lambda a: a["lora_a"].bfloat16()), TypeError, r"lora_a must have the dtype of x"),
    "fwd-lora_b-dtype": Case("gated_linear", _with(lora_b=lambda a: a["lora_b"].bfloat16()), TypeError, r"lora_b must have the dtype of x"),
    # All-zero (nothing to compute) and all-one (dense) gates still validate every argument.
    "fwd-zero-gates-bad-bias": Case("gated_linear", _with(row_gate=torch.zeros(N), col_gate=torch.zeros(K), bias=torch.randn(N + 2)),
                                    ValueError, r"bias must be 1-D of length 12"),
    "fwd-one-gates-bad-bias": Case("gated_linear", _with(row_gate=torch.ones(N), col_gate=torch.ones(K), bias=torch.randn(N + 2)),
                                   ValueError, r"bias must be 1-D of length 12"),
    # ----- gated_linear_backward (callable directly: never a read past the end) -----
    "bwd-row_gate-long": Case("gated_linear_backward", _with(row_gate=torch.ones(6)), ValueError, r"row_gate must be 1-D of length 5"),
    "bwd-col_gate-short": Case("gated_linear_backward", _with(col_gate=torch.ones(3)), ValueError, r"col_gate must be 1-D of length 4"),
    "bwd-x-tokens": Case("gated_linear_backward", _with(x=torch.randn(2, 4)), ValueError, r"\bx must have shape \[3, 4\] \(the tokens of grad_out"),
    "bwd-x-K": Case("gated_linear_backward", _with(x=torch.randn(3, 5)), ValueError, r"\bx must have shape \[3, 4\]"),
    "bwd-output-shape": Case("gated_linear_backward", _with(output=torch.randn(3, 4)), ValueError, r"output must have the shape of grad_out"),
    "bwd-grad_out-N": Case("gated_linear_backward", _with(grad_out=torch.randn(3, 6)), ValueError, r"grad_out must have last dimension out_features = weight.shape\[0\] = 5"),
    "bwd-grad_out-scalar": Case("gated_linear_backward", _with(grad_out=torch.tensor(1.0)), ValueError, r"grad_out must have at least 1 dimension"),
    "bwd-grad_out-int": Case("gated_linear_backward", _with(grad_out=torch.ones(3, 5, dtype=torch.int64)), TypeError, r"grad_out must have dtype float32, float16, bfloat16 or float64"),
    "bwd-lora_a-K": Case("gated_linear_backward", _with(lora_a=torch.randn(2, 5), lora_b=torch.randn(5, 2)), ValueError, r"lora_a must be 2-D \(rank, in_features=4\)"),
    "bwd-x-missing": Case("gated_linear_backward", _with(x=None), ValueError, r"\bx is required for the gradients of col_gate, weight or LoRA"),
    "bwd-output-missing": Case("gated_linear_backward", _with(output=None), ValueError, r"output is required for the gradient of row_gate"),
    "bwd-x-dtype": Case("gated_linear_backward", _with(x=lambda a: a["x"].bfloat16()), TypeError, r"\bx must have the dtype of grad_out"),
    "bwd-output-dtype": Case("gated_linear_backward", _with(output=lambda a: a["output"].bfloat16()), TypeError, r"output must have the dtype of grad_out"),
    "bwd-weight-1d": Case("gated_linear_backward", _with(weight=torch.randn(20)), ValueError, r"weight must be 2-D"),
    "bwd-weight-dtype": Case("gated_linear_backward", _with(weight=lambda a: a["weight"].bfloat16()), TypeError, r"weight must have the dtype of grad_out"),
    # ----- gathered_linear -----
    "gath-row_idx-high": Case("gathered_linear", _with(row_idx=torch.tensor([0, 3, 7, 11, 20])), IndexError, r"row_idx values must lie in \[0, 20\) \(out_features\), got range \[0, 20\]", data=True),
    "gath-row_idx-negative": Case("gathered_linear", _with(row_idx=torch.tensor([-1, 3, 7, 11, 19])), IndexError, r"row_idx values must lie in \[0, 20\)", data=True),
    "gath-col_idx-high": Case("gathered_linear", _with(col_idx=torch.tensor([1, 2, 5, 8, 13, 16])), IndexError, r"col_idx values must lie in \[0, 16\) \(x.shape\[-1\]\)", data=True),
    "gath-col_idx-negative": Case("gathered_linear", _with(col_idx=torch.tensor([-3, 2, 5, 8, 13, 15])), IndexError, r"col_idx values must lie in \[0, 16\)", data=True),
    "gath-row_idx-repeated": Case("gathered_linear", _with(row_idx=torch.tensor([0, 3, 7, 3, 19])), ValueError, r"row_idx values must be distinct \(each output is written once\), got 3 more than once", data=True),
    "gath-out_features-below-row_idx": Case("gathered_linear", _with(out_features=19), IndexError, r"row_idx values must lie in \[0, 19\)", data=True),
    **{f"gath-{n}-{str(dt).split('.')[-1]}": Case("gathered_linear", _with(**{n: (lambda n_, dt_: lambda a: a[n_].to(dt_))(n, dt)}),
                                                  TypeError, rf"{n} must be an int64 or int32 index tensor")
       for n in ("row_idx", "col_idx") for dt in (torch.float32, torch.int16, torch.bool)},
    **{f"gath-{n}-2d": Case("gathered_linear", _with(**{n: (lambda n_: lambda a: a[n_][None, :])(n)}), ValueError, rf"{n} must be 1-D")
       for n in ("row_idx", "col_idx")},
    "gath-row_idx-short": Case("gathered_linear", _with(row_idx=lambda a: a["row_idx"][:-1]), ValueError, r"row_idx must have length weight_c.shape\[0\] = 5"),
    "gath-col_idx-short": Case("gathered_linear", _with(col_idx=lambda a: a["col_idx"][:-1]), ValueError, r"col_idx must have length weight_c.shape\[1\] = 6"),
    "gath-x-width-compact": Case("gathered_linear", _with(col_idx=None, x=torch.randn(4, 7)), ValueError, r"\bx must have last dimension weight_c.shape\[1\] = 6 when col_idx is None"),
    **{f"gath-weight_c-{r}d": Case("gathered_linear", _with(weight_c=(lambda r_: lambda a: {0: a["weight_c"][0, 0], 1: a["weight_c"][0], 3: a["weight_c"][None]}[r_])(r)),
                                   ValueError, r"weight_c must be 2-D \(active rows, active columns\)")
       for r in (0, 1, 3)},
    "gath-bias_c-long": Case("gathered_linear", _with(bias_c=torch.randn(6)), ValueError, r"bias_c must be 1-D of length 5 \(active rows"),
    "gath-bias_c-dtype": Case("gathered_linear", _with(bias_c=lambda a: a["bias_c"].bfloat16()), TypeError, r"bias_c must have the dtype of x"),
    "gath-weight_c-dtype": Case("gathered_linear", _with(weight_c=lambda a: a["weight_c"].bfloat16()), TypeError, r"weight_c must have the dtype of x"),
    "gath-out_features-negative": Case("gathered_linear", _with(out_features=-1), ValueError, r"out_features must be >= 0"),
    **{f"gath-out_features-compact{d:+d}": Case("gathered_linear", _with(row_idx=None, out_features=5 + d), ValueError,
                                               r"out_features must equal weight_c.shape\[0\] = 5 when row_idx is None")
       for d in (-1, 1)},
    "gath-x-int64": Case("gathered_linear", _all_to(torch.int64), TypeError, r"\bx must have dtype float32, float16, bfloat16 or float64"),
    "gath-x-scalar": Case("gathered_linear", _with(x=torch.tensor(1.0), col_idx=None), ValueError, r"\bx must have at least 1 dimension"),
}


# --------------------------------------------------------------------------------------------
# Runners: every backend, and the fake kernels
# --------------------------------------------------------------------------------------------


def _call(op: str, ops, args: dict, convert: Callable):
    a = {k: convert(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if op == "gated_linear":
        return ops.gated_linear(a["x"], a["weight"], a["bias"], a["row_gate"], a["col_gate"], a["lora_a"], a["lora_b"],
                                a["lora_scale"])
    if op == "gated_linear_backward":
        return ops.gated_linear_backward(a["grad_out"], a["x"], a["weight"], a["row_gate"], a["col_gate"], a["lora_a"],
                                         a["lora_b"], a["lora_scale"], a["output"], a["output_mask"])
    return ops.gathered_linear(a["x"], a["weight_c"], a["bias_c"], a["row_idx"], a["col_idx"], a["out_features"])


def run(runner: str, op: str, args: dict):
    """Calls ``op`` on ``args`` through a backend (by name) or the fake kernels (``fake``)."""
    if runner == "fake":
        with FakeTensorMode() as mode:
            return _call(op, torch.ops.fg, args, mode.from_tensor)
    backend = BACKEND_BY_NAME[runner]
    return _call(op, backend.ops, args, lambda t: t.to(backend.device))


RUNNERS = [*backend_params(), pytest.param("fake", id="fake")]


def _runner_name(runner) -> str:
    return runner if isinstance(runner, str) else runner.name


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_alike(case, runner):
    c = CASES[case]
    name = _runner_name(runner)
    if c.data and name == "fake":
        pytest.skip("index values are data: the fake kernels cannot check them")
    args = c.mutate(BUILD[c.op]())
    with pytest.raises(c.error, match=c.words):
        run(name, c.op, args)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("op", list(BUILD))
def test_every_float_dtype_is_accepted_alike(op, dtype, runner):
    """One dtype table on every device: float32, bfloat16, float16 and float64 (float32 gates too)."""
    args = BUILD[op](dtype)
    out = run(_runner_name(runner), op, args)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.dtype in (dtype, torch.float32) for o in outs), [o.dtype for o in outs]
    if op == "gated_linear":
        args = dict(args, row_gate=args["row_gate"].float(), col_gate=args["col_gate"].float())
        assert run(_runner_name(runner), op, args).dtype == dtype


@pytest.mark.parametrize("backend", backend_params())
def test_error_with_requires_grad(backend):
    """Validation also runs when autograd is recording (the autograd wrapper must not bypass it)."""
    args = {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in gated_args().items()}
    args["row_gate"] = torch.ones(N + 1, requires_grad=True)
    with pytest.raises(ValueError, match="row_gate must be 1-D of length 12"):
        run(backend.name, "gated_linear", args)


@pytest.mark.parametrize("backend", backend_params(("cuda",)))
@pytest.mark.parametrize("op,name", [("gated_linear", n) for n in ("weight", "bias", "row_gate", "col_gate", "lora_a", "lora_b")]
                         + [("gated_linear_backward", n) for n in ("x", "output", "weight")]
                         + [("gathered_linear", n) for n in ("weight_c", "bias_c", "row_idx", "col_idx")])
def test_device_mismatch(op, name, backend):
    """Everything on the GPU but one argument left on the CPU: an error naming that argument."""
    args = {k: v.to(backend.device) if isinstance(v, torch.Tensor) and k != name else v
            for k, v in BUILD[op]().items()}
    with pytest.raises(ValueError, match=rf"{name} must be on the device of"):
        _call(op, backend.ops, args, lambda t: t)
