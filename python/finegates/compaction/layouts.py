"""Block layouts: how a transformer block wires its attention and MLP, as data.

:func:`finegates.compact` shrinks a dimension that two layers share (the MLP intermediate, attention
heads and per-head dims) only where it knows how the block connects them. One :class:`BlockLayout`
per family says so; supporting another architecture is registering one more entry::

    finegates.register_layout(finegates.BlockLayout(
        family="MyNet", blocks=("MyNetBlock",),
        attention=finegates.AttentionLayout(
            module="attn", q="attn.wq", k="attn.wk", v="attn.wv", o="attn.wo",
            head_size="head_dim", rotary="half"),
        mlp=finegates.MLPLayout(up=("ffn.w_gate", "ffn.w_up"), down="ffn.w_down", act="ffn.act"),
    ))

Every path is relative to the block. A block with no entry still compacts exactly: its MLP is
shrunk when it can be recognised from its modules alone (up-projection, elementwise activation,
down-projection, checked by running it), every other gated Linear becomes a ``fg::gathered_linear``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from torch import nn

__all__ = ["AttentionLayout", "MLPLayout", "BlockLayout", "register_layout", "layout_for", "registered_layouts"]

SPLITS = ("concat", "per_head")
ROTARY = ("", "half", "interleaved")
QUANTITIES = ("heads", "kv_heads", "head_size", "width", "kv_width")


@dataclass(frozen=True)
class AttentionLayout:
    """Self-attention ``o(softmax(q k^T) v)`` of one block.

    ``q``/``k``/``v``/``o``: the projections; or ``qkv``: one fused projection whose output stacks
    q, k and v, split ``"concat"`` (``[q | k | v]``; with ``kv_heads`` naming the attribute that
    holds the number of kv heads under GQA) or ``"per_head"`` (``[q_h | k_h | v_h]`` per head).
    ``module``: the attention module, which holds the per-head size in attribute ``head_size``.

    The attention kind:

    - ``head_size_shrinks``: the softmax scale is a stored constant (not read from tensor shapes) and
      nothing pairs dims inside a head, so every head may shrink to the dims it uses (MHA only);
      otherwise the head size is fixed and only whole heads (with their GQA group) are removed.
    - ``heads_removable``: False when the forward splits or reshapes by a head count it reads from
      the shared config (heads then stay, their closed dims are computed as exact zeros).
    - ``rotary``: ``"half"`` (rotate_half: dim d meets d + r/2) or ``"interleaved"`` (2i meets
      2i + 1) over the first r dims of a head; r from attribute ``rotary_dim`` of the module when
      named, else from the config's ``partial_rotary_factor`` (default: the whole head).
    - ``qk_norm``: q and k are normalised per head (Qwen3, Gemma 3), so every open q/k dim of a kept
      head feeds the norm and is kept.

    ``set_attrs``: attributes of the module the forward reads, set after compaction to one of
    ``"heads"``, ``"kv_heads"``, ``"head_size"``, ``"width"`` (heads x head size), ``"kv_width"``.
    """

    module: str
    o: str
    q: str = ""
    k: str = ""
    v: str = ""
    qkv: str = ""
    qkv_split: str = "concat"
    kv_heads: str = ""
    head_size: str = "head_dim"
    head_size_shrinks: bool = False
    heads_removable: bool = True
    rotary: str = ""
    rotary_dim: str = ""
    qk_norm: bool = False
    set_attrs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if bool(self.qkv) == bool(self.q or self.k or self.v) or not (self.qkv or (self.q and self.k and self.v)):
            raise ValueError("AttentionLayout: give either q, k and v, or one fused qkv")
        if self.qkv_split not in SPLITS:
            raise ValueError(f"AttentionLayout: qkv_split must be one of {SPLITS}, got {self.qkv_split!r}")
        if self.rotary not in ROTARY:
            raise ValueError(f"AttentionLayout: rotary must be one of {ROTARY}, got {self.rotary!r}")
        if self.head_size_shrinks and (self.rotary or self.qk_norm):
            raise ValueError("AttentionLayout: a rotary or q/k-normed head cannot shrink (head_size_shrinks=False)")
        bad = {a: q for a, q in self.set_attrs.items() if q not in QUANTITIES}
        if bad:
            raise ValueError(f"AttentionLayout: set_attrs values must be among {QUANTITIES}, got {bad}")

    @property
    def projections(self) -> Tuple[str, ...]:
        return tuple(p for p in (self.q, self.k, self.v, self.qkv, self.o) if p)


@dataclass(frozen=True)
class MLPLayout:
    """``down(act(up_1(x)) * up_2(x))`` (gated, two up-projections, the first activated) or
    ``down(act(up(x)))``. ``fused_up``: a single ``up`` that stacks ``[gate | up]`` along its
    outputs (the forward splits it with ``chunk(2)``). ``act``: the activation module or callable;
    a closed up row is removable only where ``act(0) == 0``, which compact() checks."""

    up: Tuple[str, ...]
    down: str
    act: str
    fused_up: bool = False

    def __post_init__(self):
        if not 1 <= len(self.up) <= 2:
            raise ValueError(f"MLPLayout: up must name one or two projections, got {self.up!r}")
        if self.fused_up and len(self.up) != 1:
            raise ValueError("MLPLayout: fused_up needs exactly one up projection")

    @property
    def projections(self) -> Tuple[str, ...]:
        return tuple(self.up) + (self.down,)


@dataclass(frozen=True)
class BlockLayout:
    """One family: the block classes (``__name__`` or ``module.qualname``) and their parts."""

    family: str
    blocks: Tuple[str, ...]
    attention: Optional[AttentionLayout] = None
    mlp: Optional[MLPLayout] = None


_REGISTRY: Dict[str, BlockLayout] = {}


def register_layout(layout: BlockLayout, *, replace: bool = False) -> BlockLayout:
    """Adds ``layout`` for its block classes; ``replace=True`` to override an existing entry."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"register_layout expects a BlockLayout, got {type(layout).__name__}")
    if not layout.blocks:
        raise ValueError("register_layout: layout.blocks names no block class")
    taken = [b for b in layout.blocks if b in _REGISTRY and _REGISTRY[b] is not layout]
    if taken and not replace:
        raise ValueError(f"register_layout: {taken} already have a layout ({_REGISTRY[taken[0]].family}); pass replace=True")
    for b in layout.blocks:
        _REGISTRY[b] = layout
    return layout


def layout_for(block: nn.Module) -> Optional[BlockLayout]:
    """The registered layout of ``block``'s class (qualified name first, then bare name), or of the
    nearest class it derives from that has one: FSDP2 turns a sharded ``LlamaDecoderLayer`` into an
    ``FSDPLlamaDecoderLayer`` derived from it, which must count as the block it shards."""
    for cls in type(block).__mro__:
        found = _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}") or _REGISTRY.get(cls.__name__)
        if found is not None:
            return found
    return None


def registered_layouts() -> Tuple[BlockLayout, ...]:
    return tuple({id(v): v for v in _REGISTRY.values()}.values())


# --------------------------------------------------------------------------- built-in families

_BERT_ATTENTION = AttentionLayout(
    module="attention.self", q="attention.self.query", k="attention.self.key", v="attention.self.value",
    o="attention.output.dense", head_size="attention_head_size", head_size_shrinks=True,
    set_attrs={"num_attention_heads": "heads", "attention_head_size": "head_size", "all_head_size": "width"},
)
_BERT_MLP = MLPLayout(up=("intermediate.dense",), down="output.dense", act="intermediate.intermediate_act_fn")


def _rotary_attention(**kw) -> AttentionLayout:
    names = {t: f"self_attn.{t}_proj" for t in "qkvo"}
    return AttentionLayout(module="self_attn", head_size="head_dim", rotary="half", **names, **kw)


_GLU_MLP = MLPLayout(up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj", act="mlp.act_fn")

for _layout in (
    BlockLayout("BERT", ("BertLayer",), _BERT_ATTENTION, _BERT_MLP),
    BlockLayout("RoBERTa", ("RobertaLayer", "XLMRobertaLayer"), _BERT_ATTENTION, _BERT_MLP),
    BlockLayout(
        "DistilBERT",
        ("transformers.models.distilbert.modeling_distilbert.TransformerBlock",),
        AttentionLayout(
            module="attention", q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", o="attention.out_lin",
            head_size="attention_head_size", head_size_shrinks=True,
            set_attrs={"n_heads": "heads", "attention_head_size": "head_size"},
        ),
        MLPLayout(up=("ffn.lin1",), down="ffn.lin2", act="ffn.activation"),
    ),
    BlockLayout("LLaMA", ("LlamaDecoderLayer",), _rotary_attention(), _GLU_MLP),
    BlockLayout("Mistral", ("MistralDecoderLayer",), _rotary_attention(), _GLU_MLP),
    BlockLayout("Qwen2", ("Qwen2DecoderLayer",), _rotary_attention(), _GLU_MLP),
    BlockLayout("Qwen3", ("Qwen3DecoderLayer",), _rotary_attention(qk_norm=True), _GLU_MLP),
    BlockLayout("Gemma", ("GemmaDecoderLayer", "Gemma2DecoderLayer"), _rotary_attention(), _GLU_MLP),
    BlockLayout("Gemma 3", ("Gemma3DecoderLayer",), _rotary_attention(qk_norm=True), _GLU_MLP),
    BlockLayout(
        "Phi-3",
        ("Phi3DecoderLayer",),
        # the forward splits qkv at config.num_attention_heads * head_dim: heads cannot be removed
        AttentionLayout(module="self_attn", qkv="self_attn.qkv_proj", o="self_attn.o_proj",
                        kv_heads="num_key_value_heads", rotary="half", heads_removable=False),
        MLPLayout(up=("mlp.gate_up_proj",), down="mlp.down_proj", act="mlp.activation_fn", fused_up=True),
    ),
    BlockLayout(
        "GPT-2",
        ("GPT2Block",),
        AttentionLayout(module="attn", qkv="attn.c_attn", o="attn.c_proj", head_size="head_dim", head_size_shrinks=True,
                        set_attrs={"num_heads": "heads", "head_dim": "head_size", "split_size": "width"}),
        MLPLayout(up=("mlp.c_fc",), down="mlp.c_proj", act="mlp.act"),
    ),
    BlockLayout(
        "GPT-NeoX",
        ("GPTNeoXLayer",),
        AttentionLayout(module="attention", qkv="attention.query_key_value", qkv_split="per_head", o="attention.dense",
                        head_size="head_size", rotary="half", rotary_dim="rotary_ndims"),
        MLPLayout(up=("mlp.dense_h_to_4h",), down="mlp.dense_4h_to_h", act="mlp.act"),
    ),
    BlockLayout(
        "OPT",
        ("OPTDecoderLayer",),
        AttentionLayout(module="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                        o="self_attn.out_proj", head_size="head_dim", head_size_shrinks=True,
                        set_attrs={"num_heads": "heads", "head_dim": "head_size"}),
        MLPLayout(up=("fc1",), down="fc2", act="activation_fn"),
    ),
):
    register_layout(_layout)
