"""Bad input to ``fg::gated_linear``: a Python exception whose message names the argument.

Never a crash, never a silent wrong answer (DESIGN.md). Device mismatches need a second device
and are covered by the GPU tests only.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import BAD_INPUT_ERRORS, GatedInputs, make_gated_inputs, op_forward, ref_forward, rel_err

N, K = 12, 10

# Regex for "names x" (the word x, not the letter inside 'expected' or 'index').
X = r"\bx\b"
# Regex for "names x and dtype", in any order.
X_AND_DTYPE = r"(?=[\s\S]*\bx\b)(?=[\s\S]*dtype)"


@pytest.fixture
def inp(seed) -> GatedInputs:
    return make_gated_inputs(seed, (5,), N, K, lora_rank=2, lora_scale=0.5)


def _raises(inp: GatedInputs, pattern: str, **overrides):
    for k, v in overrides.items():
        setattr(inp, k, v)
    with pytest.raises(BAD_INPUT_ERRORS, match=pattern):
        op_forward(inp)


# ----- x ----------------------------------------------------------------------------------------


def test_x_scalar(inp):
    _raises(inp, X, x=torch.tensor(1.0))


@pytest.mark.parametrize("delta", [-1, 1])
def test_x_last_dim_not_K(inp, delta):
    _raises(inp, X, x=torch.randn(5, K + delta))


@pytest.mark.parametrize("bad", [torch.float64, torch.int32, torch.int64, torch.bool], ids=str)
def test_x_unsupported_dtype(inp, bad):
    """Every tensor in the unsupported dtype, so only 'x has an unsupported dtype' is wrong."""
    _raises(inp.map(lambda n, t: t.to(bad)), X_AND_DTYPE)


def test_x_float16(inp):
    """float16 is outside the contract (float32 / bfloat16). Either it is rejected naming x and
    dtype, or it is supported and then must be right (never a silent wrong answer)."""
    h = inp.map(lambda n, t: t.half())
    try:
        out = op_forward(h)
    except BAD_INPUT_ERRORS as e:
        assert re.search(X_AND_DTYPE, str(e)), f"float16 rejected without naming x and dtype: {e}"
        return
    assert out.dtype == torch.float16
    assert rel_err(out, ref_forward(h, torch.float64)) <= 1e-2
    assert (out[..., ~h.row_on] == 0).all()


# ----- weight -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(N * K,), (1, N, K), ()], ids=["1d", "3d", "0d"])
def test_weight_rank(inp, shape):
    _raises(inp, "weight", weight=torch.randn(shape))


def test_weight_dtype_mismatch(inp):
    _raises(inp, "weight", weight=inp.weight.bfloat16())


def test_weight_dtype_mismatch_bf16_x(seed):
    b = make_gated_inputs(seed, (5,), N, K, dtype=torch.bfloat16)
    _raises(b, "weight", weight=b.weight.float())


# ----- bias -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(N + 1,), (N - 1,), (1, N), ()], ids=["long", "short", "2d", "0d"])
def test_bias_shape(inp, shape):
    _raises(inp, "bias", bias=torch.randn(shape))


def test_bias_dtype(inp):
    _raises(inp, "bias", bias=inp.bias.bfloat16())


# ----- gates ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,n", [("row_gate", N), ("col_gate", K)])
@pytest.mark.parametrize("shape", ["long", "short", "2d", "0d", "empty"])
def test_gate_shape(inp, name, n, shape):
    bad = {
        "long": torch.ones(n + 1),
        "short": torch.ones(n - 1),
        "2d": torch.ones(1, n),
        "0d": torch.tensor(1.0),
        "empty": torch.ones(0),
    }[shape]
    _raises(inp, name, **{name: bad})


@pytest.mark.parametrize("name", ["row_gate", "col_gate"])
@pytest.mark.parametrize("bad", [torch.float64, torch.int64, torch.bool, torch.bfloat16], ids=str)
def test_gate_dtype_fp32_x(inp, name, bad):
    """With float32 x a gate must be float32: bfloat16 is neither x's dtype nor float32."""
    _raises(inp, name, **{name: getattr(inp, name).to(bad)})


@pytest.mark.parametrize("name", ["row_gate", "col_gate"])
@pytest.mark.parametrize("bad", [torch.float64, torch.float16], ids=str)
def test_gate_dtype_bf16_x(seed, name, bad):
    b = make_gated_inputs(seed, (5,), N, K, dtype=torch.bfloat16)
    _raises(b, name, **{name: getattr(b, name).to(bad)})


# ----- LoRA -------------------------------------------------------------------------------------


def test_lora_a_without_lora_b(inp):
    _raises(inp, "lora_b", lora_b=None)


def test_lora_b_without_lora_a(inp):
    _raises(inp, "lora_a", lora_a=None)


def test_lora_rank_mismatch(inp):
    _raises(inp, "lora_a|lora_b", lora_b=torch.randn(N, 3))


def test_lora_a_wrong_K(inp):
    _raises(inp, "lora_a", lora_a=torch.randn(2, K + 1))


def test_lora_b_wrong_N(inp):
    _raises(inp, "lora_b", lora_b=torch.randn(N + 1, 2))


@pytest.mark.parametrize("name", ["lora_a", "lora_b"])
@pytest.mark.parametrize("rank", [1, 3])
def test_lora_rank_of_tensor(inp, name, rank):
    t = getattr(inp, name)
    bad = t.flatten() if rank == 1 else t[None]
    _raises(inp, name, **{name: bad})


@pytest.mark.parametrize("name", ["lora_a", "lora_b"])
def test_lora_dtype(inp, name):
    _raises(inp, name, **{name: getattr(inp, name).bfloat16()})


# ----- errors also under autograd and never a crash on the fast paths ----------------------------


def test_error_with_requires_grad(inp):
    """Validation also runs when autograd is recording (the autograd wrapper must not bypass it)."""
    leaves = inp.map(lambda n, t: t.clone().requires_grad_())
    leaves.row_gate = torch.ones(N + 1, requires_grad=True)
    with pytest.raises(BAD_INPUT_ERRORS, match="row_gate"):
        op_forward(leaves)


@pytest.mark.parametrize("gates", ["zeros", "ones"])
def test_error_not_skipped_on_fast_paths(inp, gates):
    """All-zero (nothing to compute) and all-one (dense) gates still validate every argument."""
    inp.row_gate = getattr(torch, gates)(N)
    inp.col_gate = getattr(torch, gates)(K)
    _raises(inp, "bias", bias=torch.randn(N + 2))


# ----- devices (needs a second device: GPU only) -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
@pytest.mark.parametrize("name", ["weight", "bias", "row_gate", "col_gate", "lora_a", "lora_b"])
def test_device_mismatch(inp, name):
    """x on the GPU, one argument left on the CPU: an error naming that argument."""
    cuda = inp.map(lambda n, t: t.cuda() if n != name else t)
    with pytest.raises(BAD_INPUT_ERRORS, match=name):
        op_forward(cuda)


# ---------------------------------------------------------------------------------------------
# The backward op is callable directly: it validates its arguments too (never reads out of range)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"row_gate": torch.ones(6)}, "row_gate"),
        ({"col_gate": torch.ones(3)}, "col_gate"),
        ({"x": torch.randn(2, 4)}, "tokens"),
        ({"output": torch.randn(3, 4)}, "output"),
        ({"grad_out": torch.randn(3, 6)}, "grad_out"),
        ({"lora_a": torch.randn(2, 5), "lora_b": torch.randn(5, 2)}, "lora_a"),
    ],
)
def test_backward_op_rejects_mismatched_arguments(bad, fragment):
    args = {
        "grad_out": torch.randn(3, 5),
        "x": torch.randn(3, 4),
        "weight": torch.randn(5, 4),
        "row_gate": torch.ones(5),
        "col_gate": torch.ones(4),
        "lora_a": None,
        "lora_b": None,
        "output": torch.randn(3, 5),
    }
    args.update(bad)
    with pytest.raises((ValueError, TypeError, IndexError, RuntimeError), match=fragment):
        torch.ops.fg.gated_linear_backward(
            args["grad_out"], args["x"], args["weight"], args["row_gate"], args["col_gate"],
            args["lora_a"], args["lora_b"], 1.0, args["output"], [True] * 7,
        )
