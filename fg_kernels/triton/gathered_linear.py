"""Triton implementation of ``fg::gathered_linear`` (inference on a compacted layer):

    y[..., row_idx] = x[..., col_idx] @ weight_c.T + bias_c,   other outputs 0.

One launch of the gathered GEMM: x is read through ``col_idx`` inside the tile loads (no gathered
copy of x), the weight is already compact, the bias is the epilogue, and the output is either
compact (``row_idx=None``) or scattered through ``row_idx`` with the remaining columns written as
zeros by the same grid (the output positions are ordered "columns in row_idx first, then the
others", built on the device).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import gathered_linear_ref
from . import _launch as L
from ._checks import check_float, check_index, check_same_device, check_same_dtype, check_vector

__all__ = ["gathered_linear", "gathered_linear_forward"]


def _check_args(x, weight_c, bias_c, row_idx, col_idx, out_features):
    check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    if weight_c.dim() != 2:
        raise ValueError(
            f"weight_c must be 2-D (active rows, active columns), got shape {tuple(weight_c.shape)}"
        )
    check_same_dtype(weight_c, x, "weight_c")
    check_same_device(weight_c, x, "weight_c")
    nR, nC = weight_c.shape
    kx = x.shape[-1]
    if bias_c is not None:
        check_same_dtype(bias_c, x, "bias_c")
        check_same_device(bias_c, x, "bias_c")
        check_vector(bias_c, nR, "bias_c", "active rows = weight_c.shape[0]")
    if out_features < 0:
        raise ValueError(f"out_features must be >= 0, got {out_features}")
    if row_idx is not None:
        check_index(row_idx, out_features, "row_idx", "out_features", x)
        if row_idx.shape[0] != nR:
            raise ValueError(f"row_idx must have length weight_c.shape[0] = {nR}, got {row_idx.shape[0]}")
    elif out_features != nR:
        raise ValueError(
            f"out_features must equal weight_c.shape[0] = {nR} when row_idx is None (compact output), "
            f"got {out_features}"
        )
    if col_idx is not None:
        check_index(col_idx, kx, "col_idx", "x.shape[-1]", x)
        if col_idx.shape[0] != nC:
            raise ValueError(f"col_idx must have length weight_c.shape[1] = {nC}, got {col_idx.shape[0]}")
    elif kx != nC:
        raise ValueError(
            f"x must have last dimension weight_c.shape[1] = {nC} when col_idx is None (compact input), "
            f"got shape {tuple(x.shape)}"
        )


def gathered_linear_forward(
    x: Tensor,
    weight_c: Tensor,
    bias_c: Optional[Tensor],
    row_idx: Optional[Tensor],
    col_idx: Optional[Tensor],
    out_features: int,
) -> Tensor:
    """``fg::gathered_linear`` (no autograd)."""
    out_features = int(out_features)
    _check_args(x, weight_c, bias_c, row_idx, col_idx, out_features)
    nR, nC = weight_c.shape
    kx = x.shape[-1]
    M = int(torch.Size(x.shape[:-1]).numel())
    if M == 0 or nR == 0 or nC == 0 or out_features == 0:
        with torch.no_grad():
            y = gathered_linear_ref(x, weight_c, bias_c, row_idx, col_idx, out_features)
        return y.to(x.dtype).contiguous()
    dev = x.device
    x2 = x.reshape(-1, kx)
    y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=dev)  # final shape, not a view
    out = y.view(M, out_features)
    n_kw = {}
    if row_idx is not None:
        # inv[c] = row of weight_c that produces output column c, or -1; the order lists the
        # produced columns first (ascending), then the others, all on the device.
        inv = torch.full((out_features,), -1, dtype=torch.int32, device=dev)
        inv.index_put_((row_idx.to(torch.int64),), torch.arange(nR, dtype=torch.int32, device=dev))
        (meta,) = L.gate_meta(inv + 1)
        brow = inv.gather(0, meta.order.to(torch.int64)).contiguous()
        n_kw = dict(n_out=meta.order, n_brow=brow, n_cnt=meta.cnt)
    L.gmm(
        a=x2, b=weight_c, out=out, n_full=out_features, k_full=nC,
        k_idx=None if col_idx is None else col_idx.contiguous(),
        k_gather_a=col_idx is not None, k_gather_b=False,
        bias=None if bias_c is None else bias_c.contiguous(),
        **n_kw,
    )
    return y


class _GatheredLinearFunction(torch.autograd.Function):
    """Same backward as the op's (fg_kernels/ops.py): torch ops, it is an inference op."""

    @staticmethod
    def forward(ctx, x, weight_c, bias_c, row_idx, col_idx, out_features):
        out = gathered_linear_forward(x, weight_c, bias_c, row_idx, col_idx, out_features)
        g = ctx.needs_input_grad
        ctx.save_for_backward(x if g[1] else None, weight_c if g[0] else None, row_idx, col_idx)
        ctx.x_shape = x.shape
        ctx.has_bias = bias_c is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight_c, row_idx, col_idx = ctx.saved_tensors
        g = ctx.needs_input_grad
        gc = grad if row_idx is None else grad.index_select(-1, row_idx)
        dx = dw = db = None
        if g[0]:
            dxc = gc @ weight_c
            dx = dxc if col_idx is None else dxc.new_zeros(ctx.x_shape).index_add_(-1, col_idx, dxc)
        if g[1]:
            xc = x if col_idx is None else x.index_select(-1, col_idx)
            dw = gc.reshape(-1, gc.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1])
        if g[2] and ctx.has_bias:
            db = gc.reshape(-1, gc.shape[-1]).sum(0)
        return dx, dw, db, None, None, None


def gathered_linear(
    x: Tensor,
    weight_c: Tensor,
    bias_c: Optional[Tensor],
    row_idx: Optional[Tensor],
    col_idx: Optional[Tensor],
    out_features: int,
) -> Tensor:
    """Triton ``gathered_linear`` on tensors of any device, same arguments as
    ``torch.ops.fg.gathered_linear``; differentiable (torch-ops backward, like the op's)."""
    return _GatheredLinearFunction.apply(x, weight_c, bias_c, row_idx, col_idx, int(out_features))
