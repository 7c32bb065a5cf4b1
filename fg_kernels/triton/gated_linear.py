"""Triton implementation of ``fg::gated_linear`` and ``fg::gated_linear_backward``.

Forward (one launch of the gathered GEMM, plus the gate metadata and, with LoRA, a thin pre-pass):

    R, C = active rows / columns as device-side gate orders (never a host sync)
    t    = lora_scale * (x * g_c)[:, C] @ lora_a[:, C].T                   (M, r)   LoRA pre-pass
    y[:, R] = g_r[R] * ((x[:, C] * g_c[C]) @ W[R][:, C].T + t @ lora_b[R].T + b[R])
    y[:, other] = 0                                                       (same launch: full grid)

The column gate multiplies the x tile right after it is loaded through the index list; bias, LoRA
term and row gate are the epilogue. Inactive outputs are written as zeros by the tiles whose
positions are all inactive (the grid covers every output column, active ones first), so there is
no separate memset pass and no host-known count.

Backward, with dh = dy * g_r on the active rows:

    db[R]   = sum_m dh[:, R]                 dgr[R] = sum_m dy * y / g_r   (column-sum kernel)
    u       = lora_scale * dh[:, R] @ lora_b[R]                          (M, r)   LoRA pre-pass
    dxc     = dh[:, R] @ W[R][:, C] + u @ lora_a[:, C]                   (gathered GEMM)
    dx[:, C] = dxc * g_c[C], dx[:, other] = 0;  dgc[C] = sum_m dxc * x[:, C]   (its epilogue)
    dW[R][:, C]   = dh[:, R].T @ (x[:, C] * g_c[C])      zeros elsewhere  (token-reduction GEMM)
    dlora_b[R]    = dh[:, R].T @ t                       zeros elsewhere
    dlora_a[:, C] = u.T @ (x[:, C] * g_c[C])             zeros elsewhere
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..ops import gated_backward_plan
from ..reference import gated_linear_ref
from . import _launch as L
from ._checks import check_gated_linear_args

__all__ = ["gated_linear", "gated_linear_forward", "gated_linear_backward"]


def _rows(t: Tensor, k: int) -> Tensor:
    """t as a 2-D (M, k) view when possible (the kernels take any strides)."""
    return t.reshape(-1, k)


def _lora_t(x2: Tensor, lora_a: Tensor, cmeta: L.GateMeta, lora_scale: float) -> Tensor:
    """t = lora_scale * (x * g_c)[:, C] @ lora_a[:, C].T, shape (M, r), x's dtype."""
    M, K = x2.shape
    r = lora_a.shape[0]
    t = torch.empty((M, r), dtype=x2.dtype, device=x2.device)
    L.gmm(
        a=x2, b=lora_a, out=t, n_full=r, k_full=K,
        k_idx=cmeta.order, k_vals=cmeta.vals, k_cnt=cmeta.cnt,
        k_gather_a=True, k_gather_b=True, k_ident_check=True, alpha=lora_scale,
    )
    return t


def gated_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    row_gate: Tensor,
    col_gate: Tensor,
    lora_a: Optional[Tensor] = None,
    lora_b: Optional[Tensor] = None,
    lora_scale: float = 1.0,
) -> Tensor:
    """``fg::gated_linear`` (no autograd): ``row_gate * ((x * col_gate) @ (W + s B A).T + bias)``
    on the active rows and columns only; inactive outputs are exactly 0."""
    check_gated_linear_args(x, weight, bias, row_gate, col_gate, lora_a, lora_b)
    N, K = weight.shape
    M = x.numel() // K if K > 0 else int(torch.Size(x.shape[:-1]).numel())
    r = lora_a.shape[0] if lora_a is not None else 0
    if M == 0 or N == 0 or K == 0:
        # Nothing to multiply: the reference is exact and cheap here.
        with torch.no_grad():
            y = gated_linear_ref(x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale)
        return y.to(x.dtype).contiguous()
    x2 = _rows(x, K)
    # Allocated in its final shape and returned as such: a returned view would make autograd
    # refuse in-place use of the op's output (as the CPU kernel does).
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    out = y.view(M, N)
    rmeta, cmeta = L.gate_meta(row_gate, col_gate)
    t = _lora_t(x2, lora_a, cmeta, lora_scale) if r > 0 else None
    L.gmm(
        a=x2, b=weight, out=out, n_full=N, k_full=K,
        k_idx=cmeta.order, k_vals=cmeta.vals, k_cnt=cmeta.cnt,
        k_gather_a=True, k_gather_b=True, k_ident_check=True,
        n_out=rmeta.order, n_brow=rmeta.order, n_vals=rmeta.vals, n_cnt=rmeta.cnt, n_ident_check=True,
        bias=None if bias is None else bias.contiguous(),
        lora_t=t, lora_b=lora_b if r > 0 else None,
    )
    return y


def _empty_like_fake(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _backward_reference(grad_out, x, weight, row_gate, col_gate, lora_a, lora_b, lora_scale, mask):
    """Degenerate shapes (no tokens, rows or columns): autograd through the reference."""
    N, K = weight.shape
    xs = (*grad_out.shape[:-1], K)
    if x is None:
        x = torch.zeros(xs, dtype=weight.dtype, device=weight.device)
    inputs = [x, weight, None, row_gate, col_gate, lora_a, lora_b]
    bias = torch.zeros(N, dtype=weight.dtype, device=weight.device)
    inputs[2] = bias
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        y = gated_linear_ref(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5], leaves[6], lora_scale)
        used = [l for l in leaves if l is not None]
        gs = torch.autograd.grad(y, used, grad_out.to(y.dtype), allow_unused=True, materialize_grads=True)
    it = iter(gs)
    full = [None if l is None else next(it) for l in leaves]
    return full


def gated_linear_backward(
    grad_out: Tensor,
    x: Optional[Tensor],
    weight: Tensor,
    row_gate: Tensor,
    col_gate: Tensor,
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    lora_scale: float,
    output: Optional[Tensor],
    output_mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fg::gated_linear_backward``: the gradients of (x, weight, bias, row_gate, col_gate,
    lora_a, lora_b) selected by ``output_mask``; an unselected one is an empty (0,) tensor."""
    N, K = weight.shape
    if grad_out.dtype != weight.dtype:
        raise TypeError(f"grad_out must have the dtype of weight ({weight.dtype}), got {grad_out.dtype}")
    if grad_out.dim() < 1 or grad_out.shape[-1] != N:
        raise ValueError(
            f"grad_out must have last dimension out_features = {N}, got shape {tuple(grad_out.shape)}"
        )
    mask = [bool(m) for m in output_mask]
    if len(mask) != 7:
        raise ValueError(f"output_mask must have 7 entries, got {len(mask)}")
    lora = lora_a is not None and lora_b is not None
    need_dx, need_dw, need_db, need_dgr, need_dgc = mask[:5]
    need_da = mask[5] and lora
    need_dlb = mask[6] and lora
    need_x = need_dgc or need_dw or need_da or need_dlb
    if need_x and x is None:
        raise ValueError("x is required for the gradients of col_gate, weight or LoRA")
    if need_dgr and output is None:
        raise ValueError("output is required for the gradient of row_gate")
    for t, name in ((x, "x"), (output, "output")):
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name} must be on the device of weight ({weight.device}), got {t.device}")
    if grad_out.device != weight.device:
        raise ValueError(f"grad_out must be on the device of weight ({weight.device}), got {grad_out.device}")

    likes = [weight, weight, weight, row_gate, col_gate, weight, weight]
    res: List[Tensor] = [_empty_like_fake(l) for l in likes]
    xshape = (*grad_out.shape[:-1], K)
    r = lora_a.shape[0] if lora else 0
    M = grad_out.numel() // N if N > 0 else int(torch.Size(grad_out.shape[:-1]).numel())
    sel = [need_dx, need_dw, need_db, need_dgr, need_dgc, need_da, need_dlb]

    if M == 0 or N == 0 or K == 0:
        full = _backward_reference(grad_out, x, weight, row_gate, col_gate,
                                   lora_a if lora else None, lora_b if lora else None, lora_scale, mask)
        for i in range(7):
            if sel[i]:
                res[i] = full[i].to(likes[i].dtype).reshape(xshape if i == 0 else full[i].shape).contiguous()
        return tuple(res)

    dev = weight.device
    dt = weight.dtype
    dy = _rows(grad_out, N)
    rmeta, cmeta = L.gate_meta(row_gate, col_gate)
    x2 = _rows(x, K) if need_x else None

    # Bias and row-gate gradients: column sums of dy (and dy * y) over tokens, active rows only.
    if need_db or need_dgr:
        y2 = _rows(output, N) if need_dgr else None
        sb, sg = L.colsums(dy, y2, rmeta, need_db, need_dgr)
        gr = row_gate.to(torch.float32)
        if need_db:
            res[2] = (sb * gr).to(dt)
        if need_dgr:
            res[3] = torch.where(gr != 0, sg / gr, torch.zeros_like(sg)).to(row_gate.dtype)

    # u = s * dh[:, R] @ lora_b[R]  (M, r): LoRA's share of dx and the input of lora_a's gradient.
    u = None
    if r > 0 and (need_dx or need_dgc or need_da):
        u = torch.empty((M, r), dtype=dt, device=dev)
        L.gmm(
            a=dy, b=lora_b.t(), out=u, n_full=r, k_full=N,
            k_idx=rmeta.order, k_vals=rmeta.vals, k_cnt=rmeta.cnt,
            k_gather_a=True, k_gather_b=True, k_ident_check=True, alpha=lora_scale,
        )

    # dx[:, C] = g_c * (dh[:, R] @ W[R][:, C] + u @ A[:, C]); fused: dgc = sum_m (...) * x[:, C].
    if need_dx or need_dgc:
        dx2 = torch.empty((M, K), dtype=dt, device=dev) if need_dx else None
        sgc = L.gmm(
            a=dy, b=weight.t(), out=dx2, n_full=K, k_full=N,
            k_idx=rmeta.order, k_vals=rmeta.vals, k_cnt=rmeta.cnt,
            k_gather_a=True, k_gather_b=True, k_ident_check=True,
            n_out=cmeta.order, n_brow=cmeta.order, n_vals=cmeta.vals, n_cnt=cmeta.cnt, n_ident_check=True,
            lora_t=u, lora_b=lora_a.t() if u is not None else None,
            aux=x2 if need_dgc else None,
        )
        if need_dx:
            res[0] = dx2.view(xshape)
        if need_dgc:
            res[4] = sgc.to(col_gate.dtype)

    # Weight-type gradients: token reductions over the active block, zeros elsewhere.
    if need_dw:
        dw = torch.empty((N, K), dtype=dt, device=dev)
        L.mtm(a=dy, b=x2, out=dw, p=rmeta, q=cmeta, p_gather=True, q_gather=True, p_vals=True, q_vals=True)
        res[1] = dw
    if need_dlb:
        dlb = torch.zeros((N, r), dtype=dt, device=dev)
        if r > 0:
            t = _lora_t(x2, lora_a, cmeta, lora_scale)
            L.mtm(a=dy, b=t, out=dlb, p=rmeta, q=L.identity_meta(r, dev),
                  p_gather=True, q_gather=False, p_vals=True, q_vals=False)
        res[6] = dlb
    if need_da:
        da = torch.zeros((r, K), dtype=dt, device=dev)
        if r > 0:
            L.mtm(a=u, b=x2, out=da, p=L.identity_meta(r, dev), q=cmeta,
                  p_gather=False, q_gather=True, p_vals=False, q_vals=True)
        res[5] = da
    return tuple(res)


class _GatedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale):
        out = gated_linear_forward(x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale)
        mask, need_x = gated_backward_plan(ctx.needs_input_grad, bias is not None, lora_a is not None)
        ctx.save_for_backward(
            x if need_x else None, weight, row_gate, col_gate, lora_a, lora_b, out if mask[3] else None
        )
        ctx.mask = mask
        ctx.lora_scale = lora_scale
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, row_gate, col_gate, lora_a, lora_b, output = ctx.saved_tensors
        grads = gated_linear_backward(
            grad, x, weight, row_gate, col_gate, lora_a, lora_b, ctx.lora_scale, output, ctx.mask
        )
        return (*(gr if m else None for gr, m in zip(grads, ctx.mask)), None)


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
    """Differentiable Triton ``gated_linear`` on tensors of any device (CUDA: compiled kernels;
    CPU or ``TRITON_INTERPRET=1``: the Triton interpreter). Same arguments and semantics as
    ``torch.ops.fg.gated_linear``; its backward runs the Triton backward kernels."""
    return _GatedLinearFunction.apply(x, weight, bias, row_gate, col_gate, lora_a, lora_b, float(lora_scale))
