"""``compact``: turn a gated model into a physically smaller one with the same eval outputs.

Every gated Linear is replaced by its active block with the eval gates (and LoRA) folded into the
weight. Where two layers meet on a dimension that no residual connection reads, the dimension
itself shrinks and no gather or scatter is left: the MLP intermediate (:mod:`.mlp`) and
attention heads and per-head dims (:mod:`.attention`). Which modules meet where is data: the
block's :class:`~finegates.compaction.layouts.BlockLayout` (BERT, RoBERTa, DistilBERT, GPT-2, GPT-NeoX, OPT,
LLaMA, Mistral, Qwen2, Qwen3, Gemma 1-3, Phi-3 are built in; :func:`finegates.register_layout` adds
more). A block without one still gets its MLP shrunk when it is recognised from its modules alone.

Every other gated Linear (residual-stream inputs and outputs, attention of unknown blocks) becomes a
:class:`GatheredLinear` (``fg::gathered_linear``). Each compacted layer holds at most ``|R| x |C|``
weights, so the parameter count drops at least by what :func:`finegates.compression_report`
promised. Embeddings and heads are never touched, so tied weights stay one tensor.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .attention import COMPACT_ATTRS, compact_attention
from .mlp import compact_mlp, recognise_mlp
from .folding import COUNTING, PORTABLE, LayerCount, LayoutMismatch, Rewrites, fold, plain_linear, residual_layer
from .modules import GatheredLinear
from ..layers import GatedLinear, set_submodule
from .layouts import BlockLayout, layout_for

__all__ = ["compact", "compact_size", "make_portable", "paired_blocks", "paired_sides", "COMPACT_ATTRS"]

_HOW_TO_REGISTER = "register its layout with finegates.register_layout (README, 'Compaction')"


def compact(model: nn.Module, *, portable: bool = False, progress: bool = False) -> nn.Module:
    """Compacts ``model`` in place (eval mode, no gates left) and returns it.

    Blocks with a registered layout shrink their paired dimensions; every other gated Linear becomes
    a :class:`GatheredLinear` on its active block, with a warning naming the blocks whose pairings
    were not used and how to register a layout. The compact model's outputs equal the gated model's
    eval outputs up to float rounding, and it has exactly the parameters :func:`compact_size` counts.

    ``portable=True``: every layer is a stock ``nn.Linear`` (no ``fg`` op, so ``torch.export``,
    ONNX and a plain PyTorch install can run it): paired dimensions still shrink, and where a gather
    or scatter would be left the layer keeps its full residual width with zero rows/columns instead
    (exact, but those layers keep their full size). ``progress=True``: a progress bar over the blocks.
    """
    if not any(isinstance(m, GatedLinear) for m in model.modules()):
        raise ValueError("compact: the model has no GatedLinear layer (call finegates.sparsify first)")
    _check_gates(model)
    token = PORTABLE.set(bool(portable))
    try:
        with torch.no_grad():
            model.eval()
            _warn_unpaired(_rewrite(Rewrites(model), progress))
    finally:
        PORTABLE.reset(token)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_portable(model: nn.Module) -> nn.Module:
    """A compact model (from :func:`compact` or :func:`finegates.load_compact`) made portable in
    place: every :class:`GatheredLinear` becomes the zero-filled ``nn.Linear`` that
    ``compact(..., portable=True)`` builds, so a saved compact model needs no ``fg`` op to run."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, GatheredLinear)]:
        set_submodule(model, name, plain_linear(m))
    return model


@torch.no_grad()
def compact_size(model: nn.Module, *, masks: Optional[Mapping[GatedLinear, Tuple[Tensor, Tensor]]] = None,
                 portable: bool = False) -> Dict[str, Tuple[int, LayerCount]]:
    """What :func:`compact` would make of ``model``, without changing it: per module it would
    replace, ``(parameters now, LayerCount of the replacement)``. The same plan as ``compact``
    (paired dimensions, head sizes, width padding), only counted. ``masks``: hypothetical open
    (rows, columns) per gated layer instead of its eval gates' (layers not named keep their own)."""
    tokens = COUNTING.set(dict(masks or {})), PORTABLE.set(bool(portable))
    try:
        rewrites = Rewrites(model, counting=True)
        _rewrite(rewrites, progress=False)
    finally:
        COUNTING.reset(tokens[0])
        PORTABLE.reset(tokens[1])
    return {name: (rewrites.original_params[name], layer) for name, layer in rewrites.layers.items()}


def _rewrite(rewrites: Rewrites, progress: bool) -> Dict[str, Tuple[str, int]]:
    """The whole plan: paired dimensions block by block, then every gated layer left on its own
    active block. Returns the blocks whose pairings were not used (see _compact_blocks)."""
    unpaired = _compact_blocks(rewrites, progress)
    for name, m in [(n, m) for n, m in rewrites.model.named_modules() if isinstance(m, GatedLinear)]:
        if name not in rewrites.layers:
            rewrites.replace(name, residual_layer(fold(m)))
    return unpaired


def _check_gates(model: nn.Module) -> None:
    """Every gate logit finite, before anything changes: a NaN half-way would leave the model half
    compacted."""
    for name, m in model.named_modules():
        if isinstance(m, GatedLinear):
            for side, gates in (("row_gates", m.row_gates), ("col_gates", m.col_gates)):
                if not bool(torch.isfinite(gates.theta).all()):
                    raise ValueError(f"compact: {name}.{side} has NaN or infinite logits; the model was not changed")


def _gated(block: nn.Module, paths) -> bool:
    found = False
    for p in paths:
        try:
            found |= isinstance(block.get_submodule(p), GatedLinear)
        except AttributeError:
            pass
    return found


def paired_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Modules with a registered layout, and elements of an ``nn.ModuleList`` (transformer blocks)."""
    found, inside = [], set()
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if layout_for(mod) is not None:
            found.append((name, mod))
            inside.add(name + ".")
        elif isinstance(mod, nn.ModuleList):
            for i, child in enumerate(mod):
                if layout_for(child) is None and any(isinstance(m, GatedLinear) for m in child.modules()):
                    found.append((f"{name}.{i}" if name else str(i), child))
                    inside.add(f"{name}.{i}." if name else f"{i}.")
    return found


def paired_sides(model: nn.Module) -> Dict[nn.Module, Tuple[bool, bool]]:
    """Per Linear inside a block compaction knows, (rows, columns): whether that side is a dimension
    compaction shrinks with a partner (q/k/v rows and o columns of attention, the MLP's up rows and
    down columns) rather than a side that reads or writes the residual stream. Linears it does not
    pair are absent."""
    sides: Dict[nn.Module, List[bool]] = {}

    def mark(block: nn.Module, path: str, side: int) -> None:
        try:
            module = block.get_submodule(path)
        except AttributeError:
            return
        sides.setdefault(module, [False, False])[side] = True

    for _, block in paired_blocks(model):
        layout = layout_for(block)
        attention = layout.attention if layout is not None else None
        mlp = layout.mlp if layout is not None else recognise_mlp(block)
        if attention is not None:
            for path in ([attention.qkv] if attention.qkv else [attention.q, attention.k, attention.v]):
                mark(block, path, 0)
            mark(block, attention.o, 1)
        if mlp is not None:
            for path in mlp.up:
                mark(block, path, 0)
            mark(block, mlp.down, 1)
    return {m: (rows, cols) for m, (rows, cols) in sides.items()}


def _compact_blocks(rewrites: Rewrites, progress: bool = False) -> Dict[str, Tuple[str, int]]:
    """Compacts the paired dimensions of every block; returns, per block class whose pairings were
    (partly) not used, why and how many of its gated layers are left (to be gathered one by one)."""
    from tqdm.auto import tqdm

    notes: Dict[str, str] = {}
    left: Dict[str, int] = {}
    for name, block in tqdm(paired_blocks(rewrites.model), desc="compact", disable=not progress, leave=False, dynamic_ncols=True):
        prefix = name + "." if name else ""
        layout = layout_for(block)
        cls = type(block).__name__
        if layout is None:
            mlp = recognise_mlp(block)
            notes.setdefault(cls, "has no registered layout" + (": its MLP was recognised and shrunk" if mlp else ""))
            layout = BlockLayout(family="recognised", blocks=(cls,), mlp=mlp)
        for part, run in ((layout.attention, compact_attention), (layout.mlp, compact_mlp)):
            if part is None or not _gated(block, part.projections):
                continue
            try:
                run(rewrites, prefix, block, part)
            except LayoutMismatch as e:
                notes.setdefault(cls, f"does not match the {layout.family} layout ({e})")
        outside = [n for n, m in block.named_modules() if isinstance(m, GatedLinear) and prefix + n not in rewrites.layers]
        if outside and cls not in notes:
            notes[cls] = f"has gated layers outside its {layout.family} layout ({', '.join(outside[:3])})"
        left[cls] = left.get(cls, 0) + len(outside)
    return {cls: (why, left[cls]) for cls, why in notes.items() if left.get(cls)}


def _warn_unpaired(unpaired: Dict[str, Tuple[str, int]]) -> None:
    """One warning per block class whose gated layers are left to be gathered one by one."""
    for cls, (why, count) in sorted(unpaired.items()):
        warnings.warn(
            f"compact: block {cls} {why}; its other {count} gated layers were compacted one by one with "
            f"fg::gathered_linear, so their paired dimensions (attention heads, MLP intermediate) were not "
            f"shrunk. To shrink them, {_HOW_TO_REGISTER}.",
            stacklevel=3,
        )
