"""The contract of the ``fg`` ops, shared by every backend: dtypes, argument checks, the order of
the gradient slots and the backward plan.

The Triton entry points call these checks eagerly; the fake (meta) kernels call them on fake
tensors, so ``torch.compile`` refuses a bad shape at trace time with the kernel's own message.
The checks are written with ``torch._check_type`` / ``_check_value`` / ``_check_index``, which
raise TypeError / ValueError / IndexError eagerly and turn a symbolic condition into a runtime
assertion instead of a recompile guard. ``csrc/checks.h`` is the C++ mirror (same rules, same
exception types, the same words); ``tests/test_bad_input.py`` pins the two together.

Every backend accepts float32, float16, bfloat16 and float64 (float64 exists for
``torch.autograd.gradcheck`` and reference checks: it is slow, no tensor core runs it).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES", "INDEX_DTYPES", "GRAD_SLOTS", "BackwardPlan", "backward_plan",
    "check_gated_linear", "check_gated_linear_backward", "check_gathered_linear", "check_index_values",
    "backward_outputs", "token_count", "DOUBLE_BACKWARD_ERROR",
]

# Dtypes of x / weight / bias / LoRA (and of grad_out): the same on every device.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_NAMES = "float32, float16, bfloat16 or float64"
INDEX_DTYPES = (torch.int64, torch.int32)

# The inputs of fg::gated_linear that have gradients, in the order of the backward op's
# output_mask and of its 7 outputs.
GRAD_SLOTS = ("x", "weight", "bias", "row_gate", "col_gate", "lora_a", "lora_b")

# The backward kernels are differentiable once: a second backward through their gradients raises
# this (csrc/autograd.cpp carries the same text for the compiled registration).
DOUBLE_BACKWARD_ERROR = (
    "fg::gated_linear has no double backward (its backward is a fused kernel, differentiable once): "
    "for higher-order gradients use fg_kernels.reference.gated_linear_ref"
)


def _shape(t: Tensor) -> list:
    """A shape as the C++ checks print it: [3, 4]."""
    return list(t.shape)


def token_count(t: Tensor) -> int:
    """Number of rows of ``t`` seen as ``(tokens, features)`` (explicit: ``reshape(-1, 0)`` of an
    empty tensor is ambiguous)."""
    return math.prod(t.shape[:-1])


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _check_float(t: Tensor, name: str) -> None:
    torch._check_type(t.dtype in FLOAT_DTYPES, lambda: f"{name} must have dtype {_FLOAT_NAMES}, got {t.dtype}")


def _check_same_dtype(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    torch._check_type(
        t.dtype == ref.dtype, lambda: f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}"
    )


def _check_same_device(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    torch._check_value(
        t.device == ref.device, lambda: f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}"
    )


def _check_like(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    _check_same_dtype(t, ref, name, ref_name)
    _check_same_device(t, ref, name, ref_name)


def _check_vector(t: Tensor, n, name: str, what: str) -> None:
    msg = lambda: f"{name} must be 1-D of length {n} ({what}), got shape {_shape(t)}"  # noqa: E731
    torch._check_value(t.dim() == 1, msg)
    torch._check_value(t.shape[0] == n, msg)


def _check_shape(t: Tensor, want, msg) -> None:
    torch._check_value(t.dim() == len(want), msg)
    for a, b in zip(t.shape, want):
        torch._check_value(a == b, msg)


def _check_gate(g: Tensor, ref: Tensor, n, name: str, ref_name: str, what: str) -> None:
    """A gate may stay float32 under a lower- (or higher-) precision layer."""
    _check_same_device(g, ref, name, ref_name)
    torch._check_type(
        g.dtype == ref.dtype or g.dtype == torch.float32,
        lambda: f"{name} must have the dtype of {ref_name} ({ref.dtype}) or float32, got {g.dtype}",
    )
    _check_vector(g, n, name, what)


def _check_weight(weight: Tensor, ref: Tensor, ref_name: str) -> None:
    torch._check_value(
        weight.dim() == 2,
        lambda: f"weight must be 2-D (out_features, in_features), got shape {_shape(weight)}",
    )
    _check_like(weight, ref, "weight", ref_name)


def _check_gates_and_lora(
    ref: Tensor, ref_name: str, weight: Tensor, row_gate: Tensor, col_gate: Tensor,
    lora_a: Optional[Tensor], lora_b: Optional[Tensor],
) -> None:
    """Everything that is sized by the weight: both gates and the LoRA factors."""
    N, K = weight.shape
    _check_gate(row_gate, ref, N, "row_gate", ref_name, "out_features = weight.shape[0]")
    _check_gate(col_gate, ref, K, "col_gate", ref_name, "in_features = weight.shape[1]")
    torch._check_value(
        (lora_a is None) == (lora_b is None),
        lambda: f"lora_a and lora_b must be given together (got only {'lora_a' if lora_a is not None else 'lora_b'})",
    )
    if lora_a is None:
        return
    _check_like(lora_a, ref, "lora_a", ref_name)
    _check_like(lora_b, ref, "lora_b", ref_name)
    msg_a = lambda: f"lora_a must be 2-D (rank, in_features={K}), got shape {_shape(lora_a)}"  # noqa: E731
    torch._check_value(lora_a.dim() == 2, msg_a)
    torch._check_value(lora_a.shape[1] == K, msg_a)
    r = lora_a.shape[0]
    msg_b = lambda: f"lora_b must be 2-D (out_features={N}, rank={r}), got shape {_shape(lora_b)}"  # noqa: E731
    torch._check_value(lora_b.dim() == 2, msg_b)
    torch._check_value(lora_b.shape[0] == N, msg_b)
    torch._check_value(lora_b.shape[1] == r, msg_b)


def _check_index_list(idx: Tensor, x: Tensor, name: str, length, dim: int) -> None:
    """Device, dtype, rank and length (``weight_c.shape[dim]``) of an index list; its values are
    data, checked by the kernels."""
    _check_same_device(idx, x, name, "x")
    torch._check_type(idx.dtype in INDEX_DTYPES, lambda: f"{name} must be an int64 or int32 index tensor, got {idx.dtype}")
    torch._check_value(idx.dim() == 1, lambda: f"{name} must be 1-D, got shape {_shape(idx)}")
    torch._check_value(idx.shape[0] == length,
                       lambda: f"{name} must have length weight_c.shape[{dim}] = {length}, got {idx.shape[0]}")


# --------------------------------------------------------------------------------------------
# The checks of each op
# --------------------------------------------------------------------------------------------


def check_gated_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], row_gate: Tensor, col_gate: Tensor,
    lora_a: Optional[Tensor] = None, lora_b: Optional[Tensor] = None,
) -> None:
    """The arguments of ``fg::gated_linear``."""
    _check_float(x, "x")
    torch._check_value(x.dim() >= 1, lambda: "x must have at least 1 dimension (..., in_features), got a scalar")
    _check_weight(weight, x, "x")
    N, K = weight.shape
    torch._check_value(
        x.shape[-1] == K,
        lambda: f"x must have last dimension in_features = weight.shape[1] = {K}, got shape {_shape(x)}",
    )
    if bias is not None:
        _check_like(bias, x, "bias", "x")
        _check_vector(bias, N, "bias", "out_features = weight.shape[0]")
    _check_gates_and_lora(x, "x", weight, row_gate, col_gate, lora_a, lora_b)


def check_gated_linear_backward(
    grad_out: Tensor, x: Optional[Tensor], weight: Tensor, row_gate: Tensor, col_gate: Tensor,
    lora_a: Optional[Tensor], lora_b: Optional[Tensor], output: Optional[Tensor], output_mask: Sequence[bool],
) -> None:
    """The arguments of ``fg::gated_linear_backward`` (callable directly, so it checks as the
    forward does: a mismatch is an error, never a read past the end of a tensor)."""
    _check_float(grad_out, "grad_out")
    torch._check_value(
        grad_out.dim() >= 1, lambda: "grad_out must have at least 1 dimension (..., out_features), got a scalar"
    )
    _check_weight(weight, grad_out, "grad_out")
    N, K = weight.shape
    torch._check_value(
        grad_out.shape[-1] == N,
        lambda: f"grad_out must have last dimension out_features = weight.shape[0] = {N}, got shape {_shape(grad_out)}",
    )
    _check_gates_and_lora(grad_out, "grad_out", weight, row_gate, col_gate, lora_a, lora_b)
    torch._check_value(len(output_mask) == len(GRAD_SLOTS),
                       lambda: f"output_mask must have {len(GRAD_SLOTS)} entries, got {len(output_mask)}")
    plan = backward_plan(output_mask, True, lora_a is not None)
    torch._check_value(not plan.needs_x or x is not None,
                       lambda: "x is required for the gradients of col_gate, weight or LoRA")
    torch._check_value(not plan.needs_output or output is not None,
                       lambda: "output is required for the gradient of row_gate")
    if x is not None:
        _check_like(x, grad_out, "x", "grad_out")
        want = [*grad_out.shape[:-1], K]
        _check_shape(x, want, lambda: f"x must have shape {want} (the tokens of grad_out, in_features), got {_shape(x)}")
    if output is not None:
        _check_like(output, grad_out, "output", "grad_out")
        _check_shape(output, grad_out.shape,
                     lambda: f"output must have the shape of grad_out {_shape(grad_out)}, got {_shape(output)}")


def check_gathered_linear(
    x: Tensor, weight_c: Tensor, bias_c: Optional[Tensor], row_idx: Optional[Tensor], col_idx: Optional[Tensor],
    out_features: int,
) -> None:
    """The arguments of ``fg::gathered_linear``, all but the index values (data: see
    ``check_index_values``; the fake kernel cannot see them)."""
    _check_float(x, "x")
    torch._check_value(x.dim() >= 1, lambda: "x must have at least 1 dimension (..., in_features), got a scalar")
    torch._check_value(
        weight_c.dim() == 2,
        lambda: f"weight_c must be 2-D (active rows, active columns), got shape {_shape(weight_c)}",
    )
    _check_like(weight_c, x, "weight_c", "x")
    n_rows, n_cols = weight_c.shape
    if bias_c is not None:
        _check_like(bias_c, x, "bias_c", "x")
        _check_vector(bias_c, n_rows, "bias_c", "active rows = weight_c.shape[0]")
    torch._check_value(out_features >= 0, lambda: f"out_features must be >= 0, got {out_features}")
    if row_idx is not None:
        _check_index_list(row_idx, x, "row_idx", n_rows, 0)
    else:
        torch._check_value(
            out_features == n_rows,
            lambda: f"out_features must equal weight_c.shape[0] = {n_rows} when row_idx is None (compact output), "
            f"got {out_features}",
        )
    if col_idx is not None:
        _check_index_list(col_idx, x, "col_idx", n_cols, 1)
    else:
        torch._check_value(
            x.shape[-1] == n_cols,
            lambda: f"x must have last dimension weight_c.shape[1] = {n_cols} when col_idx is None (compact input), "
            f"got shape {_shape(x)}",
        )


# An index list whose values were checked carries the check on itself, under this attribute: the
# key says which values, bound and rule were checked, beside a private copy of them, which is what
# the kernels read. A compact layer's index buffers never change, so a GPU reads them back once per
# layer and never again (no host sync per call, and a warmed-up model can be captured in a CUDA
# graph). An attribute, not a weak reference: torch.utils.swap_tensors refuses a tensor that has one.
_CHECKED = "_fg_checked_index"


def _index_key(idx: Tensor, bound: int, distinct: bool) -> Optional[tuple]:
    """What a check of ``idx`` covered: its memory, its version (an in-place write bumps it),
    its length, the bound and whether distinct values were required. None for an inference
    tensor (it has no version counter: it is checked at every call)."""
    if idx.is_inference():
        return None
    return (idx.data_ptr(), idx._version, idx.numel(), idx.stride(), bound, distinct)


def check_index_values(idx: Tensor, bound: int, name: str, what: str, distinct: bool = False) -> Tensor:
    """Every value of an index list in ``[0, bound)`` and, with ``distinct`` (``row_idx``: each
    output written once, so the gradient of every output goes to one row), no value twice.

    Returns the index list the kernel must read: a private copy of the values that were checked.
    The values are read (one host sync on a GPU) the first time a tensor is seen; later calls with
    the same tensor, unchanged since (same memory and version), pass without reading and get the
    same copy. A write that escapes the version counter (``.data``, a numpy or storage alias)
    therefore never reaches a kernel unchecked: the kernel keeps reading the values that were
    checked, until the tensor is written through itself or replaced. Inference tensors are read
    at every call."""
    if idx.numel() == 0:
        return idx
    key = _index_key(idx, bound, distinct)
    cached = getattr(idx, _CHECKED, None) if key is not None else None
    if cached is not None and cached[0] == key:
        return cached[1]
    torch._check_value(
        not (idx.is_cuda and torch.cuda.is_current_stream_capturing()),
        lambda: f"{name} is seen for the first time inside a CUDA graph capture: its values must be checked on "
        "the host first; run the model once before capturing it",
    )
    private = idx.detach().clone(memory_format=torch.contiguous_format)
    lo, hi = (int(v) for v in torch.stack([private.min(), private.max()]).tolist())
    torch._check_index(lo >= 0 and hi < bound,
                       lambda: f"{name} values must lie in [0, {bound}) ({what}), got range [{lo}, {hi}]")
    if distinct:
        values, counts = torch.unique(private, return_counts=True)
        twice = values[counts > 1]
        torch._check_value(twice.numel() == 0, lambda: f"{name} values must be distinct (each output is written "
                           f"once), got {int(twice[0])} more than once")
    if key is not None:
        setattr(idx, _CHECKED, (key, private))
    return private


# --------------------------------------------------------------------------------------------
# Backward plan and shapes
# --------------------------------------------------------------------------------------------


class BackwardPlan:
    """Which gradients of gated_linear to compute (``mask``, over ``GRAD_SLOTS``) and what they
    read: x (for col_gate, weight and LoRA) and the output (for row_gate: d g_r = sum dy * y / g_r,
    so no pre-gate buffer is kept)."""

    __slots__ = ("mask", "needs_x", "needs_output")

    def __init__(self, mask: List[bool]):
        self.mask = mask
        self.needs_x = mask[1] or mask[4] or mask[5] or mask[6]
        self.needs_output = mask[3]


def backward_plan(needs_input_grad: Sequence[bool], has_bias: bool, has_lora: bool) -> BackwardPlan:
    """The plan from autograd's ``needs_input_grad`` (or a backward op's ``output_mask``); a bias
    or LoRA slot that has no tensor never gets a gradient."""
    g = [bool(v) for v in needs_input_grad[: len(GRAD_SLOTS)]]
    return BackwardPlan([g[0], g[1], has_bias and g[2], g[3], g[4], has_lora and g[5], has_lora and g[6]])


def backward_outputs(
    grad_out: Tensor, weight: Tensor, row_gate: Tensor, col_gate: Tensor, lora_a: Optional[Tensor],
    output_mask: Sequence[bool], computed: Optional[Dict[int, Tensor]] = None, missing: Callable = Tensor.new_empty,
) -> Tuple[Tensor, ...]:
    """The 7 outputs of ``fg::gated_linear_backward`` (over ``GRAD_SLOTS``): a selected gradient is
    ``computed[slot]`` when given, else a new tensor of its input's shape and dtype made by
    ``missing(weight, shape, dtype=...)`` (the fake kernel: uninitialised; a kernel: zeros, a sum
    over nothing); an unselected one (or a LoRA slot without LoRA) is an empty ``(0,)`` tensor of
    its slot's dtype. A float32 gate under a bf16 layer keeps a float32 gradient."""
    plan = backward_plan(output_mask, True, lora_a is not None)
    N, K = weight.shape
    r = lora_a.shape[0] if lora_a is not None else 0
    shapes = ((*grad_out.shape[:-1], K), (N, K), (N,), (N,), (K,), (r, K), (N, r))
    w = weight.dtype
    dtypes = (w, w, w, row_gate.dtype, col_gate.dtype, w, w)
    computed = computed or {}
    out = []
    for slot, (shape, dtype, selected) in enumerate(zip(shapes, dtypes, plan.mask)):
        if not selected:
            out.append(weight.new_empty((0,), dtype=dtype))
        elif slot in computed:
            out.append(computed[slot])
        else:
            out.append(missing(weight, shape, dtype=dtype))
    return tuple(out)
