"""Triton implementation of ``fg::gathered_linear`` (inference on a compacted layer):

    y[..., row_idx] = x[..., col_idx] @ weight_c.T + bias_c,   other outputs 0.

Compact first (see ``kernels.py``): ``x[:, col_idx]`` is packed once by a bandwidth-bound kernel,
then one dense-tile GEMM runs on it and the compact weight, with the bias in the epilogue, and
the output is either compact (``row_idx=None``) or scattered through ``row_idx``, the remaining
columns written as zeros by the same grid (the output positions are ordered "columns in row_idx
first, then the others", built on the device). The kernel of the op, no autograd here (see
``gated_linear``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import contract
from . import _launch as L

__all__ = ["gathered_linear_forward"]


def _output_order(row_idx: Tensor, n_rows: int, out_features: int, device: torch.device) -> L.Gather:
    """Launch arguments that scatter compact row i to output column row_idx[i]: an order of the
    output columns (produced ones first, ascending, then the others) and, per position, the row of
    weight_c that produces it; all on the device."""
    inv = torch.full((out_features,), -1, dtype=torch.int32, device=device)
    inv.index_put_((row_idx.to(torch.int64),), torch.arange(n_rows, dtype=torch.int32, device=device))
    (meta,) = L.gate_meta(inv + 1)
    brow = inv.gather(0, meta.order.to(torch.int64)).contiguous()
    return L.Gather(meta.order, cnt=meta.cnt, rows=brow)


def gathered_linear_forward(
    x: Tensor,
    weight_c: Tensor,
    bias_c: Optional[Tensor],
    row_idx: Optional[Tensor],
    col_idx: Optional[Tensor],
    out_features: int,
) -> Tensor:
    """``fg::gathered_linear``."""
    out_features = int(out_features)
    contract.check_gathered_linear(x, weight_c, bias_c, row_idx, col_idx, out_features)
    if row_idx is not None:
        row_idx = contract.check_index_values(row_idx, out_features, "row_idx", "out_features", distinct=True)
    if col_idx is not None:
        col_idx = contract.check_index_values(col_idx, x.shape[-1], "col_idx", "x.shape[-1]")
    M = contract.token_count(x)
    y = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)  # final shape, not a view
    if M == 0 or out_features == 0:
        return y
    if weight_c.shape[0] == 0:
        return y.zero_()  # no row is produced
    x2 = x.reshape(M, x.shape[-1])
    k_len = weight_c.shape[1]
    if col_idx is not None:
        xc = torch.empty((M, k_len), dtype=x.dtype, device=x.device)
        x2 = L.pack(src=x2, dst=xc, route=L.Route(L.ALWAYS), cols=L.Gather(col_idx.contiguous()))
    L.gmm_compact(
        route=L.Route(L.ALWAYS), a=x2, b=weight_c, out=y.view(M, out_features), n_full=out_features,
        k_key=x.shape[-1], k_len=k_len,
        n=None if row_idx is None else _output_order(row_idx, weight_c.shape[0], out_features, x.device),
        bias=None if bias_c is None else bias_c.contiguous(),
    )
    return y
