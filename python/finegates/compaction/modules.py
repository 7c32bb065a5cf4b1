"""``GatheredLinear``: the inference layer a compacted model keeps where a gather or scatter is left.

It holds only the active block of a gated Linear (gates and LoRA already folded in) and the index
lists that place it: ``y[..., row_idx] = x[..., col_idx] @ weight.T + bias``, other outputs 0,
computed by ``fg_kernels.gathered_linear``. No training code: a compact model needs only this
module, ``fg_kernels`` and the stock model classes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import fg_kernels

__all__ = ["GatheredLinear"]


class GatheredLinear(nn.Module):
    """A Linear restricted to active rows ``row_idx`` and columns ``col_idx`` of a full
    ``(out_features, in_features)`` layer.

    ``row_idx=None``: the output is the compact ``weight.shape[0]`` wide result (a paired next
    layer reads it compact); ``col_idx=None``: the input is already compact. The index lists are
    persistent int64 buffers, so they travel with ``state_dict`` and safetensors.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        active_out: int,
        active_in: int,
        *,
        bias: bool,
        scatter_rows: bool,
        gather_cols: bool,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        if not scatter_rows and out_features != active_out:
            raise ValueError(
                f"GatheredLinear: without scatter_rows out_features ({out_features}) must equal active_out ({active_out})"
            )
        if not gather_cols and in_features != active_in:
            raise ValueError(
                f"GatheredLinear: without gather_cols in_features ({in_features}) must equal active_in ({active_in})"
            )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        kw = dict(dtype=dtype, device=device)
        self.weight = nn.Parameter(torch.empty(active_out, active_in, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(active_out, **kw), requires_grad=False) if bias else None
        idx = dict(dtype=torch.int64, device=device)
        self.register_buffer("row_idx", torch.zeros(active_out, **idx) if scatter_rows else None)
        self.register_buffer("col_idx", torch.zeros(active_in, **idx) if gather_cols else None)

    @classmethod
    def from_block(
        cls,
        weight: Tensor,
        bias: Optional[Tensor],
        row_idx: Optional[Tensor],
        col_idx: Optional[Tensor],
        *,
        in_features: int,
        out_features: int,
    ) -> "GatheredLinear":
        """Wraps an already gathered (and gate-folded) block; indices are copied as int64."""
        m = cls(
            in_features,
            out_features,
            weight.shape[0],
            weight.shape[1],
            bias=bias is not None,
            scatter_rows=row_idx is not None,
            gather_cols=col_idx is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        with torch.no_grad():
            m.weight.copy_(weight)
            if bias is not None:
                m.bias.copy_(bias)
            if row_idx is not None:
                m.row_idx.copy_(row_idx)
            if col_idx is not None:
                m.col_idx.copy_(col_idx)
        return m

    def forward(self, x: Tensor) -> Tensor:
        return fg_kernels.gathered_linear(x, self.weight, self.bias, self.row_idx, self.col_idx, self.out_features)

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, active=({n}, {k}), "
            f"bias={self.bias is not None}, scatter_rows={self.row_idx is not None}, "
            f"gather_cols={self.col_idx is not None}"
        )
