"""The `fg` ops: a docstring'd functional wrapper per op, plus their fake and autograd kernels.

Schemas and the CPU kernels are defined in C++ (csrc/); here they get what every backend shares:
fake (meta) kernels so that torch.compile and torch.library.opcheck can trace them, and autograd
formulas whose backward is itself an `fg` op (gated_linear_backward) that skips removed rows and
columns just as the forward does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._library import library_loaded, require_library

__all__ = ["gated_linear", "gathered_linear"]


def gated_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    row_gate: Tensor,
    col_gate: Tensor,
    lora_a: Optional[Tensor] = None,
    lora_b: Optional[Tensor] = None,
    lora_scale: float = 1.0,
) -> Tensor:
    """FineGates linear layer: ``row_gate * ((x * col_gate) @ (weight + s * lora_b @ lora_a).T + bias)``.

    Only active rows ``R = {row_gate != 0}`` and active columns ``C = {col_gate != 0}`` are
    computed; the other outputs are exactly 0, and a zero gate receives and passes on no gradient
    (it is a removed row or column). With every gate non-zero this costs what ``F.linear`` costs.

    Args:
        x: ``(..., K)`` float32 or bfloat16.
        weight: ``(N, K)``, x's dtype; any strides (a transposed GPT-2 ``Conv1D`` weight works).
        bias: ``(N,)`` or None.
        row_gate, col_gate: ``(N,)`` and ``(K,)``, x's dtype or float32.
        lora_a, lora_b: optional LoRA factors ``(r, K)`` and ``(N, r)``, applied inside the gates.
        lora_scale: LoRA scaling ``s`` (alpha / r).
    Returns:
        ``(..., N)`` in x's dtype.
    """
    require_library()
    return torch.ops.fg.gated_linear(x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale)


def gathered_linear(
    x: Tensor,
    weight_c: Tensor,
    bias_c: Optional[Tensor],
    row_idx: Optional[Tensor],
    col_idx: Optional[Tensor],
    out_features: int,
) -> Tensor:
    """Inference on a compacted layer: ``y[..., row_idx] = x[..., col_idx] @ weight_c.T + bias_c``.

    Other outputs are 0. ``col_idx=None`` means x is already compact (``x.shape[-1] ==
    weight_c.shape[1]``); ``row_idx=None`` keeps the output compact, ``weight_c.shape[0]`` wide
    (then ``out_features`` must equal that width), for a next layer that consumes it compact.
    Indices are int64 (or int32) and must lie in range; they need not be sorted.
    """
    require_library()
    return torch.ops.fg.gathered_linear(x, weight_c, bias_c, row_idx, col_idx, out_features)


def gated_backward_plan(needs_input_grad, has_bias: bool, has_lora: bool):
    """Which gradients of gated_linear to compute (the backward op's ``output_mask`` over
    x, weight, bias, row_gate, col_gate, lora_a, lora_b) and whether x must be saved for them
    (col_gate, weight and LoRA gradients read x; the others do not). Shared by the autograd of
    the op and of the directly callable Triton function."""
    g = needs_input_grad
    mask = [g[0], g[1], has_bias and g[2], g[3], g[4], has_lora and g[5], has_lora and g[6]]
    need_x = mask[1] or mask[4] or mask[5] or mask[6]
    return mask, need_x


if library_loaded():

    @torch.library.register_fake("fg::gated_linear")
    def _gated_linear_fake(x, weight, bias, row_gate, col_gate, lora_a=None, lora_b=None, lora_scale=1.0):
        torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got shape {tuple(weight.shape)}")
        torch._check(
            x.shape[-1] == weight.shape[1],
            lambda: f"x must have last dimension in_features = {weight.shape[1]}, got {tuple(x.shape)}",
        )
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("fg::gated_linear_backward")
    def _gated_linear_backward_fake(
        grad_out, x, weight, row_gate, col_gate, lora_a, lora_b, lora_scale, output, output_mask
    ):
        n, k = weight.shape
        r = lora_a.shape[0] if lora_a is not None else 0
        shapes = [
            (*grad_out.shape[:-1], k),
            (n, k),
            (n,),
            (n,),
            (k,),
            (r, k),
            (n, r),
        ]
        like = [weight, weight, weight, row_gate, col_gate, weight, weight]
        return tuple(
            t.new_empty(s if m and (i < 5 or lora_a is not None) else (0,))
            for i, (t, s, m) in enumerate(zip(like, shapes, output_mask))
        )

    @torch.library.register_fake("fg::gathered_linear")
    def _gathered_linear_fake(x, weight_c, bias_c, row_idx, col_idx, out_features):
        torch._check(weight_c.dim() == 2, lambda: f"weight_c must be 2-D, got {tuple(weight_c.shape)}")
        return x.new_empty((*x.shape[:-1], out_features))

    def _gated_setup_context(ctx, inputs, output):
        x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale = inputs
        mask, need_x = gated_backward_plan(ctx.needs_input_grad, bias is not None, lora_a is not None)
        # Only what the requested gradients need: x for col_gate/weight/LoRA, the output for
        # row_gate (d row_gate = sum(dy * y) / row_gate, no extra pre-gate buffer is kept). Like
        # torch.exp or torch.sigmoid, the op then saves its output: modifying y in place before
        # backward raises autograd's "modified by an inplace operation" error (never a wrong
        # gradient). Exact for any normal (non-subnormal) gate value.
        ctx.save_for_backward(
            x if need_x else None, weight, row_gate, col_gate, lora_a, lora_b, output if mask[3] else None
        )
        ctx.mask = mask
        ctx.lora_scale = lora_scale

    def _gated_backward(ctx, grad):
        x, weight, row_gate, col_gate, lora_a, lora_b, output = ctx.saved_tensors
        grads = torch.ops.fg.gated_linear_backward(
            grad, x, weight, row_gate, col_gate, lora_a, lora_b, ctx.lora_scale, output, ctx.mask
        )
        return (*(gr if m else None for gr, m in zip(grads, ctx.mask)), None)

    torch.library.register_autograd(
        "fg::gated_linear", _gated_backward, setup_context=_gated_setup_context
    )

    def _gathered_setup_context(ctx, inputs, output):
        x, weight_c, bias_c, row_idx, col_idx, out_features = inputs
        g = ctx.needs_input_grad
        ctx.save_for_backward(x if g[1] else None, weight_c if g[0] else None, row_idx, col_idx)
        ctx.x_shape = x.shape
        ctx.has_bias = bias_c is not None

    def _gathered_backward(ctx, grad):
        """Inference op, so a plain torch-ops backward (not a tuned kernel) is enough."""
        x, weight_c, row_idx, col_idx = ctx.saved_tensors
        g = ctx.needs_input_grad
        tokens = math.prod(ctx.x_shape[:-1])  # explicit: reshape(-1, 0) of an empty tensor fails
        gc = grad if row_idx is None else grad.index_select(-1, row_idx)
        gc2 = gc.reshape(tokens, gc.shape[-1])
        dx = dw = db = None
        if g[0]:
            dxc = gc @ weight_c
            if col_idx is None:
                dx = dxc
            else:
                dx = dxc.new_zeros(ctx.x_shape).index_add_(-1, col_idx, dxc)
        if g[1]:
            xc = x if col_idx is None else x.index_select(-1, col_idx)
            dw = gc2.t() @ xc.reshape(tokens, xc.shape[-1])
        if g[2] and ctx.has_bias:
            db = gc2.sum(0)
        return dx, dw, db, None, None, None

    torch.library.register_autograd(
        "fg::gathered_linear", _gathered_backward, setup_context=_gathered_setup_context
    )


