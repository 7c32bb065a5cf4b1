"""``compression_report``: what compaction can remove given the current (eval) gates."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from .layers import GatedLinear

__all__ = ["compression_report", "keep_fraction"]


@torch.no_grad()
def compression_report(model: nn.Module) -> Dict[str, Any]:
    """Per gated layer with N outputs, K inputs, active rows R and columns C (non-zero eval gates):
    ``removed_params = N*K - |R|*|C| + (N - |R| if bias else 0)``. LoRA factors are not counted
    (they fold into the weight). ``params_total`` counts every distinct parameter of the model,
    ``params_gated`` the weights and biases of the gated layers, ``params_removable`` the sum of
    ``removed_params`` and ``removed_fraction = params_removable / params_total``."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    layers = []
    gated = 0
    removable = 0
    for name, m in model.named_modules():
        if not isinstance(m, GatedLinear):
            continue
        n, k = m.out_features, m.in_features
        r = int(m.row_gates.active().numel())
        c = int(m.col_gates.active().numel())
        removed = n * k - r * c + ((n - r) if m.bias is not None else 0)
        gated += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        removable += removed
        layers.append(
            dict(name=name, out_features=n, in_features=k, active_rows=r, active_cols=c, removed_params=removed)
        )
    return dict(
        params_total=total,
        params_gated=gated,
        params_removable=removable,
        removed_fraction=(removable / total) if total else 0.0,
        layers=layers,
    )


def keep_fraction(model: nn.Module) -> float:
    """Fraction of the gated layers' parameters that compaction would keep (1 with no gated layer)."""
    rep = compression_report(model)
    return 1.0 - rep["params_removable"] / rep["params_gated"] if rep["params_gated"] else 1.0
