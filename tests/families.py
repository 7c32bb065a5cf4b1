"""Tiny models of every family compact() has a layout for, and helpers to gate them at random.

Shared by the compaction tests; small enough that one forward takes milliseconds on one thread.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

import finegates

OPEN, CLOSED = 3.0, -3.0  # gate logits whose eval gate is exactly 1 / exactly 0
VOCAB = 100
INTERMEDIATE = 80
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=INTERMEDIATE, max_position_embeddings=64, **_TOKENS)


def _t():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _encoder(cls_name: str, cfg_name: str):
    t = _t()
    cfg = getattr(t, cfg_name)(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=INTERMEDIATE, max_position_embeddings=70, num_labels=3, **_TOKENS)
    return getattr(t, cls_name)(cfg)


def _decoder(cls_name: str, cfg_name: str, **kw):
    t = _t()
    return getattr(t, cls_name)(getattr(t, cfg_name)(**{**_DECODER, **kw}))


# family -> builder. Causal LMs tie their embeddings where the family's small models do.
BUILDERS = {
    "bert": lambda: _encoder("BertForSequenceClassification", "BertConfig"),
    "roberta": lambda: _encoder("RobertaForSequenceClassification", "RobertaConfig"),
    "distilbert": lambda: _t().DistilBertForSequenceClassification(_t().DistilBertConfig(
        vocab_size=VOCAB, dim=48, n_layers=2, n_heads=4, hidden_dim=INTERMEDIATE, max_position_embeddings=64,
        num_labels=2, pad_token_id=0)),
    "gpt2": lambda: _t().GPT2LMHeadModel(_t().GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4, n_inner=INTERMEDIATE, **_TOKENS)),
    "gpt_neox": lambda: _decoder("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=64),  # rotary on 4 of 16 dims
    "opt": lambda: _t().OPTForCausalLM(_t().OPTConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, ffn_dim=INTERMEDIATE, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=48, **_TOKENS)),
    "llama": lambda: _decoder("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": lambda: _decoder("MistralForCausalLM", "MistralConfig", num_key_value_heads=2),
    "qwen2": lambda: _decoder("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": lambda: _decoder("Qwen3ForCausalLM", "Qwen3Config", num_key_value_heads=2, head_dim=12,
                              tie_word_embeddings=True),
    "gemma": lambda: _decoder("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=2, head_dim=12),
    "gemma2": lambda: _decoder("Gemma2ForCausalLM", "Gemma2Config", num_key_value_heads=2, head_dim=12,
                               query_pre_attn_scalar=12, sliding_window=8),
    "gemma3": lambda: _decoder("Gemma3ForCausalLM", "Gemma3TextConfig", num_key_value_heads=2, head_dim=12,
                               query_pre_attn_scalar=12, sliding_window=8),
    "phi3": lambda: _decoder("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, partial_rotary_factor=0.5,
                             tie_word_embeddings=False),
}
FAMILIES = tuple(BUILDERS)


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[family]().float().eval()


def is_causal(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or type(model).__name__ == "GPT2LMHeadModel"


def set_gates(gates, open_mask: torch.Tensor) -> None:
    with torch.no_grad():
        gates.theta.copy_(torch.where(open_mask, torch.full_like(gates.theta, OPEN), torch.full_like(gates.theta, CLOSED)))


def random_gates(model: nn.Module, p_closed: float, seed: int, *, fractional: bool = True) -> None:
    """Each gate closed with probability p_closed; open gates get values in (0, 1] (fractional=True)
    so folding the gate values is tested, not only 0/1 masks; LoRA factors random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in finegates.gated_layers(model):
            for gates in (layer.row_gates, layer.col_gates):
                closed = torch.rand(gates.size, generator=g) < p_closed
                theta = torch.rand(gates.size, generator=g) * 1.2 - 0.4 if fractional else torch.full((gates.size,), OPEN)
                gates.theta.copy_(torch.where(closed, torch.full_like(theta, CLOSED), theta))
            if layer.lora_b is not None:
                layer.lora_b.normal_(0, 0.05, generator=g)


def gated(family: str, p_closed: float, seed: int, *, lora_rank: int = 0, fractional: bool = True) -> nn.Module:
    model = build(family)
    finegates.sparsify(model, target_sparsity=0.4, lora_rank=lora_rank, verbose=False)
    random_gates(model, p_closed, seed, fractional=fractional)
    return model.eval()


def inputs(seed: int = 1, batch: int = 2, seq: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second sequence
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and out.weight is model.get_input_embeddings().weight
