"""The size budget: the expected-size surrogate against the exact plan, the controller, the exact
closure at the freeze, and the refusals (unreachable targets, bad controller settings)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import finegates
from finegates.budget import BudgetController, check_reachable, close_to_budget, kept_fraction, with_recovery
from finegates.expected_size import ExpectedSize, keep_probabilities
from finegates.layers import GatedLinear

from families import BUILDERS

pytestmark = pytest.mark.usefixtures("one_thread")


def _gated(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[family]().eval()
    return finegates.sparsify(model, target_sparsity=0.3, verbose=False)


def _random_closed(model: nn.Module, fraction: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedLinear):
                for gates in (m.row_gates, m.col_gates):
                    closed = torch.rand(gates.size, generator=g) < fraction
                    gates.theta.copy_(torch.where(closed, -3.0, 3.0))


def _hard(model: nn.Module):
    return {m: ((m.row_gates.eval_values() > 0).float(), (m.col_gates.eval_values() > 0).float())
            for m in model.modules() if isinstance(m, GatedLinear)}


def test_expected_size_is_exact_for_layers_on_their_own():
    """Without a block layout every gated layer counts |R| |C| + bias |R|: the surrogate at hard
    0/1 probabilities is the exact compact size."""
    torch.manual_seed(0)
    model = finegates.sparsify(nn.Sequential(nn.Linear(16, 40), nn.Tanh(), nn.Linear(40, 8, bias=False)),
                               target_sparsity=0.2, target_modules=["0", "2"], verbose=False)
    _random_closed(model, 0.3, seed=1)
    size = ExpectedSize(model)
    assert size.paired_layers == 0
    assert float(size(_hard(model))) == pytest.approx(kept_fraction(model), abs=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_expected_size_follows_the_plan(family, fraction):
    """At hard probabilities the surrogate is within 0.06 of the exact kept fraction (it ignores
    width padding and head-size rounding), and it counts a shared MLP unit once: closing only the
    down-projection's columns removes the up-projection's rows too."""
    model = _gated(family)
    _random_closed(model, fraction, seed=2)
    size = ExpectedSize(model)
    assert size.paired_layers > 0
    assert abs(float(size(_hard(model))) - kept_fraction(model)) <= 0.06


def test_expected_size_couples_the_mlp_unit():
    model = _gated("bert")
    _random_closed(model, 0.0, seed=0)
    size = ExpectedSize(model)
    down = model.bert.encoder.layer[0].output.dense
    up = model.bert.encoder.layer[0].intermediate.dense
    probs = _hard(model)
    before = float(size(probs))
    cols = probs[down][1].clone()
    cols[:10] = 0
    probs[down] = (probs[down][0], cols)
    saved = (before - float(size(probs))) * size.params_gated
    per_unit = up.in_features + 1 + down.out_features  # an up row with its bias, a down column
    assert saved == pytest.approx(10 * per_unit, rel=1e-4)


def test_expected_size_has_a_gradient_for_every_gate():
    model = _gated("bert")
    size = ExpectedSize(model)
    size(keep_probabilities(model)).backward()
    for m in model.modules():
        if isinstance(m, GatedLinear):
            for gates in (m.row_gates, m.col_gates):
                assert gates.theta.grad is not None and bool((gates.theta.grad > 0).all())


def test_controller_ramps_and_integrates():
    c = BudgetController(0.4, start=10, ramp_steps=20, multiplier_lr=2.0, penalty=10.0, measure_every=1)
    assert c.target_kept(5) == 1.0 and c.weight(5) == 0.0
    assert c.target_kept(29) == pytest.approx(0.6) and c.target_kept(100) == pytest.approx(0.6)
    assert 0.6 < c.target_kept(15) < 1.0
    c.update(30, expected=0.7, model=None)  # 0.1 too large: the penalty acts, the multiplier waits
    assert c.error == pytest.approx(0.1) and c.lam == 0.0
    assert c.weight(31) == pytest.approx(10.0 * 0.1)
    c.update(31, expected=0.61, model=None)  # near the target: the multiplier integrates
    assert c.lam == pytest.approx(2.0 * 0.01)
    c.update(32, expected=0.59, model=None)  # now too small: it falls
    assert c.lam == pytest.approx(0.0, abs=1e-12)
    d = BudgetController(0.4)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()


def test_controller_measures_exactly_and_offsets_between():
    model = _gated("bert")
    _random_closed(model, 0.2, seed=3)
    exact = kept_fraction(model)
    c = BudgetController(0.4, measure_every=5)
    c.update(5, expected=0.9, model=model)
    assert c.kept == pytest.approx(exact) and c.offset == pytest.approx(exact - 0.9)
    c.update(6, expected=0.8, model=model)  # not a measuring step: the expected value, shifted
    assert c.kept == pytest.approx(0.8 + exact - 0.9)


@pytest.mark.parametrize("bad", [dict(target_sparsity=1.0), dict(target_sparsity=-0.1), dict(target_sparsity=math.nan),
                                 dict(multiplier_lr=-1.0), dict(penalty=math.inf), dict(measure_every=0),
                                 dict(ramp_steps=2.5), dict(start=-1)])
def test_controller_refuses_bad_settings(bad):
    kw = dict(target_sparsity=0.4, **{k: v for k, v in bad.items() if k != "target_sparsity"})
    kw["target_sparsity"] = bad.get("target_sparsity", 0.4)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        BudgetController(**kw)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_close_to_budget_lands_within_one_unit(family, target):
    """Gates at random logits: after the closure the compact model removes the request up to the
    MLP's width padding (up to 15 zero-filled units: 4% of these tiny models, 0.1% of MiniLM), and
    it has exactly the parameters the report gives."""
    model = _gated(family)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedLinear):
                for gates in (m.row_gates, m.col_gates):
                    gates.theta.copy_(torch.randn(gates.size, generator=g) * 0.5 + 0.3)
    done = close_to_budget(model, target)
    rep = finegates.compression_report(model)
    assert rep["removed_fraction_of_gated"] == pytest.approx(done["removed_fraction"])
    assert abs(rep["removed_fraction_of_gated"] - target) <= 0.025
    finegates.compact(model)
    assert sum(p.numel() for p in model.parameters()) == rep["params_compact"]


def _ten_by_ten():
    """One gated 10 x 10 Linear (no bias): each row or column is 10% of the gated parameters."""
    torch.manual_seed(0)
    model = finegates.sparsify(nn.Sequential(nn.Linear(10, 10, bias=False)), target_sparsity=0.5,
                               target_modules=["0"], verbose=False)
    return model, model[0]


def test_close_to_budget_closes_the_lowest_gates():
    model, layer = _ten_by_ten()
    with torch.no_grad():
        layer.row_gates.theta.copy_(torch.linspace(-2, 2, 10))  # rows 0..3 closed (tanh < -0.5)
        layer.col_gates.theta.fill_(3.0)
    done = close_to_budget(model, 0.2)  # 2 rows of 10 = 20 %
    assert done["removed_fraction"] == pytest.approx(0.2) and done["reopened"] == 2
    assert (layer.row_gates.eval_values() > 0).tolist() == [False] * 2 + [True] * 8


def test_every_gate_closed_removes_every_gated_parameter():
    """What the reachability check computes: with all gates closed the plan keeps nothing of the
    gated layers (biases go with their rows), so every target in [0, 1) can be reached."""
    assert check_reachable(_gated("bert"), 0.99) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="target_sparsity"):
        finegates.sparsify(BUILDERS["bert"](), target_sparsity=1.0, verbose=False)


def test_recovery_schedule_stops_the_gates_and_restarts_the_rest():
    gates, head = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([dict(params=[gates], lr=0.1), dict(params=[head], lr=1.0)])
    base = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 8)
    sched = with_recovery(opt, base, freeze=8, recovery=4, recovery_lr=0.5, frozen_groups={0})
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[7] == pytest.approx([0.1 / 8, 1.0 / 8])
    assert [l[0] for l in lrs[8:]] == [0.0] * 4
    assert [l[1] for l in lrs[8:]] == pytest.approx([0.5, 0.375, 0.25, 0.125])


def test_straight_through_gates_pass_the_gradient_at_the_top():
    plain = finegates.Gates(6, sigma=0.0)
    st = finegates.Gates(6, sigma=0.0, straight_through=True)
    with torch.no_grad():
        st.theta.copy_(plain.theta)  # every value above 1: the clamp's top
    for g in (plain, st):
        g.train()
        g.values().sum().backward()
    assert torch.equal(plain.values(), st.values())
    assert bool((plain.theta.grad == 0).all()) and bool((st.theta.grad > 0).all())
    with torch.no_grad():
        st.theta.fill_(-2.0)  # closed: still exactly 0, no gradient
    st.theta.grad = None
    st.values().sum().backward()
    assert bool((st.values() == 0).all()) and bool((st.theta.grad == 0).all())


def test_self_distillation_teacher_is_the_model_with_its_gates_open():
    """The teacher is the same model with every gate open (no gate noise drawn); the KL term is 0
    when the student computes the same, positive once gates close."""
    from finegates.layers import gates_open
    from finegates.loss import BudgetObjective
    from finegates.app.trainer import Objective

    from families import inputs

    model = _gated("bert")
    ids, mask = inputs()
    batch = dict(input_ids=ids, attention_mask=mask)
    objective = Objective(model, BudgetObjective(model), distill_weight=1.0, distill_temperature=2.0)
    teacher = objective._teacher_logits(batch)
    with torch.no_grad():
        with gates_open(model):
            again = model.eval()(**batch).logits
        _random_closed(model, 0.0, seed=0)  # every gate open and exactly 1
        dense_like = model(**batch).logits
    assert torch.equal(teacher, again)
    torch.testing.assert_close(dense_like, teacher, rtol=1e-5, atol=1e-6)
    assert float(objective.distillation(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    _random_closed(model, 0.3, seed=1)
    with torch.no_grad():
        student = model(**batch).logits
    assert not torch.allclose(student, teacher, rtol=0, atol=1e-6)  # closing gates moves the student
    # the term itself: T^2 KL(teacher || student) at T, by hand on logits far apart
    s_logits, t_logits = torch.randn(4, 3) * 3, torch.randn(4, 3) * 3
    p_t = torch.softmax(t_logits / 2.0, -1)
    by_hand = (p_t * (p_t.log() - torch.log_softmax(s_logits / 2.0, -1))).sum(-1).mean() * 4.0
    torch.testing.assert_close(objective.distillation(s_logits, t_logits), by_hand)
    assert float(by_hand) > 1e-3


def _one_layer(rows: int = 5, cols: int = 7, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = finegates.sparsify(nn.Sequential(nn.Linear(cols, rows, bias=False)), target_sparsity=0.3,
                               target_modules=["0"], sigma=0.0, verbose=False)
    with torch.no_grad():  # values inside the clamp (and one row closed), so every open gate has a gradient
        model[0].row_gates.theta.copy_(torch.linspace(-1.5, 0.5, rows))
        model[0].col_gates.theta.copy_(torch.linspace(-0.3, 0.4, cols))
    return model.train()


def _taylor(model: nn.Module, x: torch.Tensor):
    """(g * dL/dg)^2 of L = sum(y), y = g_r * ((x * g_c) @ W^T), worked out by hand."""
    layer = model[0]
    w, gr, gc = layer.weight.detach(), layer.row_gates.eval_values().detach(), layer.col_gates.eval_values().detach()
    d_rows = ((x * gc) @ w.t()).sum(0)
    d_cols = x.sum(0) * (gr @ w)
    return (gr * d_rows).square(), (gc * d_cols).square()


def test_saliency_is_the_squared_taylor_estimate_averaged():
    from finegates.saliency import GateSaliency

    model = _one_layer()
    sal = GateSaliency(model, beta=0.75)
    xs = [torch.randn(4, 7), torch.randn(3, 7)]
    for x in xs:
        model(x).sum().backward()
        sal.step()
    (r1, c1), (r2, c2) = (_taylor(model, x) for x in xs)
    rows, cols = sal.scores[0]
    torch.testing.assert_close(rows, 0.25 * (0.75 * r1 + r2))
    torch.testing.assert_close(cols, 0.25 * (0.75 * c1 + c2))
    assert bool((rows[:2] == 0).all()) and bool((rows[2:] > 0).all())  # the two closed rows score 0
    torch.testing.assert_close(sal.ranking(), torch.cat((rows / 7, cols / 5)))
    sal.stop()
    before = rows.clone()
    model(xs[0]).sum().backward()
    sal.step()
    assert torch.equal(sal.scores[0][0], before * 0.75)  # stopped: no more gathering, a step only decays


def test_saliency_scores_a_step_as_its_whole_batch():
    """Micro-batches of one step (accumulation, or the processes of a data-parallel run) add their
    g * dL/dg before it is squared: two halves score as the whole batch does in one backward."""
    from finegates.saliency import GateSaliency

    x = torch.randn(6, 7)
    halves, whole = _one_layer(), _one_layer()
    by_halves, by_whole = GateSaliency(halves, beta=0.5), GateSaliency(whole, beta=0.5)
    for part in x.split(3):
        halves(part).sum().backward()
    by_halves.step()
    whole(x).sum().backward()
    by_whole.step()
    rows, cols = _taylor(whole, x)
    for got, want in zip(by_halves.scores[0], (rows, cols)):
        torch.testing.assert_close(got, 0.5 * want)
    summed_squares = sum(_taylor(whole, part)[0] for part in x.split(3))
    assert not torch.allclose(0.5 * summed_squares, by_halves.scores[0][0])  # squaring each half would differ


def test_saliency_ignores_no_grad_forwards_and_survives_a_checkpoint():
    from finegates.saliency import GateSaliency

    model = _one_layer()
    sal = GateSaliency(model)
    with torch.no_grad():
        model(torch.randn(2, 7))
    assert all(bool((s == 0).all()) for s in sal.scores[0])
    model(torch.randn(2, 7)).sum().backward()
    sal.step()
    assert bool((sal.scores[0][1] > 0).all())
    again = GateSaliency(_one_layer(seed=1))
    again.load_state_dict(sal.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.scores[0], sal.scores[0]))
    with pytest.raises(ValueError, match="beta must lie in"):
        GateSaliency(model, beta=1.0)


def test_close_to_budget_by_rank_closes_the_lowest_ranked():
    model, layer = _ten_by_ten()
    with torch.no_grad():
        layer.row_gates.theta.copy_(torch.linspace(2, 1, 10))  # values fall along the rows...
        layer.col_gates.theta.fill_(3.0)
    rank = torch.cat((torch.tensor([5.0, 0.1, 5.0, 0.2] + [5.0] * 6), torch.full((10,), 9.0)))
    done = close_to_budget(model, 0.2, rank=rank)  # ...but the rank closes rows 1 and 3
    assert done["removed_fraction"] == pytest.approx(0.2) and done["newly_closed"] == 2
    assert (layer.row_gates.eval_values() > 0).tolist() == [True, False, True, False] + [True] * 6
    with pytest.raises(ValueError, match="rank must hold 20 finite numbers"):
        close_to_budget(model, 0.2, rank=torch.ones(19))
    with pytest.raises(ValueError, match="rank must hold 20 finite numbers.*NaN"):
        close_to_budget(model, 0.2, rank=torch.full((20,), float("nan")))
