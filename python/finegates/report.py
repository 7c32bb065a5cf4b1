"""``compression_report``: what compaction removes given the current (eval) gates.

The numbers come from :func:`finegates.compaction.compact.compact_size`, the plan :func:`finegates.compact`
executes, only counted: a dimension two layers share (an MLP unit, a head dim) is removed once
either side closes it, head sizes are uniform per layer, widths are padded where compaction pads.
So ``params_compact`` is the parameter count of the compact model, exactly.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .compaction.compact import compact_size
from .gates import Gates
from .layers import GatedLinear

__all__ = ["compression_report", "keep_fraction", "base_parameters"]


def base_parameters(model: nn.Module) -> int:
    """Distinct parameters of the model without its gates and LoRA factors: the dense model's
    count, which compaction shrinks."""
    skip = set()
    for m in model.modules():
        if isinstance(m, Gates):
            skip.update(id(p) for p in m.parameters())
        elif isinstance(m, GatedLinear) and m.lora_a is not None:
            skip.update((id(m.lora_a), id(m.lora_b)))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in skip:
            seen.add(id(p))
            total += p.numel()
    return total


def _layer_params(m: GatedLinear) -> int:
    return m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)


@torch.no_grad()
def compression_report(model: nn.Module, *, masks: Optional[Mapping[GatedLinear, Tuple[Tensor, Tensor]]] = None,
                       portable: bool = False) -> Dict[str, Any]:
    """The compact model's size, from the compaction plan (``masks``/``portable`` as in
    :func:`finegates.compaction.compact.compact_size`).

    ``params_total``: the model's parameters without gates and LoRA (the dense model);
    ``params_gated``: weights and biases of the gated layers; ``params_removable``: what
    compaction removes (also from ungated layers it shrinks with a gated partner);
    ``params_compact = params_total - params_removable``, the compact model's count;
    ``params_removed_ungated``: the part of ``params_removable`` that ungated layers lose (a
    dimension they share with a gated partner: the MLP's down projection when only its up
    projection is gated, a value projection beside a gated output projection, which then becomes
    a gathered layer); ``removed_fraction`` (of all) and ``removed_fraction_of_gated``
    (``params_removable / params_gated``: the quantity ``target_sparsity`` asks for). With every
    Linear of the blocks gated (the default) no ungated layer shrinks; with a subset gated the
    partners' removal counts too, so the fraction can exceed 1. ``layers``: per rewritten layer
    its open rows/columns (gated layers), ``params``, ``compact_params`` and ``removed_params``."""
    gated = {name: m for name, m in model.named_modules() if isinstance(m, GatedLinear)}
    # Every gated layer's masks, its eval gates' where none are given, read once for the plan and
    # the counts below.
    masks = dict(masks or {})
    for m in gated.values():
        if m not in masks:
            masks[m] = (m.row_gates.eval_values() != 0, m.col_gates.eval_values() != 0)
    plan = compact_size(model, masks=masks, portable=portable) if gated else {}
    layers = []
    for name, (params, counted) in plan.items():
        entry: Dict[str, Any] = dict(name=name, gated=name in gated)
        m = gated.get(name)
        if m is not None:
            rows, cols = masks[m]
            entry.update(out_features=m.out_features, in_features=m.in_features,
                         active_rows=int(rows.sum()), active_cols=int(cols.sum()))
        entry.update(params=params, compact_params=counted.params, removed_params=params - counted.params)
        layers.append(entry)
    total = base_parameters(model)
    params_gated = sum(_layer_params(m) for m in gated.values())
    removable = sum(l["removed_params"] for l in layers)
    return dict(
        params_total=total,
        params_gated=params_gated,
        params_removable=removable,
        params_removed_ungated=sum(l["removed_params"] for l in layers if not l["gated"]),
        params_compact=total - removable,
        removed_fraction=removable / total if total else 0.0,
        removed_fraction_of_gated=removable / params_gated if params_gated else 0.0,
        layers=layers,
    )


def keep_fraction(model: nn.Module) -> float:
    """Fraction of the gated layers' parameters the compact model keeps (1 with no gated layer)."""
    return 1.0 - compression_report(model)["removed_fraction_of_gated"]
