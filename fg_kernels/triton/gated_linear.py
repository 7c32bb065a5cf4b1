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

These functions are the kernels of the ops (no autograd here): ``fg_kernels.cuda_registration``
registers them for ``fg``'s CUDA key and ``fg_kernels.triton`` for ``fg_triton``'s CPU and CUDA
keys; both namespaces get the one autograd of ``fg_kernels.registration``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import contract
from . import _launch as L

__all__ = ["gated_linear_forward", "gated_linear_backward"]


def _rows(t: Tensor, k: int) -> Tensor:
    """t as a 2-D (tokens, k) view when possible (the kernels take any strides)."""
    return t.reshape(contract.token_count(t), k)


def _lora_t(x2: Tensor, lora_a: Tensor, cmeta: L.GateMeta, lora_scale: float) -> Tensor:
    """t = lora_scale * (x * g_c)[:, C] @ lora_a[:, C].T, shape (M, r), x's dtype."""
    M, K = x2.shape
    t = torch.empty((M, lora_a.shape[0]), dtype=x2.dtype, device=x2.device)
    L.gmm(a=x2, b=lora_a, out=t, n_full=lora_a.shape[0], k_full=K, k=L.Gather.of_gate(cmeta), gather_a=True,
          gather_b=True, alpha=lora_scale)
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
    """``fg::gated_linear``: ``row_gate * ((x * col_gate) @ (W + s B A).T + bias)`` on the active
    rows and columns only; inactive outputs are exactly 0."""
    contract.check_gated_linear(x, weight, bias, row_gate, col_gate, lora_a, lora_b)
    N, K = weight.shape
    M = contract.token_count(x)
    # Allocated in its final shape and returned as such: a returned view would make autograd
    # refuse in-place use of the op's output (as the CPU kernel does).
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    x2 = _rows(x, K)
    rmeta, cmeta = L.gate_meta(row_gate, col_gate, vals_dtype=L.acc_dtype(x.dtype))
    has_lora = lora_a is not None and lora_a.shape[0] > 0
    t = _lora_t(x2, lora_a, cmeta, lora_scale) if has_lora else None
    L.gmm(
        a=x2, b=weight, out=y.view(M, N), n_full=N, k_full=K, k=L.Gather.of_gate(cmeta), gather_a=True,
        gather_b=True, n=L.Gather.of_gate(rmeta), bias=None if bias is None else bias.contiguous(),
        lora_t=t, lora_b=lora_b if has_lora else None,
    )
    return y


@dataclass
class _Backward:
    """What every gradient of one backward call reads: the 2-D views, the gate metadata and the
    LoRA factors (None without LoRA or with rank 0)."""

    dy: Tensor
    x2: Optional[Tensor]
    weight: Tensor
    rmeta: L.GateMeta
    cmeta: L.GateMeta
    lora_a: Optional[Tensor]
    lora_b: Optional[Tensor]
    lora_scale: float

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]


def _bias_and_row_gate_grads(b: _Backward, output: Optional[Tensor], row_gate: Tensor, need_db: bool,
                             need_dgr: bool):
    """Column sums of dy (and dy * y) over tokens, on the active rows: db = g_r * sum dy,
    dgr = sum(dy * y) / g_r."""
    N = b.weight.shape[0]
    y2 = _rows(output, N) if need_dgr else None
    sum_dy, sum_dy_y = L.colsums(b.dy, y2, b.rmeta, need_db, need_dgr)
    gr = row_gate.to(sum_dy.dtype if need_db else sum_dy_y.dtype)
    db = (sum_dy * gr).to(b.weight.dtype) if need_db else None
    dgr = torch.where(gr != 0, sum_dy_y / gr, torch.zeros_like(sum_dy_y)).to(row_gate.dtype) if need_dgr else None
    return db, dgr


def _lora_u(b: _Backward) -> Tensor:
    """u = s * dh[:, R] @ lora_b[R], (M, r): LoRA's share of dx and the input of lora_a's gradient."""
    M, N = b.dy.shape
    u = torch.empty((M, b.rank), dtype=b.dy.dtype, device=b.dy.device)
    L.gmm(a=b.dy, b=b.lora_b.t(), out=u, n_full=b.rank, k_full=N, k=L.Gather.of_gate(b.rmeta), gather_a=True,
          gather_b=True, alpha=b.lora_scale)
    return u


def _input_and_col_gate_grads(b: _Backward, u: Optional[Tensor], need_dx: bool, need_dgc: bool):
    """dx[:, C] = g_c * (dh[:, R] @ W[R][:, C] + u @ A[:, C]), fused with dgc = sum_m (...) * x[:, C]."""
    M = b.dy.shape[0]
    K = b.weight.shape[1]
    dx2 = torch.empty((M, K), dtype=b.dy.dtype, device=b.dy.device) if need_dx else None
    sum_dgc = L.gmm(
        a=b.dy, b=b.weight.t(), out=dx2, n_full=K, k_full=b.weight.shape[0], k=L.Gather.of_gate(b.rmeta),
        gather_a=True, gather_b=True, n=L.Gather.of_gate(b.cmeta),
        lora_t=u, lora_b=b.lora_a.t() if u is not None else None, aux=b.x2 if need_dgc else None,
    )
    return dx2, sum_dgc


def _weight_grad(b: _Backward) -> Tensor:
    """dW[R][:, C] = dh[:, R].T @ (x[:, C] * g_c[C]), zeros elsewhere."""
    dw = torch.empty(b.weight.shape, dtype=b.dy.dtype, device=b.dy.device)
    L.mtm(a=b.dy, b=b.x2, out=dw, p=b.rmeta, q=b.cmeta, p_gather=True, q_gather=True, p_vals=True, q_vals=True)
    return dw


def _lora_b_grad(b: _Backward) -> Tensor:
    """dlora_b[R] = dh[:, R].T @ t, zeros elsewhere."""
    dlb = torch.zeros((b.weight.shape[0], b.rank), dtype=b.dy.dtype, device=b.dy.device)
    if b.rank > 0:
        t = _lora_t(b.x2, b.lora_a, b.cmeta, b.lora_scale)
        L.mtm(a=b.dy, b=t, out=dlb, p=b.rmeta, q=L.identity_meta(b.rank, t.device, b.rmeta.vals.dtype),
              p_gather=True, q_gather=False, p_vals=True, q_vals=False)
    return dlb


def _lora_a_grad(b: _Backward, u: Optional[Tensor]) -> Tensor:
    """dlora_a[:, C] = u.T @ (x[:, C] * g_c[C]), zeros elsewhere."""
    da = torch.zeros((b.rank, b.weight.shape[1]), dtype=b.dy.dtype, device=b.dy.device)
    if b.rank > 0:
        L.mtm(a=u, b=b.x2, out=da, p=L.identity_meta(b.rank, u.device, b.cmeta.vals.dtype), q=b.cmeta,
              p_gather=False, q_gather=True, p_vals=False, q_vals=True)
    return da


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
    """``fg::gated_linear_backward``: the gradients of ``contract.GRAD_SLOTS`` selected by
    ``output_mask``; an unselected one is an empty (0,) tensor."""
    contract.check_gated_linear_backward(grad_out, x, weight, row_gate, col_gate, lora_a, lora_b, output,
                                         output_mask)
    plan = contract.backward_plan(output_mask, True, lora_a is not None)
    computed: Dict[int, Tensor] = {}  # slot -> gradient; a selected slot left out is a sum over nothing
    if contract.token_count(grad_out) > 0 and weight.shape[0] > 0:
        _compute_grads(computed, plan, grad_out, x, weight, row_gate, col_gate, lora_a, lora_b, lora_scale, output)
    return contract.backward_outputs(grad_out, weight, row_gate, col_gate, lora_a, output_mask, computed,
                                     missing=Tensor.new_zeros)


def _compute_grads(computed: Dict[int, Tensor], plan: contract.BackwardPlan, grad_out, x, weight, row_gate, col_gate,
                   lora_a, lora_b, lora_scale, output) -> None:
    """The selected gradients that are not sums over nothing, into ``computed`` by slot."""
    need_dx, need_dw, need_db, need_dgr, need_dgc, need_da, need_dlb = plan.mask
    N, K = weight.shape
    rmeta, cmeta = L.gate_meta(row_gate, col_gate, vals_dtype=L.acc_dtype(grad_out.dtype))
    b = _Backward(dy=_rows(grad_out, N), x2=_rows(x, K) if plan.needs_x else None, weight=weight,
                  rmeta=rmeta, cmeta=cmeta, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale)
    if need_db or need_dgr:
        db, dgr = _bias_and_row_gate_grads(b, output, row_gate, need_db, need_dgr)
        if need_db:
            computed[2] = db
        if need_dgr:
            computed[3] = dgr
    if K == 0:
        return  # no input column: the other gradients are empty or sums over nothing
    u = _lora_u(b) if b.rank > 0 and (need_dx or need_dgc or need_da) else None
    if need_dx or need_dgc:
        dx2, sum_dgc = _input_and_col_gate_grads(b, u, need_dx, need_dgc)
        if need_dx:
            computed[0] = dx2.view(*grad_out.shape[:-1], K)
        if need_dgc:
            computed[4] = sum_dgc.to(col_gate.dtype)
    if need_dw:
        computed[1] = _weight_grad(b)
    if need_dlb:
        computed[6] = _lora_b_grad(b)
    if need_da:
        computed[5] = _lora_a_grad(b, u)
