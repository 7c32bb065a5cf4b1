"""The compact model's expected size as a differentiable function of the gates' keep probabilities.

:func:`finegates.compact` removes a dimension that two layers share once either side closes it, so
the size a set of gates buys is not a sum over layers. :class:`ExpectedSize` mirrors the plan that
compaction executes, block by block, with every mask replaced by its keep probability:

- an MLP unit is kept with probability ``p(down column) * prod p(up row)`` (the activated up row
  only where ``act(0) == 0``), and the up rows and down columns it holds count once;
- shrinking attention heads (BERT, GPT-2, OPT, DistilBERT): a q/k dim is kept with probability
  ``p(q row) * p(k row)`` times the probability that its head is kept (some dim of its value path
  open), a v/o dim with ``p(v row) * p(o column)``; each counts once per side (the head size
  compaction pads to is zero-filled by a scatter and holds no parameters);
- every other gated layer (residual-stream sides, fixed-size rotary heads, unknown blocks) counts
  ``E|rows| * E|cols| + bias * E|rows|`` on its own.

The surrogate ignores the MLP's width padding and treats dims as independent; the budget controller
(:mod:`finegates.budget`) corrects its level with the exact count of :func:`compression_report`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .compaction.compact import paired_blocks
from .compaction.attention import head_projections
from .compaction.mlp import activation_of, act_keeps_zero, up_projections
from .compaction.folding import COUNTING, LayoutMismatch
from .layers import GatedLinear
from .compaction.layouts import BlockLayout, layout_for

__all__ = ["ExpectedSize", "KeepProbabilities", "keep_probabilities"]

# {GatedLinear: (row keep probabilities, column keep probabilities)}
KeepProbabilities = Mapping[GatedLinear, Tuple[Tensor, Tensor]]
_Term = Callable[[KeepProbabilities], Tensor]
_Rows = Tuple[GatedLinear, Union[Tensor, slice]]  # a gated layer and the rows of one of its parts

def keep_probabilities(model: nn.Module) -> Dict[GatedLinear, Tuple[Tensor, Tensor]]:
    """Every gated layer's keep probabilities, read from its gates (outside FSDP)."""
    return {m: (m.row_gates.keep_probability(), m.col_gates.keep_probability())
            for m in model.modules() if isinstance(m, GatedLinear)}


def _bias(layer: GatedLinear) -> float:
    return 1.0 if layer.bias is not None else 0.0


def _layer_term(layer: GatedLinear) -> _Term:
    def term(p: KeepProbabilities) -> Tensor:
        rows = p[layer][0].sum()
        return rows * (p[layer][1].sum() + _bias(layer))
    return term


def _width_cost(layers: Sequence[GatedLinear], p: KeepProbabilities, width: Tensor) -> Tensor:
    """Parameters of ``width`` kept rows in each part of ``layers`` (a fused layer once per part)."""
    return sum(width * (p[m][1].sum() + _bias(m)) for m in layers)


def _mlp_term(ups: List[Tuple[_Rows, bool]], down: GatedLinear) -> _Term:
    def term(p: KeepProbabilities) -> Tensor:
        unit = p[down][1]
        for (layer, rows), counted in ups:
            if counted:
                unit = unit * p[layer][0][rows]
        width = unit.sum()
        down_rows = p[down][0].sum()
        return _width_cost([layer for (layer, _), _ in ups], p, width) + down_rows * (width + _bias(down))
    return term


def _attention_term(q: _Rows, k: _Rows, v: _Rows, o: GatedLinear, heads: int, head_size: int) -> _Term:
    def term(p: KeepProbabilities) -> Tensor:
        qk = (p[q[0]][0][q[1]] * p[k[0]][0][k[1]]).view(heads, head_size)
        vo = (p[v[0]][0][v[1]] * p[o][1]).view(heads, head_size)
        head_kept = 1 - torch.prod(1 - vo, 1)  # a head goes with its whole value path
        qk_width, vo_width = (qk.sum(1) * head_kept).sum(), vo.sum()
        cost = sum(w * (p[m][1].sum() + _bias(m)) for m, w in ((q[0], qk_width), (k[0], qk_width), (v[0], vo_width)))
        o_rows = p[o][0].sum()
        return cost + o_rows * (vo_width + _bias(o))
    return term


def _rows(block: nn.Module, prefix: str, proj, part: int) -> _Rows:
    """The layer of one part and its rows: a slice where they are one run (a view, whose backward is
    free; an index tensor would cost a gather and a scatter per step), else an index tensor."""
    layer = block.get_submodule(proj.name[len(prefix):])
    local = torch.arange(proj.sizes[part], device=layer.weight.device)
    rows = proj.source(part, local)
    start = int(rows[0]) if rows.numel() else 0
    if torch.equal(rows, torch.arange(start, start + rows.numel(), device=rows.device)):
        return layer, slice(start, start + rows.numel())
    return layer, rows


def _gated(block: nn.Module, prefix: str, parts) -> bool:
    return all(isinstance(block.get_submodule(proj.name[len(prefix):]), GatedLinear) for proj, _ in parts)


def _block_terms(block: nn.Module, prefix: str, layout: BlockLayout) -> Tuple[List[_Term], List[GatedLinear]]:
    """The paired terms of one block and the gated layers they cover (none where the block does not
    fit its layout or a side of a pairing is not gated: those layers count on their own)."""
    terms: List[_Term] = []
    covered: List[GatedLinear] = []
    att = layout.attention
    if att is not None and att.head_size_shrinks:
        try:
            parts, o_name, heads, kv_heads, hd = head_projections(prefix, block, att)
            o = block.get_submodule(att.o)
            if heads == kv_heads and _gated(block, prefix, parts) and isinstance(o, GatedLinear):
                q, k, v = (_rows(block, prefix, proj, part) for proj, part in parts)
                terms.append(_attention_term(q, k, v, o, heads, hd))
                covered += list({id(r[0]): r[0] for r in (q, k, v)}.values()) + [o]
        except (LayoutMismatch, AttributeError):
            pass
    if layout.mlp is not None:
        try:
            down = block.get_submodule(layout.mlp.down)
            ups = up_projections(prefix, block, layout.mlp, down.in_features)
            act = activation_of(block, layout.mlp, prefix)
            if isinstance(down, GatedLinear) and _gated(block, prefix, ups):
                rows = [_rows(block, prefix, proj, part) for proj, part in ups]
                first = rows[0][0]
                counted = [i > 0 or act_keeps_zero(act, first.weight.dtype, first.weight.device) for i in range(len(rows))]
                terms.append(_mlp_term(list(zip(rows, counted)), down))
                covered += list({id(r[0]): r[0] for r in rows}.values()) + [down]
        except (LayoutMismatch, AttributeError):
            pass
    return terms, covered


class ExpectedSize:
    """``ExpectedSize(model)(probs)``: the expected fraction of the gated layers' parameters
    (weights and biases) that the compact model keeps, differentiable in ``probs``
    (:data:`KeepProbabilities` of every gated layer). Built once per model; its structure is the
    model's, so it holds for any later gate values."""

    def __init__(self, model: nn.Module):
        gated = [m for m in model.modules() if isinstance(m, GatedLinear)]
        if not gated:
            raise ValueError("ExpectedSize: the model has no gated layer (call finegates.sparsify first)")
        self.terms: List[_Term] = []
        covered: Dict[int, GatedLinear] = {}
        token = COUNTING.set({})  # the layout walk folds masks only
        try:
            for name, block in paired_blocks(model):
                layout = layout_for(block) or BlockLayout(family="recognised", blocks=(type(block).__name__,),
                                                          mlp=_recognised(block))
                terms, layers = _block_terms(block, name + "." if name else "", layout)
                self.terms += terms
                covered.update({id(m): m for m in layers})
        finally:
            COUNTING.reset(token)
        self.terms += [_layer_term(m) for m in gated if id(m) not in covered]
        self.layers = gated
        self.paired_layers = len(covered)
        self.params_gated = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in gated)

    def __call__(self, probs: KeepProbabilities) -> Tensor:
        missing = [m for m in self.layers if m not in probs]
        if missing:
            raise ValueError(f"ExpectedSize: no keep probabilities for {len(missing)} of the {len(self.layers)} gated layers")
        return torch.stack([t(probs).float() for t in self.terms]).sum() / self.params_gated


def _recognised(block: nn.Module):
    from .compaction.mlp import recognise_mlp

    return recognise_mlp(block)
