"""compact()'s speed choices keep it exact and within the promised size: the MLP intermediate
width padded to a multiple of 16 with zeroed closed dims, and the BERT head size rounded up to a
multiple of 8 (zero-filled). Small models, one thread, fp32 rel err <= 1e-5."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import finegates

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency of finegates")

from families import random_gates, set_gates  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def _model(kind):
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertForSequenceClassification(
            transformers.BertConfig(vocab_size=50, max_position_embeddings=32, num_labels=2, **CFG))
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=50, max_position_embeddings=32, num_key_value_heads=2, **CFG))


def _gated(kind, p, seed):
    m = _model(kind)
    finegates.sparsify(m, target_sparsity=0.3, verbose=False)
    random_gates(m, p, seed, fractional=False)
    return m.eval()


def _run(m, ids):
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _params(m):
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def _mlps(m, kind):
    if kind == "bert":
        return [(l.intermediate.dense, [l.intermediate.dense], l.output.dense) for l in m.bert.encoder.layer]
    return [(l.mlp.up_proj, [l.mlp.gate_proj, l.mlp.up_proj], l.mlp.down_proj) for l in m.model.layers]


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_padded_intermediate_is_exact_and_within_promise(kind, seed):
    m = _gated(kind, 0.15, seed)
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(seed))
    ref = _run(m, ids)
    rep = finegates.compression_report(m)
    finegates.compact(m)
    out = _run(m, ids)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    assert _params(m) == rep["params_compact"]
    padded = 0
    for _, ups, down in _mlps(m, kind):
        width = down.weight.shape[1]
        assert all(u.weight.shape[0] == width for u in ups)
        padded += width % 16 == 0 and width < CFG["intermediate_size"]
    assert padded > 0, "no MLP got a padded width: the test pattern does not exercise the padding"


def test_padding_is_skipped_when_it_would_exceed_the_promise():
    """Only the down-projection's columns closed: the promise counts just those; keeping
    extra (zeroed) dims would cost up-projection rows the promise never removed."""
    m = _gated("bert", 0.0, 0)
    layer = m.bert.encoder.layer[0]
    cols = torch.ones(CFG["intermediate_size"], dtype=torch.bool)
    cols[:5] = False  # 123 kept: padding to 128 would re-add 5 rows the promise keeps removed
    set_gates(layer.output.dense.col_gates, cols)
    rep = finegates.compression_report(m)
    ids = torch.randint(3, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    ref = _run(m, ids)
    finegates.compact(m)
    assert ((_run(m, ids) - ref).norm() / ref.norm()).item() <= 1e-5
    assert _params(m) == rep["params_compact"]
    assert layer.output.dense.weight.shape[1] == 123


def test_bert_head_size_rounds_up_to_a_multiple_of_8():
    m = _gated("bert", 0.0, 0)
    sa = m.bert.encoder.layer[1].attention.self
    hd = sa.attention_head_size  # 32
    keep = torch.zeros(CFG["hidden_size"], dtype=torch.bool)
    keep[:19] = True  # head 0: 19 dims open
    keep[hd:hd + 9] = True  # head 1: 9 dims open
    for lin in (sa.query, sa.key, sa.value):
        set_gates(lin.row_gates, keep)
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = _run(m, ids)
    finegates.compact(m)
    assert ((_run(m, ids) - ref).norm() / ref.norm()).item() <= 1e-5
    assert sa.attention_head_size == 24 and sa.num_attention_heads == 2
