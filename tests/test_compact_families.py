"""compact / save_compact / load_compact on every family with a built-in layout: the compact model
computes what the gated model computes (fp32, rel <= 1e-5), its MLP is physically narrower, it is as
small as compression_report promised, it round-trips bitwise with tied weights still tied, and causal
LMs generate the same tokens after loading."""

from __future__ import annotations

import warnings

import pytest
import torch

import finegates
from finegates import GatedLinear, GatheredLinear
from finegates.compaction.layouts import layout_for

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency of finegates")

from families import FAMILIES, INTERMEDIATE, build, gated, inputs, is_causal, logits, params, rel, set_gates, tied  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(model):
    return [m for m in model.modules() if layout_for(m) is not None]


def _mlp_widths(model):
    """Per block: (widths the up-projections write, width the down-projection reads, its col_idx)."""
    out = []
    for block in _blocks(model):
        mlp = layout_for(block).mlp
        down = block.get_submodule(mlp.down)
        ups = [block.get_submodule(u).weight.shape[0] // (2 if mlp.fused_up else 1) for u in mlp.up]
        out.append((ups, down.weight.shape[1], getattr(down, "col_idx", None)))
    return out


def _compact_checked(model, ids, mask):
    ref = logits(model, ids, mask)
    report = finegates.compression_report(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compact:")  # a built-in family: no fallback warning
        finegates.compact(model)
    assert not any(isinstance(m, GatedLinear) for m in model.modules())
    out = logits(model, ids, mask)
    assert rel(out, ref) <= 1e-5, rel(out, ref)
    assert params(model) == report["params_compact"]
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p_closed", [0.0, 0.3, 0.6])
def test_compact_equals_gated_eval(family, p_closed):
    model = gated(family, p_closed, seed=int(p_closed * 10) + 7, lora_rank=2 if p_closed == 0.3 else 0)
    _compact_checked(model, *inputs())
    for ups, down_in, col_idx in _mlp_widths(model):
        assert all(u == down_in for u in ups) and col_idx is None  # no gather between up and down
        if p_closed > 0:
            assert down_in < INTERMEDIATE


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_mlp_units_closed_on_either_side(family):
    """8 units closed by the up-projection's rows, 8 others by the down-projection's columns, every
    other gate open: the intermediate is exactly 64 wide."""
    model = gated(family, 0.0, seed=1, fractional=False)
    for block in _blocks(model):
        mlp = layout_for(block).mlp
        up = block.get_submodule(mlp.up[-1])  # the non-activated up (or the only one)
        rows = torch.ones(up.out_features, dtype=torch.bool)
        first = INTERMEDIATE if mlp.fused_up else 0  # fused [gate | up]: the up half
        rows[first + 3 : first + 11] = False
        set_gates(up.row_gates, rows)
        cols = torch.ones(INTERMEDIATE, dtype=torch.bool)
        cols[40:48] = False
        set_gates(block.get_submodule(mlp.down).col_gates, cols)
    _compact_checked(model, *inputs())
    for ups, down_in, col_idx in _mlp_widths(model):
        assert ups == [INTERMEDIATE - 16] * len(ups) and down_in == INTERMEDIATE - 16 and col_idx is None


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family):
    model = gated(family, 0.4, seed=12)
    was_tied = tied(model)
    ids, mask = inputs()
    out = _compact_checked(model, ids, mask)
    assert tied(model) == was_tied
    path = finegates.save_compact(model, tmp_path / "compact")
    loaded = finegates.load_compact(path)
    assert type(loaded) is type(model) and tied(loaded) == was_tied
    assert not any(isinstance(m, GatedLinear) for m in loaded.modules())
    assert params(loaded) == params(model)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(loaded, ids, mask), out)
    if is_causal(model):
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.generate(ids[:1, :5], **gen), model.generate(ids[:1, :5], **gen))


def test_tied_model_refuses_corrupt_foreign_and_mismatched(tmp_path):
    model = gated("gpt2", 0.4, seed=14)
    finegates.compact(model)
    path = finegates.save_compact(model, tmp_path / "m")
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=120, n_positions=64, n_embd=48, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="do not fit the model: size mismatch for lm_head.weight"):
        finegates.load_compact(path, model=other)
    with pytest.raises(ValueError, match="no module"):
        finegates.load_compact(path, model=build("bert"))
    other = finegates.save_compact(model, tmp_path / "n")
    data = bytearray((other / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (other / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        finegates.load_compact(other)


def test_weights_mismatch_names_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    from finegates.compaction.serialize import _manifest_digest

    model = gated("llama", 0.4, seed=15)
    finegates.compact(model)
    path = finegates.save_compact(model, tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    weights["model.extra.weight"] = weights.pop("model.norm.weight")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    manifest = (path / "finegates_compact.json").read_text()
    import hashlib
    import json

    m = json.loads(manifest)
    m["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    m["manifest_sha256"] = _manifest_digest(m)
    (path / "finegates_compact.json").write_text(json.dumps(m))
    with pytest.raises(ValueError) as e:
        finegates.load_compact(path)
    msg = str(e.value)
    assert "missing" in msg and "model.norm.weight" in msg and "unexpected" in msg and "model.extra.weight" in msg


def test_sparsify_refuses_a_tied_output_layer():
    model = build("gpt2")
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to transformer.wte.weight"):
        finegates.sparsify(model, target_sparsity=0.4, target_modules=["lm_head", "c_fc"], verbose=False)
    assert not finegates.gated_layers(model)  # nothing changed


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_portable_compact_exports_without_fg_ops(family):
    """compact(portable=True): stock nn.Linear layers only (zero-filled where a gather or scatter
    would be), paired dims still shrink; torch.export gives a graph with no fg op that computes the
    gated model's outputs."""
    model = gated(family, 0.4, seed=21)
    ids, mask = inputs()
    ref = logits(model, ids, mask)
    finegates.compact(model, portable=True)
    assert not any(isinstance(m, GatheredLinear) for m in model.modules())
    assert all(i < INTERMEDIATE for _, i, _ in _mlp_widths(model))
    torch.testing.assert_close(logits(model, ids, mask), ref, rtol=1e-5, atol=1e-6)
    kw = dict(input_ids=ids, attention_mask=mask) | (dict(use_cache=False) if family == "llama" else {})
    ep = torch.export.export(model, (), kwargs=kw)
    assert "fg." not in str(ep.graph) and "fg_" not in str(ep.graph)
    out = ep.module()(**kw)
    torch.testing.assert_close(out.logits if hasattr(out, "logits") else out[0], ref, rtol=1e-5, atol=1e-6)
