"""``sparsify(..., structure="heads_units")``: only the dimensions compaction pairs inside a block
are gated, the residual stream's sides stay open (fixed, untrained, never closed), and the closure
closes whole heads and MLP units, so the compact model is plain Linears that gather nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import finegates
from finegates.budget import check_reachable, close_to_budget
from finegates.compaction.modules import GatheredLinear
from finegates.layers import GatedLinear
from finegates.sparsify import param_groups

from families import BUILDERS

pytestmark = pytest.mark.usefixtures("one_thread")

# q/k/v rows, o columns, the MLP's up rows and down columns: BERT's paired sides
PAIRED = {"query": (True, False), "key": (True, False), "value": (True, False), "attention.output.dense": (False, True),
          "intermediate.dense": (True, False), "output.dense": (False, True)}


def _paired_only(family: str = "bert", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return finegates.sparsify(BUILDERS[family]().eval(), target_sparsity=0.4, structure="heads_units", verbose=False)


def _expected_sides(name: str):
    for suffix in ("attention.output.dense", "intermediate.dense", "output.dense", "query", "key", "value"):
        if name.endswith(suffix):
            return PAIRED[suffix]
    raise AssertionError(name)


def test_only_the_paired_sides_train():
    model = _paired_only()
    trained = {id(p) for g in param_groups(model, 0.05, 1e-3) for p in g["params"]}
    for name, m in model.named_modules():
        if isinstance(m, GatedLinear):
            rows, cols = _expected_sides(name)
            assert (m.row_gates.fixed, m.col_gates.fixed) == (not rows, not cols), name
            assert (id(m.row_gates.theta) in trained, id(m.col_gates.theta) in trained) == (rows, cols), name
            for gates in (m.row_gates, m.col_gates):
                if gates.fixed:
                    assert torch.equal(gates.eval_values(), torch.ones(gates.size))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_closure_never_closes_a_residual_side_and_compact_gathers_none(family):
    model = _paired_only(family)
    n_gates = sum(g.size for m in model.modules() if isinstance(m, GatedLinear) for g in (m.row_gates, m.col_gates))
    rank = torch.randn(n_gates, generator=torch.Generator().manual_seed(1))
    result = close_to_budget(model, 0.4, rank=rank)
    assert abs(result["removed_fraction"] - 0.4) < 0.06  # whole units of a tiny model: coarse steps
    for m in model.modules():
        if isinstance(m, GatedLinear):
            for gates in (m.row_gates, m.col_gates):
                if gates.fixed:
                    assert bool((gates.eval_values() == 1).all())
    x = torch.randint(1, 50, (2, 7))
    with torch.no_grad():
        before = model(input_ids=x).logits
        finegates.compact(model)
        after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert not [m for m in model.modules() if isinstance(m, GatheredLinear)]  # whole heads and units: plain Linears


def test_heads_close_whole():
    model = _paired_only()
    n_gates = sum(g.size for m in model.modules() if isinstance(m, GatedLinear) for g in (m.row_gates, m.col_gates))
    close_to_budget(model, 0.4, rank=torch.randn(n_gates, generator=torch.Generator().manual_seed(2)))
    hd = model.config.hidden_size // model.config.num_attention_heads
    for layer in model.bert.encoder.layer:
        heads = [(g.eval_values() > 0).reshape(-1, hd) for g in
                 (layer.attention.self.query.row_gates, layer.attention.self.key.row_gates,
                  layer.attention.self.value.row_gates, layer.attention.output.dense.col_gates)]
        for h in heads:
            assert bool((h.all(1) | ~h.any(1)).all())  # every head all open or all closed
        assert all(torch.equal(h.all(1), heads[0].all(1)) for h in heads)
        units = layer.intermediate.dense.row_gates.eval_values() > 0
        assert torch.equal(units, layer.output.dense.col_gates.eval_values() > 0)


def test_reachable_counts_only_what_can_close():
    model = _paired_only()
    paired_most = check_reachable(model, 0.0)
    torch.manual_seed(0)
    everything = finegates.sparsify(BUILDERS["bert"]().eval(), target_sparsity=0.4, verbose=False)
    beyond = (paired_most + check_reachable(everything, 0.0)) / 2  # reachable only through a residual side
    assert paired_most < beyond
    check_reachable(everything, beyond)
    with pytest.raises(ValueError, match="cannot be reached"):
        check_reachable(model, beyond)


def test_the_record_replays_the_fixed_sides():
    model = _paired_only()
    torch.manual_seed(0)
    again = finegates.sparsify_as(BUILDERS["bert"]().eval(), finegates.sparsify_record(model))
    fixed = [(m.row_gates.fixed, m.col_gates.fixed) for m in model.modules() if isinstance(m, GatedLinear)]
    assert fixed == [(m.row_gates.fixed, m.col_gates.fixed) for m in again.modules() if isinstance(m, GatedLinear)]
    assert any(r or c for r, c in fixed)


def test_the_config_refuses_an_unknown_structure():
    with pytest.raises(ValueError, match="structure must be one of"):
        finegates.FineGatesConfig(target_sparsity=0.4, structure="heads")
