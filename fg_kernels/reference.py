"""Pure-PyTorch reference of every ``fg`` op: the executable spec the tests compare against.

These functions are written for clarity, not speed: they compute densely with masks, exactly as
the reference FineGates code does, and then apply the skip semantics of docs/design.md explicitly
(inactive outputs are exactly 0; a zero gate gets no gradient and passes none on). They are
differentiable with plain autograd, so ``torch.autograd.grad`` through them gives the reference
gradients.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def gated_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    row_gate: Tensor,
    col_gate: Tensor,
    lora_a: Optional[Tensor] = None,
    lora_b: Optional[Tensor] = None,
    lora_scale: float = 1.0,
) -> Tensor:
    """``y = row_gate * ((x * col_gate) @ (weight + lora_scale * lora_b @ lora_a).T + bias)``.

    Zero gates are treated as removed rows/columns: their entries are masked *before* use, so no
    gradient reaches the weight, bias, LoRA factors, x or the gate itself through them (the op's
    contract; exact for FineGates because a zero gate is a clamp saturated at 0).
    """
    row_on = (row_gate != 0).to(x.dtype)
    col_on = (col_gate != 0).to(x.dtype)
    # Multiplying by the 0/1 masks cuts the gradient paths that the kernels skip.
    xg = x * col_on * col_gate.to(x.dtype)
    w = weight
    if lora_a is not None and lora_b is not None:
        w = w + lora_scale * (lora_b @ lora_a)
    w = w * row_on[:, None] * col_on[None, :]
    y = xg @ w.t()
    if bias is not None:
        y = y + bias * row_on
    return y * (row_gate.to(x.dtype) * row_on)


def gathered_linear_ref(
    x: Tensor,
    weight_c: Tensor,
    bias_c: Optional[Tensor],
    row_idx: Optional[Tensor],
    col_idx: Optional[Tensor],
    out_features: int,
) -> Tensor:
    """``y[..., row_idx] = x[..., col_idx] @ weight_c.T + bias_c``; other outputs are 0.

    ``col_idx=None``: x is already compact. ``row_idx=None``: the output stays compact
    (``weight_c.shape[0]`` wide) and ``out_features`` must equal that width.
    """
    xc = x if col_idx is None else x.index_select(-1, col_idx)
    yc = xc @ weight_c.t()
    if bias_c is not None:
        yc = yc + bias_c
    if row_idx is None:
        return yc
    y = yc.new_zeros(*x.shape[:-1], out_features)
    y[..., row_idx] = yc
    return y
