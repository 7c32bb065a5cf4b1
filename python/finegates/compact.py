"""``compact``: turn a gated model into a physically smaller one with the same eval outputs.

Every gated Linear is replaced by its active block with the eval gates (and LoRA) folded into the
weight. Where two layers meet on a dimension that no residual connection reads, the dimension
itself shrinks and no gather or scatter is left:

- MLP intermediate: BERT/RoBERTa ``intermediate.dense`` rows ∩ ``output.dense`` columns; LLaMA-like
  ``gate_proj`` rows ∩ ``up_proj`` rows ∩ ``down_proj`` columns (a closed row feeds ``act(0) = 0``).
- attention, BERT/RoBERTa: heads whose value path (value rows ∩ output columns) is closed are
  removed; the remaining heads shrink to one head size D per layer (the largest open set,
  rounded up to a multiple of 8 for the attention kernel's sake, at most the original size; the
  attention keeps its original softmax scale), query/key keep only dims open on both sides, value
  only dims open on both sides, zero-filled up to D.
- attention, LLaMA/Mistral/Qwen2: the head size is shared by q, k, v and fixes the rotary
  frequencies, so heads do not shrink; a KV head is removed with its whole group of query heads
  when none of them has an open value path (GQA group size stays uniform); q/k rows are computed
  only where the rotary pair (d, d + head_dim/2) can meet an open dim on the other side.

A head whose query or key side is fully closed is *not* removed: its scores are all equal, so it
outputs the mean of its values, not zero. Every other gated Linear (residual-stream inputs and
outputs, unknown architectures) becomes a :class:`GatheredLinear` (``fg::gathered_linear``).
Each compacted layer holds at most ``|R| x |C|`` weights, so the parameter count drops at least by
what :func:`finegates.compression_report` promised. One exception keeps that total: the MLP
intermediate width is padded to a multiple of 16 with zeroed closed dims (friendlier GEMM widths)
only where the MLP still holds no more than its promised ``sum |R| x |C|``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .compact_layers import GatheredLinear
from .layers import GatedLinear, is_linear_like
from .sparsify import set_submodule

__all__ = ["compact", "COMPACT_ATTRS", "KNOWN_FAMILIES"]


KNOWN_FAMILIES = ("BERT", "RoBERTa", "LLaMA", "Mistral", "Qwen2")
_BERT_LAYERS = ("BertLayer", "RobertaLayer")
_LLAMA_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")

# Name of the per-module dict of attributes that compact() changed (head counts, head sizes);
# save_compact stores it and load_compact sets it again on a fresh stock model.
COMPACT_ATTRS = "_finegates_compact_attrs"


@dataclass
class _Folded:
    """A Linear as (out, in) with eval gates and LoRA folded in, and its open rows/columns."""

    weight: Tensor
    bias: Optional[Tensor]
    rows: Tensor  # bool (N,)
    cols: Tensor  # bool (K,)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@torch.no_grad()
def _fold(module: nn.Module) -> _Folded:
    """Folds ``g_r ⊙ (W + s·BA) ⊙ g_c`` and ``g_r ⊙ b`` in fp32, cast back to the weight's dtype."""
    if isinstance(module, GatedLinear):
        w = module.dense_weight().float()
        if module.lora_a is not None:
            w = w + float(module.lora_scale) * (module.lora_b.float() @ module.lora_a.float())
        gr = module.row_gates.eval_values().float()
        gc = module.col_gates.eval_values().float()
        dtype = module.weight.dtype
    elif is_linear_like(module):
        w = module.weight.float()
        if not isinstance(module, nn.Linear):  # GPT-2 Conv1D stores (in, out)
            w = w.t()
        gr = torch.ones(w.shape[0], device=w.device)
        gc = torch.ones(w.shape[1], device=w.device)
        dtype = module.weight.dtype
    else:
        raise TypeError(f"compact: cannot fold a {type(module).__name__}")
    weight = (gr[:, None] * w * gc[None, :]).to(dtype)
    b = getattr(module, "bias", None)
    bias = None if b is None else (gr * b.float()).to(b.dtype)
    return _Folded(weight, bias, gr != 0, gc != 0)


def _idx(mask: Tensor) -> Tensor:
    return torch.nonzero(mask, as_tuple=True)[0]


def _placement(pos: Tensor, width: Optional[int]) -> Optional[Tensor]:
    """``pos`` as an index list into a ``width`` wide tensor, or None where no gather/scatter is
    needed (no width given, or ``pos`` is exactly 0..width-1)."""
    if width is None or (pos.numel() == width and torch.equal(pos, torch.arange(width, device=pos.device))):
        return None
    return pos


def _build(
    f: _Folded,
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
    neither placement is needed, else a :class:`GatheredLinear`. ``rows``/``cols`` are int64."""
    w = f.weight.index_select(0, rows).index_select(1, cols).contiguous()
    b = None if f.bias is None else f.bias.index_select(0, rows).contiguous()
    row_idx = _placement(rows if out_slots is None else out_slots, out_width)
    col_idx = _placement(cols if in_slots is None else in_slots, in_width)
    if row_idx is None and col_idx is None:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        lin.requires_grad_(False)
        return lin
    return GatheredLinear.from_block(
        w,
        b,
        row_idx,
        col_idx,
        in_features=in_width if col_idx is not None else w.shape[1],
        out_features=out_width if row_idx is not None else w.shape[0],
    )


def _residual_layer(f: _Folded) -> nn.Module:
    """A layer reading and writing full-width tensors: gather open columns, scatter open rows."""
    return _build(f, _idx(f.rows), _idx(f.cols), out_width=f.out_features, in_width=f.in_features)


def _act_keeps_zero(act: Callable, dtype: torch.dtype, device) -> bool:
    """True if ``act(0) == 0`` (gelu, relu, silu ...): then a closed up-projection row is removable."""
    try:
        z = act(torch.zeros(4, dtype=dtype, device=device))
    except Exception:  # pragma: no cover - unusual activation modules
        return False
    return bool((z == 0).all())


def _linear(m: nn.Module) -> bool:
    return isinstance(m, GatedLinear) or is_linear_like(m)


def _any_gated(*modules: nn.Module) -> bool:
    return any(isinstance(m, GatedLinear) for m in modules)


# --------------------------------------------------------------------------------------- MLPs


# The kept MLP intermediate width is rounded up to a multiple of this (0: off) when that costs no
# more than compression_report promised: odd GEMM widths were measured up to 1.45x slower in MKL
# (128 x 595 -> 1250 against 1264). The extra dims are closed ones whose folded up-projection rows
# (weights and bias) and down-projection columns are zeroed: they compute act(0) or anything finite,
# times a zero column, so the output is unchanged.
_PAD_INTERMEDIATE = 16


def _pad_intermediate(keep: Tensor, up_f: List[_Folded], down_f: _Folded) -> Tensor:
    """Indices of the kept intermediate dims, padded with zeroed closed dims (see above)."""
    kidx = _idx(keep)
    mult = _PAD_INTERMEDIATE
    pad = (-kidx.numel()) % mult if mult > 1 and kidx.numel() > 0 else 0
    spare = _idx(~keep)[:pad]
    if pad == 0 or spare.numel() < pad or kidx.numel() + pad >= keep.numel():
        return kidx

    def kept(width: int) -> int:  # parameters of the compacted MLP at a given intermediate width
        n = sum(width * (int(f.cols.sum()) + (f.bias is not None)) for f in up_f)
        return n + int(down_f.rows.sum()) * width + (int(down_f.rows.sum()) if down_f.bias is not None else 0)

    promised = sum(int(f.rows.sum()) * (int(f.cols.sum()) + (f.bias is not None)) for f in up_f + [down_f])
    if kept(kidx.numel() + pad) > promised:
        return kidx
    for f in up_f:
        f.weight[spare] = 0
        if f.bias is not None:
            f.bias[spare] = 0
    down_f.weight[:, spare] = 0
    return torch.sort(torch.cat((kidx, spare))).values


def _compact_mlp(model: nn.Module, ups: List[str], down: str, act: Optional[Callable]) -> None:
    """``down(act(up_1(x)) * up_2(x) ...)``: keep the intermediate dims that every up-projection
    row (if act(0) == 0, else only the non-activated ones) and the down-projection column keep."""
    up_f = [_fold(model.get_submodule(n)) for n in ups]
    down_f = _fold(model.get_submodule(down))
    keep = down_f.cols.clone()
    for i, f in enumerate(up_f):
        if i == 0 and act is not None and not _act_keeps_zero(act, f.weight.dtype, f.weight.device):
            continue  # act(0) != 0: a closed row still feeds a constant
        keep &= f.rows
    kidx = _pad_intermediate(keep, up_f, down_f)
    for n, f in zip(ups, up_f):
        set_submodule(model, n, _build(f, kidx, _idx(f.cols), in_width=f.in_features))
    set_submodule(model, down, _build(down_f, _idx(down_f.rows), kidx, out_width=down_f.out_features))


# --------------------------------------------------------------------------- BERT attention


def _compact_bert_attention(model: nn.Module, prefix: str) -> None:
    sa = model.get_submodule(prefix + "attention.self")
    names = {k: f"{prefix}attention.self.{k}" for k in ("query", "key", "value")}
    o_name = prefix + "attention.output.dense"
    q, k, v = (_fold(model.get_submodule(names[t])) for t in ("query", "key", "value"))
    o = _fold(model.get_submodule(o_name))
    H, hd = int(sa.num_attention_heads), int(sa.attention_head_size)
    qk = (q.rows & k.rows).view(H, hd)
    vo = (v.rows & o.cols).view(H, hd)
    heads = _idx(vo.any(1))
    if heads.numel() == 0:  # attention contributes only o's bias: keep one all-zero head of size 1
        heads = torch.zeros(1, dtype=torch.long, device=qk.device)
    D = max(1, int(qk[heads].sum(1).max()), int(vo[heads].sum(1).max()))
    # Round the head size up to a multiple of 8 (zero-filled dims, exact): torch's CPU attention
    # kernel was measured slower at head sizes 25..31 than at 32 (up to 1.3x at 31, 128 tokens).
    D = min(hd, -(-D // 8) * 8) if D > 1 else D

    def layout(open_dims: Tensor):
        """Per kept head: the open dims first; their source rows and their slots in the H'·D layout."""
        src, slots = [], []
        for j, h in enumerate(heads.tolist()):
            d = _idx(open_dims[h])
            src.append(h * hd + d)
            slots.append(j * D + torch.arange(d.numel(), device=d.device))
        return torch.cat(src), torch.cat(slots)

    width = heads.numel() * D
    qk_src, qk_slots = layout(qk)
    v_src, v_slots = layout(vo)
    for name, f, src, slots in ((names["query"], q, qk_src, qk_slots), (names["key"], k, qk_src, qk_slots),
                                (names["value"], v, v_src, v_slots)):
        set_submodule(model, name, _heads_in(f, src, slots, width))
    set_submodule(model, o_name, _heads_out(o, v_src, v_slots, width))
    attrs = dict(num_attention_heads=int(heads.numel()), attention_head_size=D, all_head_size=width)
    for a, val in attrs.items():
        setattr(sa, a, val)
    setattr(sa, COMPACT_ATTRS, attrs)


def _heads_in(f: _Folded, src_rows: Tensor, slots: Tensor, width: int) -> nn.Module:
    """q/k/v: rows ``src_rows`` of ``f`` (open input columns gathered) written to ``slots`` of the
    ``width`` wide head layout; the other slots are exactly 0."""
    return _build(f, src_rows, _idx(f.cols), out_width=width, out_slots=slots, in_width=f.in_features)


def _heads_out(o: _Folded, src_cols: Tensor, slots: Tensor, width: int) -> nn.Module:
    """o: columns ``src_cols`` of ``o``, read from ``slots`` of the ``width`` wide head layout,
    open rows scattered into the residual stream."""
    return _build(o, _idx(o.rows), src_cols, out_width=o.out_features, in_width=width, in_slots=slots)


def _compact_bert_layer(model: nn.Module, prefix: str, layer: nn.Module) -> None:
    _compact_bert_attention(model, prefix)
    act = getattr(layer.intermediate, "intermediate_act_fn", None)
    _compact_mlp(model, [prefix + "intermediate.dense"], prefix + "output.dense", act)


def _is_bert_layer(layer: nn.Module) -> bool:
    try:
        sa = layer.attention.self
        ok = all(_linear(getattr(sa, t)) for t in ("query", "key", "value"))
        ok = ok and _linear(layer.attention.output.dense)
        ok = ok and _linear(layer.intermediate.dense) and _linear(layer.output.dense)
        return ok and hasattr(sa, "attention_head_size") and not getattr(layer, "add_cross_attention", False)
    except AttributeError:
        return False


# -------------------------------------------------------------------------- LLaMA attention


def _compact_llama_attention(model: nn.Module, prefix: str, attn: nn.Module) -> None:
    names = {t: f"{prefix}self_attn.{t}_proj" for t in ("q", "k", "v", "o")}
    q, k, v, o = (_fold(model.get_submodule(names[t])) for t in ("q", "k", "v", "o"))
    hd = int(attn.head_dim)
    G = int(attn.num_key_value_groups)
    H = q.out_features // hd
    KV = k.out_features // hd
    if H != KV * G or hd % 2:
        raise ValueError(f"compact: unexpected attention shapes at {prefix}self_attn (heads {H}, kv heads {KV}, groups {G})")
    qr, kr, vr = q.rows.view(H, hd), k.rows.view(KV, hd), v.rows.view(KV, hd)
    oc = o.cols.view(H, hd)
    vr_q = vr.repeat_interleave(G, 0)  # (H, hd): the kv row serving each query head
    head_val = vr_q & oc  # query head h, dim d carries a value to the output
    groups = _idx(head_val.view(KV, G * hd).any(1))
    if groups.numel() == 0:  # attention contributes only o's bias: keep one group, all zero
        groups = torch.zeros(1, dtype=torch.long, device=qr.device)
    qheads = (groups[:, None] * G + torch.arange(G, device=groups.device)).flatten()

    def pair(m: Tensor) -> Tensor:  # rotate_half: dim d meets d + hd/2
        half = hd // 2
        return m | torch.cat((m[..., half:], m[..., :half]), -1)

    # q_d is needed if k of its group is open at d or its rotary partner (pairs mix under RoPE)
    kr_q = kr.repeat_interleave(G, 0)
    q_need = qr & pair(kr_q)
    k_need = kr & pair(qr.view(KV, G, hd).any(1))
    v_need = vr & head_val.view(KV, G, hd).any(1)

    def rows_of(need: Tensor, heads: Tensor):
        sub = need[heads]  # (heads', hd)
        slots = _idx(sub.flatten())
        src = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()[slots]
        return src, slots, heads.numel() * hd

    for t, f, need, hs in (("q", q, q_need, qheads), ("k", k, k_need, groups), ("v", v, v_need, groups)):
        src, slots, width = rows_of(need, hs)
        set_submodule(model, names[t], _heads_in(f, src, slots, width))
    # o reads the kept query heads' layout at the dims that carry a value
    src_cols, slots, width = rows_of(head_val, qheads)
    set_submodule(model, names["o"], _heads_out(o, src_cols, slots, width))
    setattr(attn, COMPACT_ATTRS, dict(num_kv_heads_kept=int(groups.numel())))


def _compact_llama_layer(model: nn.Module, prefix: str, layer: nn.Module) -> None:
    _compact_llama_attention(model, prefix, layer.self_attn)
    mlp = layer.mlp
    _compact_mlp(model, [prefix + "mlp.gate_proj", prefix + "mlp.up_proj"], prefix + "mlp.down_proj", getattr(mlp, "act_fn", None))


def _is_llama_layer(layer: nn.Module) -> bool:
    try:
        a, m = layer.self_attn, layer.mlp
        return all(_linear(getattr(a, f"{t}_proj")) for t in "qkvo") and all(
            _linear(getattr(m, f"{t}_proj")) for t in ("gate", "up", "down")
        ) and hasattr(a, "head_dim") and hasattr(a, "num_key_value_groups")
    except AttributeError:
        return False


# ------------------------------------------------------------------------------------ driver


def _block_handlers():
    return (
        (_BERT_LAYERS, _is_bert_layer, _compact_bert_layer),
        (_LLAMA_LAYERS, _is_llama_layer, _compact_llama_layer),
    )


def compact(model: nn.Module) -> nn.Module:
    """Compacts ``model`` in place (eval mode, no gates left) and returns it.

    Known block classes (BERT, RoBERTa, LLaMA, Mistral, Qwen2) shrink paired dimensions; every
    other gated Linear becomes a :class:`GatheredLinear` on its active block, with a warning naming
    the block classes whose pairings were not used. The compact model's outputs equal the gated
    model's eval outputs up to float rounding.
    """
    if not any(isinstance(m, GatedLinear) for m in model.modules()):
        raise ValueError("compact: the model has no GatedLinear layer (call finegates.sparsify first)")
    with torch.no_grad():
        _compact(model)
    return model


def _compact(model: nn.Module) -> None:
    model.eval()
    for layer_name, layer in list(model.named_modules()):
        cls = type(layer).__name__
        for classes, is_kind, handler in _block_handlers():
            if cls in classes and is_kind(layer):
                parts = [layer.get_submodule(p) for p in _gated_paths(layer)]
                if _any_gated(*parts):
                    handler(model, layer_name + "." if layer_name else "", layer)
                break
    left = [(n, m) for n, m in model.named_modules() if isinstance(m, GatedLinear)]
    if left:
        owners = sorted({_block_class(model, n) for n, _ in left})
        unknown = [o for o in owners if o not in _BERT_LAYERS + _LLAMA_LAYERS]
        if len(unknown) < len(owners):
            warnings.warn(
                f"compact: blocks {', '.join(o for o in owners if o not in unknown)} have a known class but an "
                "unexpected structure: their gated layers were compacted one by one, without pairings",
                stacklevel=3,
            )
        if unknown:
            warnings.warn(
                f"compact: {', '.join(unknown)} is not a known block ({', '.join(KNOWN_FAMILIES)}): its "
                f"{len(left)} gated layers were compacted one by one with fg::gathered_linear; paired "
                "dimensions (MLP intermediate, attention heads) were not shrunk",
                stacklevel=3,
            )
    for n, m in left:
        set_submodule(model, n, _residual_layer(_fold(m)))
    for p in model.parameters():
        p.requires_grad_(False)


def _gated_paths(layer: nn.Module) -> List[str]:
    if type(layer).__name__ in _BERT_LAYERS:
        return ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"]
    return [f"self_attn.{t}_proj" for t in "qkvo"] + [f"mlp.{t}_proj" for t in ("gate", "up", "down")]


def _block_class(model: nn.Module, name: str) -> str:
    """The class of the nearest ancestor that is an element of an nn.ModuleList (the block)."""
    parts = name.split(".")
    mod, block = model, type(model).__name__
    for p in parts[:-1]:
        parent = mod
        mod = getattr(mod, p)
        if isinstance(parent, nn.ModuleList):
            block = type(mod).__name__
    return block
