"""The prune-then-LoRA peers of the quality bench (bench/peer_pruning.py): the shape they are held
to, the physical cut against the zeroed dense model, the size by FineGates' own counter, and each
tool's pruning (skipped without the ``[peers]`` extra)."""

from __future__ import annotations

import pytest
import torch

from bench.peer_pruning import (Structure, check_pruned, counted_removal, peer_shape, slice_pruned,
                                textpruner_prune, torch_pruning_prune, zero_pruned)

pytestmark = pytest.mark.usefixtures("one_thread")


def _bert(hidden=48, heads=4, inter=96, layers=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
                     num_hidden_layers=layers, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 60, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        out.append(dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 2, (4,), generator=g)))
    return out


def _random_structure(model, heads, units, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_layers, h, i = model.config.num_hidden_layers, model.config.num_attention_heads, model.config.intermediate_size

    def mask(n, removed):
        m = torch.ones(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:removed]] = False
        return m

    return Structure([mask(h, heads) for _ in range(n_layers)], [mask(i, units) for _ in range(n_layers)])


def test_minilm_shape_matches_the_fraction():
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        minilm = BertForSequenceClassification(BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                                                          num_hidden_layers=6))
    assert peer_shape(minilm, 0.4) == (5, 602)
    assert peer_shape(minilm, 0.5) == (6, 768)
    assert peer_shape(minilm, 0.6) == (7, 935)


def test_the_cut_model_computes_the_zeroed_one_and_is_counted_as_finegates_counts():
    dense = _bert()
    structure = _random_structure(dense, heads=2, units=30)
    pruned = slice_pruned(_bert(), structure)
    assert pruned.bert.encoder.layer[0].attention.self.query.out_features == 2 * 12
    assert check_pruned(pruned, dense, structure, _batches()) < 1e-5
    size = counted_removal(dense, pruned, structure)
    head, unit, per_layer = 4 * 12 * 48 + 3 * 12, 2 * 48 + 1, 4 * (48 * 48 + 48) + 2 * 96 * 48 + 96 + 48
    assert size["params_removed"] == 2 * (2 * head + 30 * unit)
    assert size["removed_fraction_of_gated"] == pytest.approx((2 * head + 30 * unit) / per_layer)


def test_a_wrong_cut_is_refused():
    dense = _bert()
    structure = _random_structure(dense, heads=1, units=10)
    other = _random_structure(dense, heads=1, units=10, seed=5)
    pruned = slice_pruned(_bert(), other)
    with pytest.raises(AssertionError, match="differ from the dense model"):
        check_pruned(pruned, dense, structure, _batches())
    zeroed = zero_pruned(dense, structure)
    assert float(zeroed.bert.encoder.layer[0].output.dense.weight.detach()[:, ~structure.units[0]].abs().sum()) == 0


@pytest.mark.parametrize("tool", ["tp", "textpruner"])
def test_each_tool_removes_the_asked_heads_and_units(tool):
    pytest.importorskip("torch_pruning" if tool == "tp" else "textpruner")
    import copy

    model = _bert()
    dense = copy.deepcopy(model)
    batches = _batches()
    if tool == "tp":
        structure = torch_pruning_prune(model, batches, heads=1, units=24)
    else:
        structure = textpruner_prune(model, batches, heads=1, units=24, n_iters=2)
        slice_pruned(model, structure)
    assert [int((~m).sum()) for m in structure.heads] == [1, 1]
    assert [int((~m).sum()) for m in structure.units] == [24, 24]
    check_pruned(model, dense, structure, batches)
    assert counted_removal(dense, model, structure)["params_removed"] == 2 * (4 * 12 * 48 + 3 * 12 + 24 * 97)


def test_every_peer_row_of_the_quality_table_is_a_schedule_the_runner_takes(tmp_path):
    from bench import peers, quality_table

    for name, (_, schedule, fraction) in quality_table.PEERS.items():
        argv = quality_table._peer_argv(name, 2, 500, tmp_path / name)
        assert schedule in peers.SCHEDULES and argv[argv.index("--schedule") + 1] == schedule
        assert float(argv[argv.index("--sparsity") + 1]) == fraction
    with pytest.raises(SystemExit):
        peers.main(["--schedule", "tp-prune-tune", "--sparsity", "1.5", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        peers.main(["--schedule", "tp-prune-tune", "--sparsity", "0.4", "--steps", "50", "--output-dir", str(tmp_path)])
