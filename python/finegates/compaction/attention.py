"""Compaction of a self-attention block described by an :class:`AttentionLayout`.

A head whose value path (value rows ∩ output columns) is closed contributes nothing and is removed
(under GQA a kv head goes only with its whole group of query heads, so the group size stays
uniform). A head whose query or key side is closed is *not* removed: its scores are all equal, so it
outputs the mean of its values, not zero. Inside a kept head:

- shrinking heads (stored softmax scale, no pairing inside a head: BERT, GPT-2, OPT): every head
  shrinks to one size D per layer (the largest open set, rounded up to a multiple of 8 for the
  attention kernel's sake, at most the original), q/k keep dims open on both sides, v dims open on
  v ∩ o, zero-filled up to D;
- fixed head size (rotary models): a q row is computed only where its rotary pair (d and its
  partner) can meet an open k dim, and likewise for k; with per-head q/k norms every open q/k dim
  stays (it feeds the norm). Closed dims are exact zeros in the full-size head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from .folding import LayoutMismatch, PartPlan, Projection, Rewrites, build, fold, idx, require_linears, submodule
from .layouts import AttentionLayout

__all__ = ["compact_attention", "head_projections", "COMPACT_ATTRS"]

# Name of the per-module dict of attributes that compact() changed (head counts, head sizes);
# save_compact stores it and load_compact sets it again on a fresh stock model.
COMPACT_ATTRS = "_finegates_compact_attrs"


@dataclass
class _HeadPlan:
    """Kept rows of q, k, v; kept columns of o; and the new head counts and size."""

    q: PartPlan
    k: PartPlan
    v: PartPlan
    o: PartPlan
    heads: int
    kv_heads: int
    head_size: int

    def quantities(self) -> Dict[str, int]:
        return dict(heads=self.heads, kv_heads=self.kv_heads, head_size=self.head_size,
                    width=self.heads * self.head_size, kv_width=self.kv_heads * self.head_size)


def _projections(prefix: str, block: nn.Module, layout: AttentionLayout, hd: int):
    """(q, k, v) as (Projection, part) pairs, the o projection, and the head counts (H, KV)."""
    require_linears(block, layout.projections, prefix)
    if layout.qkv:
        f = fold(block.get_submodule(layout.qkv))
        width = f.out_features
        if layout.qkv_split == "per_head" or not layout.kv_heads:
            kv = width // (3 * hd)
        else:
            kv = int(getattr(block.get_submodule(layout.module), layout.kv_heads))
        q_width = width - 2 * kv * hd
        if q_width <= 0 or q_width % hd or width != q_width + 2 * kv * hd:
            raise LayoutMismatch(f"{prefix}{layout.qkv} has {width} outputs, not q + 2 kv heads of size {hd}")
        proj = Projection(prefix + layout.qkv, f, (q_width, kv * hd, kv * hd), layout.qkv_split, hd)
        parts = [(proj, 0), (proj, 1), (proj, 2)]
    else:
        parts = []
        for path in (layout.q, layout.k, layout.v):
            f = fold(block.get_submodule(path))
            parts.append((Projection(prefix + path, f, (f.out_features,)), 0))
    o = fold(block.get_submodule(layout.o))
    H, KV = parts[0][0].sizes[parts[0][1]] // hd, parts[1][0].sizes[parts[1][1]] // hd
    widths = [proj.sizes[p] for proj, p in parts]
    if any(w % hd for w in widths) or widths[1] != widths[2] or o.in_features != widths[0] or KV == 0 or H % KV:
        raise LayoutMismatch(f"q/k/v/o widths {widths + [o.in_features]} do not fit heads of size {hd}")
    return parts, o, H, KV


def _shrinking_heads(qr: Tensor, kr: Tensor, vr: Tensor, oc: Tensor, H: int, hd: int) -> _HeadPlan:
    qk = (qr & kr).view(H, hd)
    vo = (vr & oc).view(H, hd)
    heads = idx(vo.any(1))
    if heads.numel() == 0:  # attention contributes only o's bias: keep one all-zero head of size 1
        heads = torch.zeros(1, dtype=torch.long, device=qk.device)
    D = max(1, int(qk[heads].sum(1).max()), int(vo[heads].sum(1).max()))
    # Round the head size up to a multiple of 8 (zero-filled dims, exact): torch's CPU attention
    # kernel was measured slower at head sizes 25..31 than at 32 (up to 1.3x at 31, 128 tokens).
    D = min(hd, -(-D // 8) * 8) if D > 1 else D

    def packed(open_dims: Tensor) -> PartPlan:
        """Per kept head: the open dims first, placed at the start of its D-wide slot."""
        src, slots = [], []
        for j, h in enumerate(heads.tolist()):
            d = idx(open_dims[h])
            src.append(h * hd + d)
            slots.append(j * D + torch.arange(d.numel(), device=d.device))
        return PartPlan(torch.cat(src), torch.cat(slots), heads.numel() * D)

    qk_plan, v_plan = packed(qk), packed(vo)
    n = int(heads.numel())
    return _HeadPlan(qk_plan, qk_plan, v_plan, v_plan, n, n, D)


def _partner(hd: int, rotary: str, rotary_dim: int, device) -> Tensor:
    """For each dim of a head, the dim it is mixed with by the rotary embedding (itself if none)."""
    d = torch.arange(hd, device=device)
    r = rotary_dim
    if rotary == "half":
        return torch.where(d < r, (d + r // 2) % max(r, 1), d)
    if rotary == "interleaved":
        return torch.where(d < r, d ^ 1, d)
    return d


def _fixed_heads(qr, kr, vr, oc, H: int, KV: int, hd: int, layout: AttentionLayout, partner: Tensor) -> _HeadPlan:
    G = H // KV
    qr, kr, vr, oc = qr.view(H, hd), kr.view(KV, hd), vr.view(KV, hd), oc.view(H, hd)
    head_val = vr.repeat_interleave(G, 0) & oc  # query head h, dim d carries a value to the output
    if layout.heads_removable:
        groups = idx(head_val.view(KV, G * hd).any(1))
        if groups.numel() == 0:  # attention contributes only o's bias: keep one group, all zero
            groups = torch.zeros(1, dtype=torch.long, device=qr.device)
    else:
        groups = torch.arange(KV, device=qr.device)
    qheads = (groups[:, None] * G + torch.arange(G, device=groups.device)).flatten()

    def pair(m: Tensor) -> Tensor:  # open at d or at its rotary partner
        return m | m[..., partner]

    if layout.qk_norm:  # every open dim feeds its head's norm
        q_need, k_need = qr, kr
    else:
        q_need = qr & pair(kr.repeat_interleave(G, 0))
        k_need = kr & pair(qr.view(KV, G, hd).any(1))
    v_need = vr & head_val.view(KV, G, hd).any(1)

    def rows_of(need: Tensor, heads: Tensor) -> PartPlan:
        slots = idx(need[heads].flatten())
        src = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()[slots]
        return PartPlan(src, slots, heads.numel() * hd)

    return _HeadPlan(rows_of(q_need, qheads), rows_of(k_need, groups), rows_of(v_need, groups),
                     rows_of(head_val, qheads), int(qheads.numel()), int(groups.numel()), hd)


def _rotary_dim(model: nn.Module, attn: nn.Module, layout: AttentionLayout, hd: int) -> int:
    """Rotary dims per head: the module's attribute if the layout names one, else the config's
    ``partial_rotary_factor`` (top level or in ``rope_parameters``, per layer type too) x head size."""
    if layout.rotary_dim:
        return int(getattr(attn, layout.rotary_dim))
    config = getattr(model, "config", None)
    factor = getattr(config, "partial_rotary_factor", None)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        for params in [rope] + [v for v in rope.values() if isinstance(v, dict)]:
            factor = params.get("partial_rotary_factor", factor)
    return int(hd * (1.0 if factor is None else float(factor)))


def head_projections(prefix: str, block: nn.Module, layout: AttentionLayout):
    """(q, k, v) as (Projection, part) pairs, the folded o projection, the head counts (H, KV) and
    the head size of ``block``'s attention; LayoutMismatch where it does not fit ``layout``."""
    attn = submodule(block, layout.module, prefix)
    hd = getattr(attn, layout.head_size, None)
    if not isinstance(hd, int) or hd <= 0:
        raise LayoutMismatch(f"{prefix}{layout.module}.{layout.head_size} is {hd!r}, not a head size")
    parts, o, H, KV = _projections(prefix, block, layout, hd)
    return parts, o, H, KV, hd


def compact_attention(rewrites: Rewrites, prefix: str, block: nn.Module, layout: AttentionLayout) -> None:
    """Shrinks the attention of ``block`` (named ``prefix``) in place; raises LayoutMismatch,
    before changing anything, when the block does not fit ``layout``."""
    attn = submodule(block, layout.module, prefix)
    parts, o, H, KV, hd = head_projections(prefix, block, layout)
    qr, kr, vr = (proj.part_rows(p) for proj, p in parts)
    if layout.head_size_shrinks:
        if H != KV:
            raise LayoutMismatch("shrinking heads need as many kv heads as query heads")
        plan = _shrinking_heads(qr, kr, vr, o.cols, H, hd)
    else:
        r = _rotary_dim(rewrites.model, attn, layout, hd) if layout.rotary else 0
        if r % 2 or r > hd:
            raise LayoutMismatch(f"rotary dims {r} do not fit heads of size {hd}")
        plan = _fixed_heads(qr, kr, vr, o.cols, H, KV, hd, layout, _partner(hd, layout.rotary, r, qr.device))
    _write(rewrites, parts, (plan.q, plan.k, plan.v), plan.head_size)
    rewrites.replace(prefix + layout.o, build(o, idx(o.rows), plan.o.src, out_width=o.out_features,
                                                  in_width=plan.o.width, in_slots=plan.o.slots))
    quantities = plan.quantities()
    rewrites.set_attrs(attn, {a: quantities[q] for a, q in layout.set_attrs.items()}, COMPACT_ATTRS)


def _write(rewrites: Rewrites, parts: List[Tuple[Projection, int]], plans: Tuple[PartPlan, ...], head_size: int) -> None:
    """Replaces each projection by its compacted layer (a fused one gets all its parts' plans)."""
    by_proj: Dict[int, Tuple[Projection, List[PartPlan]]] = {}
    for (proj, _), plan in zip(parts, plans):
        by_proj.setdefault(id(proj), (proj, []))[1].append(plan)
    for proj, proj_plans in by_proj.values():
        rewrites.replace(proj.name, proj.layer(proj_plans, head_size))
