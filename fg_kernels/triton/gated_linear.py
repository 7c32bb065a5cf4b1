"""Triton implementation of ``fg::gated_linear`` and ``fg::gated_linear_backward``: compact
first, then dense loops (see ``kernels.py``). R, C: the active rows / columns, as device-side gate
orders and counts (never a host sync). Every GEMM step is launched twice, once per route: the
*full* route (all gates open: direct kernels on the original tensors, gates scaling the tiles) and
the *compact* route (some gate closed: packed operands, scatter in the epilogue); on the device,
exactly one of the two does the work.

Forward:

    xc = x[:, C] * g_c[C],  Wc = W[R][:, C]                              (pack, compact route)
    t  = lora_scale * xc @ lora_a[:, C].T                       (M, r)   LoRA pre-pass
    y[:, R] = g_r[R] * (xc @ Wc.T + t @ lora_b[R].T + b[R]),  y[:, other] = 0   (one GEMM, full grid)

Backward, with dh = dy * g_r on the active rows:

    dhc = dy[:, R] * g_r[R]                                              (pack, compact route)
    db[R]   = sum_m dh[:, R]                 dgr[R] = sum_m dy * y / g_r   (column-sum kernel)
    u       = lora_scale * dhc @ lora_b[R]                      (M, r)   LoRA pre-pass
    dxc     = dhc @ Wc + u @ lora_a[:, C]                                (GEMM)
    dx[:, C] = dxc * g_c[C], dx[:, other] = 0;  dgc[C] = sum_m dxc * x[:, C]   (its epilogue)
    dW[R][:, C]   = dhc.T @ xc       zeros elsewhere                      (token-reduction GEMM)
    dlora_b[R]    = dhc.T @ t        zeros elsewhere
    dlora_a[:, C] = u.T @ xc         zeros elsewhere

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


@dataclass
class _Gates:
    """The gate metadata of one op call and its two routes."""

    rows: L.GateMeta
    cols: L.GateMeta
    full: L.Route
    compact: L.Route

    @classmethod
    def of(cls, row_gate: Tensor, col_gate: Tensor, dtype: torch.dtype) -> "_Gates":
        rmeta, cmeta = L.gate_meta(row_gate, col_gate, vals_dtype=L.acc_dtype(dtype))
        return cls(rmeta, cmeta, *L.routes(rmeta, cmeta))


def _packed(src: Tensor, g: _Gates, rows: Optional[L.GateMeta] = None, cols: Optional[L.GateMeta] = None,
            scaled: bool = True) -> Tensor:
    """The active block of ``src`` (rows / columns through the given gates, scaled by their values
    when ``scaled``) in a buffer of src's shape; written on the compact route only."""
    dst = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    L.pack(src=src, dst=dst, route=g.compact, rows=None if rows is None else L.Gather.of_gate(rows, scaled),
           cols=None if cols is None else L.Gather.of_gate(cols, scaled))
    return dst


def _lora_t(g: _Gates, x2: Tensor, xc: Tensor, lora_a: Tensor, lora_scale: float) -> Tensor:
    """t = lora_scale * (x * g_c)[:, C] @ lora_a[:, C].T, shape (M, r), x's dtype."""
    M, K = x2.shape
    r = lora_a.shape[0]
    t = torch.empty((M, r), dtype=x2.dtype, device=x2.device)
    L.gmm_full(route=g.full, a=x2, b=lora_a, out=t, n_full=r, k_vals=g.cols.vals, alpha=lora_scale)
    lora_a_c = _packed(lora_a, g, cols=g.cols, scaled=False)
    L.gmm_compact(route=g.compact, a=xc, b=lora_a_c, out=t, n_full=r, k_key=K, k_len=K, k_cnt=g.cols.cnt,
                  alpha=lora_scale)
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
    g = _Gates.of(row_gate, col_gate, x.dtype)
    xc = _packed(x2, g, cols=g.cols)
    has_lora = lora_a is not None and lora_a.shape[0] > 0
    t = _lora_t(g, x2, xc, lora_a, lora_scale) if has_lora else None
    epilogue = dict(out=y.view(M, N), n_full=N, bias=None if bias is None else bias.contiguous(), lora_t=t,
                    lora_b=lora_b if has_lora else None)
    L.gmm_full(route=g.full, a=x2, b=weight, k_vals=g.cols.vals, n_vals=g.rows.vals, **epilogue)
    wc = _packed(weight, g, rows=g.rows, cols=g.cols, scaled=False)
    L.gmm_compact(route=g.compact, a=xc, b=wc, k_key=K, k_len=K, k_cnt=g.cols.cnt, n=L.Gather.of_gate(g.rows),
                  **epilogue)
    return y


@dataclass
class _Backward:
    """What every gradient of one backward call reads: the 2-D views, their packed forms (compact
    route), the gates and the LoRA factors (None without LoRA or with rank 0)."""

    dy: Tensor
    dyc: Tensor
    x2: Optional[Tensor]
    xc: Optional[Tensor]
    weight: Tensor
    g: _Gates
    lora_a: Optional[Tensor]
    lora_b: Optional[Tensor]
    lora_scale: float

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]


def _bias_and_row_gate_grads(dy: Tensor, rows: L.GateMeta, output: Optional[Tensor], row_gate: Tensor,
                             bias_dtype: torch.dtype, need_db: bool, need_dgr: bool):
    """Column sums of dy (M, N) (and dy * y) over tokens, on the active rows: db = g_r * sum dy,
    dgr = sum(dy * y) / g_r."""
    y2 = _rows(output, dy.shape[1]) if need_dgr else None
    sum_dy, sum_dy_y = L.colsums(dy, y2, rows, need_db, need_dgr)
    gr = row_gate.to(sum_dy.dtype if need_db else sum_dy_y.dtype)
    db = (sum_dy * gr).to(bias_dtype) if need_db else None
    dgr = torch.where(gr != 0, sum_dy_y / gr, torch.zeros_like(sum_dy_y)).to(row_gate.dtype) if need_dgr else None
    return db, dgr


def _lora_u(b: _Backward) -> Tensor:
    """u = s * dh[:, R] @ lora_b[R], (M, r): LoRA's share of dx and the input of lora_a's gradient."""
    M, N = b.dy.shape
    u = torch.empty((M, b.rank), dtype=b.dy.dtype, device=b.dy.device)
    L.gmm_full(route=b.g.full, a=b.dy, b=b.lora_b.t(), out=u, n_full=b.rank, k_vals=b.g.rows.vals,
               alpha=b.lora_scale)
    lora_b_c = _packed(b.lora_b, b.g, rows=b.g.rows, scaled=False)
    L.gmm_compact(route=b.g.compact, a=b.dyc, b=lora_b_c.t(), out=u, n_full=b.rank, k_key=N, k_len=N,
                  k_cnt=b.g.rows.cnt, alpha=b.lora_scale)
    return u


def _input_and_col_gate_grads(b: _Backward, u: Optional[Tensor], need_dx: bool, need_dgc: bool):
    """dx[:, C] = g_c * (dh[:, R] @ W[R][:, C] + u @ A[:, C]), fused with dgc = sum_m (...) * x[:, C]."""
    M = b.dy.shape[0]
    N, K = b.weight.shape
    dx2 = torch.empty((M, K), dtype=b.dy.dtype, device=b.dy.device) if need_dx else None
    part = L.partial_sums(M, K, b.dy.dtype, b.dy.device) if need_dgc else None
    epilogue = dict(out=dx2, n_full=K, lora_t=u, lora_b=b.lora_a.t() if u is not None else None,
                    aux=b.x2 if need_dgc else None, part=part)
    L.gmm_full(route=b.g.full, a=b.dy, b=b.weight.t(), k_vals=b.g.rows.vals, n_vals=b.g.cols.vals, **epilogue)
    wc = _packed(b.weight, b.g, rows=b.g.rows, cols=b.g.cols, scaled=False)
    L.gmm_compact(route=b.g.compact, a=b.dyc, b=wc.t(), k_key=N, k_len=N, k_cnt=b.g.rows.cnt,
                  n=L.Gather.of_gate(b.g.cols), **epilogue)
    return dx2, part.sum(0)[:K] if need_dgc else None


def _token_reduction(b: _Backward, out: Tensor, a_full: Tensor, a_compact: Tensor, rows: Optional[L.GateMeta],
                     b_full: Tensor, b_compact: Tensor, cols: Optional[L.GateMeta]) -> Tensor:
    """out[rows][:, cols] = a[:, rows].T @ b[:, cols] with the gates applied, zeros elsewhere: on
    the full route the gate values scale the result, on the compact route they are in the packed
    operands. A side without a gate (the LoRA rank) is direct."""
    L.mtm(route=b.g.full, a=a_full, b=b_full, out=out, p_vals=None if rows is None else rows.vals,
          q_vals=None if cols is None else cols.vals)
    L.mtm(route=b.g.compact, a=a_compact, b=b_compact, out=out,
          p=None if rows is None else L.Gather.of_gate(rows), q=None if cols is None else L.Gather.of_gate(cols))
    return out


def _weight_grad(b: _Backward) -> Tensor:
    """dW[R][:, C] = dh[:, R].T @ (x[:, C] * g_c[C]), zeros elsewhere."""
    dw = torch.empty(b.weight.shape, dtype=b.dy.dtype, device=b.dy.device)
    return _token_reduction(b, dw, b.dy, b.dyc, b.g.rows, b.x2, b.xc, b.g.cols)


def _lora_b_grad(b: _Backward) -> Tensor:
    """dlora_b[R] = dh[:, R].T @ t, zeros elsewhere."""
    dlb = torch.empty((b.weight.shape[0], b.rank), dtype=b.dy.dtype, device=b.dy.device)
    t = _lora_t(b.g, b.x2, b.xc, b.lora_a, b.lora_scale)
    return _token_reduction(b, dlb, b.dy, b.dyc, b.g.rows, t, t, None)


def _lora_a_grad(b: _Backward, u: Tensor) -> Tensor:
    """dlora_a[:, C] = u.T @ (x[:, C] * g_c[C]), zeros elsewhere."""
    da = torch.empty((b.rank, b.weight.shape[1]), dtype=b.dy.dtype, device=b.dy.device)
    return _token_reduction(b, da, u, u, None, b.x2, b.xc, b.g.cols)


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
    g = _Gates.of(row_gate, col_gate, grad_out.dtype)
    dy = _rows(grad_out, N)
    if need_db or need_dgr:
        db, dgr = _bias_and_row_gate_grads(dy, g.rows, output, row_gate, weight.dtype, need_db, need_dgr)
        if need_db:
            computed[2] = db
        if need_dgr:
            computed[3] = dgr
    if K == 0 or not (need_dx or need_dgc or need_dw or need_da or need_dlb):
        return  # no input column (the other gradients are empty or sums over nothing), or nothing else asked
    x2 = _rows(x, K) if plan.needs_x else None
    b = _Backward(dy=dy, dyc=_packed(dy, g, cols=g.rows), x2=x2, xc=None if x2 is None else _packed(x2, g, cols=g.cols),
                  weight=weight, g=g, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale)
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
        computed[6] = _lora_b_grad(b) if b.rank > 0 else dy.new_zeros((N, 0))
    if need_da:
        computed[5] = _lora_a_grad(b, u) if b.rank > 0 else dy.new_zeros((0, K))
