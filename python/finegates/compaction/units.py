"""Whole units of a block as groups of gates: an attention head (under GQA a kv head with its group
of query heads) is its q/k/v rows and its o columns, an MLP unit its up rows and its down column.

``sparsify(..., structure="heads_units")`` closes whole units at the budget's exact closure, so the
compact model is plain ``nn.Linear`` s of fewer heads and units (the shape head-and-unit pruning
gives, with nothing gathered or scattered); :func:`unit_groups` tells the closure which gates go
together, in its flat order (layers in module order, each layer's rows then columns).
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from .attention import head_projections
from .compact import paired_blocks
from .folding import COUNTING, LayoutMismatch
from .layouts import layout_for
from .mlp import up_projections
from ..layers import GatedLinear

__all__ = ["unit_groups"]


def _offsets(layers: List[GatedLinear]) -> Dict[int, int]:
    offsets, pos = {}, 0
    for m in layers:
        offsets[id(m)] = pos
        pos += m.out_features + m.in_features
    return offsets


@torch.no_grad()
def unit_groups(model: nn.Module, layers: List[GatedLinear]) -> Tensor:
    """One group id per gate of ``layers`` (flat, rows then columns per layer): gates of one head
    or one MLP unit share an id; every other gate is -1 (a group of its own)."""
    offsets = _offsets(layers)
    total = sum(m.out_features + m.in_features for m in layers)
    groups = torch.full((total,), -1, dtype=torch.long)
    next_id = 0
    token = COUNTING.set({})  # the layouts' projections from masks only, no weight folded
    try:
        for name, block in paired_blocks(model):
            layout = layout_for(block)
            if layout is None:
                continue
            prefix = name + "." if name else ""
            for assign in (_heads, _units):
                try:
                    members = assign(block, prefix, layout)
                except (LayoutMismatch, AttributeError):
                    continue
                for unit in members:
                    flat = [offsets[id(m)] + pos for m, pos in unit if id(m) in offsets]
                    if flat:
                        groups[torch.cat(flat)] = next_id
                        next_id += 1
    finally:
        COUNTING.reset(token)
    return groups


def _module(block: nn.Module, prefix: str, name: str) -> nn.Module:
    return block.get_submodule(name[len(prefix):])


def _heads(block: nn.Module, prefix: str, layout) -> List[List[tuple]]:
    """Per kv head: (layer, flat positions) of its query heads' q rows, its k/v rows and the o columns."""
    if layout.attention is None:
        return []
    parts, o, H, KV, hd = head_projections(prefix, block, layout.attention)
    o_layer = block.get_submodule(layout.attention.o)
    per_group = H // KV
    units = []
    for j in range(KV):
        members = []
        for index, (proj, part) in enumerate(parts):
            heads = range(j * per_group, (j + 1) * per_group) if index == 0 else (j,)
            local = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
            members.append((_module(block, prefix, proj.name), proj.source(part, local)))
        q_dims = torch.arange(j * per_group * hd, (j + 1) * per_group * hd)
        members.append((o_layer, o_layer.out_features + q_dims))
        units.append(members)
    return units


def _units(block: nn.Module, prefix: str, layout) -> List[List[tuple]]:
    """Per MLP unit: (layer, flat positions) of its up rows and its down column."""
    if layout.mlp is None:
        return []
    down = block.get_submodule(layout.mlp.down)
    width = down.in_features
    ups = up_projections(prefix, block, layout.mlp, width)
    return [[(_module(block, prefix, proj.name), proj.source(part, torch.tensor([u]))) for proj, part in ups]
            + [(down, torch.tensor([down.out_features + u]))] for u in range(width)]
