"""The primitives of compaction: fold a gated layer into one weight, build its active block as a
layer, and address the logical parts of a fused projection.

A folded layer is ``g_r ⊙ (W + s·BA) ⊙ g_c`` (and ``g_r ⊙ b``) with masks of its open rows and
columns; :func:`build` cuts a block of it out as an ``nn.Linear`` or, where a gather or scatter is
left, a :class:`GatheredLinear`. A :class:`Projection` maps the parts of a fused projection (q, k, v
of ``qkv_proj``; gate, up of ``gate_up_proj``) to its rows, before and after compaction.

The same plan also runs without building anything (:data:`COUNTING`): then :func:`fold` reads only
the masks (from the gates, or from hypothetical masks given per layer) and :func:`build` returns a
:class:`LayerCount`, so the size a compaction would give is computed by the code that compacts.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .modules import GatheredLinear
from ..layers import GatedLinear, is_linear_like

# compact(portable=True): every layer a stock nn.Linear, zero-filled where a gather or scatter would be.
PORTABLE: contextvars.ContextVar = contextvars.ContextVar("finegates_portable_compact", default=False)

# Set while a plan is only counted (finegates.plan.compact_size): the hypothetical open masks per
# gated layer ({GatedLinear: (rows, cols)}, possibly empty: then the gates' own eval masks).
COUNTING: contextvars.ContextVar = contextvars.ContextVar("finegates_counting_compact", default=None)

# Marks an nn.Linear that compact() built: save_compact records its shape, other Linears (heads,
# possibly tied to an embedding) load as the stock model defines them.
COMPACTED = "_finegates_compacted"

__all__ = ["COMPACTED", "COUNTING", "LayerCount", "Rewrites", "LayoutMismatch", "submodule", "require_linears", "Folded", "fold", "build", "plain_linear", "residual_layer", "idx", "Projection", "PartPlan", "is_linear"]


class Rewrites:
    """What compaction changes in ``model``: the modules it replaces and the attributes it sets.
    Applied at once, or (``counting``) only recorded, with :class:`LayerCount` s for layers."""

    def __init__(self, model: nn.Module, counting: bool = False):
        self.model = model
        self.counting = counting
        self.layers: Dict[str, Union[nn.Module, "LayerCount"]] = {}
        self.original_params: Dict[str, int] = {}

    def replace(self, name: str, layer) -> None:
        old = self.model.get_submodule(name)
        self.original_params[name] = old.weight.numel() + (old.bias.numel() if getattr(old, "bias", None) is not None else 0)
        self.layers[name] = layer
        if not self.counting:
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer)

    def set_attrs(self, module: nn.Module, attrs: Dict[str, int], record: str) -> None:
        """Sets the attributes the module's forward reads (head counts ...) and records them in
        attribute ``record`` for save/load."""
        if self.counting or not attrs:
            return
        for a, v in attrs.items():
            setattr(module, a, v)
        setattr(module, record, attrs)


def idx(mask: Tensor) -> Tensor:
    """Indices of the True entries of a 1-D mask (int64)."""
    return torch.nonzero(mask, as_tuple=True)[0]


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, GatedLinear) or is_linear_like(m)


class LayoutMismatch(ValueError):
    """A block does not have the structure its registered layout describes."""


def submodule(block: nn.Module, path: str, prefix: str) -> nn.Module:
    """``block``'s module at ``path``, or LayoutMismatch naming ``prefix + path``."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise LayoutMismatch(f"it has no module {prefix}{path}") from None


def require_linears(block: nn.Module, paths, prefix: str) -> None:
    """Every one of ``paths`` is a Linear (gated or not), else LayoutMismatch naming it."""
    for path in paths:
        m = submodule(block, path, prefix)
        if not is_linear(m):
            raise LayoutMismatch(f"{prefix}{path} is a {type(m).__name__}, not a Linear")


@dataclass
class Folded:
    """A Linear as (out, in) with eval gates and LoRA folded in, and its open rows/columns.
    ``weight``/``bias`` are None while a plan is only counted (the masks are all it needs)."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    rows: Tensor  # bool (N,)
    cols: Tensor  # bool (K,)
    has_bias: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def out_features(self) -> int:
        return self.rows.numel()

    @property
    def in_features(self) -> int:
        return self.cols.numel()

    def zero_rows(self, rows: Tensor) -> None:
        """Zeroes folded rows (weights and bias) that are computed but must contribute nothing."""
        if self.weight is not None:
            self.weight[rows] = 0
            if self.bias is not None:
                self.bias[rows] = 0

    def zero_cols(self, cols: Tensor) -> None:
        if self.weight is not None:
            self.weight[:, cols] = 0


def _gate_masks(module: nn.Module):
    """(open rows, open columns) of a gated layer's eval gates, or of hypothetical masks being counted."""
    given = (COUNTING.get() or {}).get(module)
    if given is not None:
        return given[0].bool(), given[1].bool()
    return module.row_gates.eval_values() != 0, module.col_gates.eval_values() != 0


@torch.no_grad()
def fold(module: nn.Module) -> Folded:
    """Folds ``g_r ⊙ (W + s·BA) ⊙ g_c`` and ``g_r ⊙ b`` in fp32, cast back to the weight's dtype.
    An ungated Linear/Conv1D folds with all gates 1. While counting, only the masks."""
    if not (isinstance(module, GatedLinear) or is_linear_like(module)):
        raise TypeError(f"compact: cannot fold a {type(module).__name__}")
    b = getattr(module, "bias", None)
    dtype = module.weight.dtype
    if COUNTING.get() is not None:
        if isinstance(module, GatedLinear):
            rows, cols = _gate_masks(module)
        else:
            n, k = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
            rows = torch.ones(n, dtype=torch.bool, device=module.weight.device)
            cols = torch.ones(k, dtype=torch.bool, device=module.weight.device)
        return Folded(None, None, rows, cols, b is not None, dtype)
    if isinstance(module, GatedLinear):
        w = module.dense_weight().float()
        if module.lora_a is not None:
            w = w + float(module.lora_scale) * (module.lora_b.float() @ module.lora_a.float())
        gr = module.row_gates.eval_values().float()
        gc = module.col_gates.eval_values().float()
    else:
        w = module.weight.float()
        if not isinstance(module, nn.Linear):  # GPT-2 Conv1D stores (in, out)
            w = w.t()
        gr = torch.ones(w.shape[0], device=w.device)
        gc = torch.ones(w.shape[1], device=w.device)
    weight = (gr[:, None] * w * gc[None, :]).to(dtype)
    bias = None if b is None else (gr * b.float()).to(b.dtype)
    return Folded(weight, bias, gr != 0, gc != 0, b is not None, dtype)


@dataclass(frozen=True)
class LayerCount:
    """What :func:`build` would make, counted: its parameters and whether it gathers or scatters."""

    out_features: int
    in_features: int
    params: int
    gathered: bool


def _placement(pos: Tensor, width: Optional[int]) -> Optional[Tensor]:
    """``pos`` as an index list into a ``width`` wide tensor, or None where no gather/scatter is
    needed (no width given, or ``pos`` is exactly 0..width-1)."""
    if width is None or (pos.numel() == width and torch.equal(pos, torch.arange(width, device=pos.device))):
        return None
    return pos


def build(
    f: Folded,
    rows: Tensor,
    cols: Tensor,
    *,
    out_width: Optional[int] = None,
    out_slots: Optional[Tensor] = None,
    in_width: Optional[int] = None,
    in_slots: Optional[Tensor] = None,
) -> nn.Module:
    """The block ``f.weight[rows][:, cols]`` (and ``f.bias[rows]``) as a layer.

    With ``out_width`` its outputs land at positions ``out_slots`` (default: ``rows``) of an
    ``out_width`` wide output, exact zeros elsewhere; with ``in_width`` it reads its inputs from
    positions ``in_slots`` (default: ``cols``) of an ``in_width`` wide input. An ``nn.Linear`` when
    neither placement is needed (or under ``PORTABLE``, zero-filled), else a :class:`GatheredLinear`.
    ``rows``/``cols`` are int64. While counting, a :class:`LayerCount` of that layer."""
    if COUNTING.get() is not None:
        return _count(f, rows, cols, out_width, out_slots, in_width, in_slots)
    w = f.weight.index_select(0, rows).index_select(1, cols).contiguous()
    b = None if f.bias is None else f.bias.index_select(0, rows).contiguous()
    row_idx = _placement(rows if out_slots is None else out_slots, out_width)
    col_idx = _placement(cols if in_slots is None else in_slots, in_width)
    if PORTABLE.get() and (row_idx is not None or col_idx is not None):
        w, b = _zero_filled(w, b, row_idx, col_idx, out_width, in_width)
        row_idx = col_idx = None
    if row_idx is None and col_idx is None:
        return _compacted_linear(w, b)
    return GatheredLinear.from_block(
        w,
        b,
        row_idx,
        col_idx,
        in_features=in_width if col_idx is not None else w.shape[1],
        out_features=out_width if row_idx is not None else w.shape[0],
    )


def _count(f: Folded, rows, cols, out_width, out_slots, in_width, in_slots) -> LayerCount:
    """The layer :func:`build` would make, as numbers (same placement rules)."""
    row_idx = _placement(rows if out_slots is None else out_slots, out_width)
    col_idx = _placement(cols if in_slots is None else in_slots, in_width)
    n, k = rows.numel(), cols.numel()
    gathered = row_idx is not None or col_idx is not None
    if PORTABLE.get() and gathered:  # zero-filled to the full widths
        n = out_width if row_idx is not None else n
        k = in_width if col_idx is not None else k
        gathered = False
    return LayerCount(out_width if row_idx is not None else n, in_width if col_idx is not None else k,
                      n * k + (n if f.has_bias else 0), gathered)


def _zero_filled(w: Tensor, b: Optional[Tensor], row_idx, col_idx, out_width, in_width):
    """The block placed in a full-width weight, zeros elsewhere: a plain Linear computes exactly what
    the gather / scatter would (portable compaction)."""
    n = out_width if row_idx is not None else w.shape[0]
    k = in_width if col_idx is not None else w.shape[1]
    full = w.new_zeros(n, k)
    r = row_idx if row_idx is not None else torch.arange(w.shape[0], device=w.device)
    c = col_idx if col_idx is not None else torch.arange(w.shape[1], device=w.device)
    full[r[:, None], c[None, :]] = w
    bias = None
    if b is not None:
        bias = b.new_zeros(n)
        bias[r] = b
    return full, bias


def plain_linear(m: GatheredLinear) -> nn.Linear:
    """A GatheredLinear as the stock ``nn.Linear`` that portable compaction builds in its place: its
    block in a full-width weight, zeros elsewhere (the same outputs, no ``fg`` op)."""
    w, b = _zero_filled(m.weight.detach(), None if m.bias is None else m.bias.detach(), m.row_idx, m.col_idx,
                        m.out_features, m.in_features)
    return _compacted_linear(w, b)


def _compacted_linear(w: Tensor, b: Optional[Tensor]) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``w`` and ``b``, marked as built by compaction."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    lin.requires_grad_(False)
    setattr(lin, COMPACTED, True)
    return lin


def residual_layer(f: Folded) -> nn.Module:
    """A layer reading and writing full-width tensors: gather open columns, scatter open rows."""
    return build(f, idx(f.rows), idx(f.cols), out_width=f.out_features, in_width=f.in_features)


@dataclass
class PartPlan:
    """What one logical part of a projection keeps: its rows ``src`` (part-local) written to
    ``slots`` of its new ``width`` wide output."""

    src: Tensor
    slots: Tensor
    width: int

    @classmethod
    def compact(cls, keep: Tensor) -> "PartPlan":
        """Rows ``keep`` packed densely (no scatter)."""
        return cls(keep, torch.arange(keep.numel(), device=keep.device), int(keep.numel()))


class Projection:
    """A Linear whose outputs stack logical parts: ``"concat"`` (``[p0 | p1 | ...]``) or
    ``"per_head"`` (per head ``[p0_h | p1_h | ...]``, all parts ``head_size`` wide per head).
    An unfused Linear is a projection with one part."""

    def __init__(self, name: str, folded: Folded, sizes: Sequence[int], split: str = "concat", head_size: int = 0):
        if sum(sizes) != folded.out_features:
            raise ValueError(f"{name}: parts {tuple(sizes)} do not add up to its {folded.out_features} outputs")
        self.name, self.folded, self.sizes, self.split, self.head_size = name, folded, tuple(sizes), split, head_size

    def source(self, part: int, local: Tensor) -> Tensor:
        """Rows of the fused layer that hold rows ``local`` of ``part``."""
        if self.split == "concat":
            return sum(self.sizes[:part]) + local
        hd, n = self.head_size, len(self.sizes)
        return (local // hd) * (n * hd) + part * hd + local % hd

    def part_rows(self, part: int) -> Tensor:
        """Open-row mask of one part."""
        local = torch.arange(self.sizes[part], device=self.folded.rows.device)
        return self.folded.rows[self.source(part, local)]

    def layer(self, plans: List[PartPlan], new_head_size: int = 0) -> nn.Module:
        """The compacted layer: every part's kept rows, placed at their slots in the new layout."""
        src = torch.cat([self.source(p, plan.src) for p, plan in enumerate(plans)])
        if self.split == "concat":
            offsets = torch.cumsum(torch.tensor([0] + [p.width for p in plans[:-1]]), 0).tolist()
            slots = torch.cat([off + plan.slots for off, plan in zip(offsets, plans)])
        else:
            d, n = new_head_size, len(plans)
            slots = torch.cat([(plan.slots // d) * (n * d) + p * d + plan.slots % d for p, plan in enumerate(plans)])
        order = torch.argsort(slots)  # rows in output order: an all-kept fused layer stays a plain Linear
        src, slots = src[order], slots[order]
        width = sum(p.width for p in plans)
        f = self.folded
        return build(f, src, idx(f.cols), out_width=width, out_slots=slots, in_width=f.in_features)

    def row_cost(self) -> int:
        """Parameters a kept row holds: its open columns, and its bias if any."""
        return int(self.folded.cols.sum()) + int(self.folded.has_bias)
