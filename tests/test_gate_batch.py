"""The batched gate pass of the training loop samples what the layers would sample themselves."""

from __future__ import annotations

import pytest
import torch

import finegates
from finegates.app.trainer import Objective
from finegates.gate_batch import GateBatch
from finegates.layers import GatedLinear
from finegates.loss import BudgetObjective, ReferenceObjective

from families import BUILDERS, inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str = "bert", sigma: float = 0.0, lora_rank: int = 2):
    torch.manual_seed(0)
    model = finegates.sparsify(BUILDERS[family](), target_sparsity=0.3, sigma=sigma, lora_rank=lora_rank, verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # some gates closed, some inside the clamp, some above its top
        for m in model.modules():
            if isinstance(m, GatedLinear):
                for gates in (m.row_gates, m.col_gates):
                    gates.theta.copy_(torch.randn(gates.size, generator=g) * 1.2 + 0.5)
    return model.train()


def _step(model, sparsity, batched: bool, lm: bool):
    """Loss and every trainable gradient of one Objective forward + backward (dropout off)."""
    objective = Objective(model, sparsity)
    if not batched:
        objective._batch_usable = False
    ids, mask = inputs()
    for p in model.parameters():
        p.grad = None
    out, sp = objective(dict(input_ids=ids, attention_mask=mask, labels=ids if lm else torch.tensor([0, 1])))
    (out.loss + 0.7 * sp).backward()
    return out.loss.detach(), sp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("objective", ["budget", "reference"])
def test_batched_gates_give_the_layers_own_loss_and_gradients(family, objective, monkeypatch):
    model = _model(family)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    sparsity = BudgetObjective(model) if objective == "budget" else ReferenceObjective()
    own = _step(model, sparsity, batched=False, lm=family == "llama")

    def sampled_by_the_layer(self):
        raise AssertionError("a layer sampled its own gates in a batched forward")

    monkeypatch.setattr(finegates.Gates, "values", sampled_by_the_layer)
    batch = _step(model, sparsity, batched=True, lm=family == "llama")
    torch.testing.assert_close(batch[0], own[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(batch[1], own[1], rtol=1e-6, atol=1e-7)
    assert batch[2].keys() == own[2].keys() and any(n.endswith("gates.theta") for n in own[2])
    for name in own[2]:
        torch.testing.assert_close(batch[2][name], own[2][name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(m.sampled_gates is None for m in model.modules() if isinstance(m, GatedLinear))  # cleared


def test_batched_noise_has_each_vectors_scale():
    model = _model(sigma=0.0)
    layers = [m for m in model.modules() if isinstance(m, GatedLinear)]
    layers[0].row_gates.sigma = 0.5  # one noisy vector, the others deterministic
    torch.manual_seed(3)
    GateBatch(model).sample()
    noisy, plain = layers[0].sampled_gates[0], layers[1].sampled_gates[0]
    expect = lambda gates: torch.clamp(torch.tanh(gates.theta) + 0.5, 0, 1)  # noqa: E731
    assert not torch.allclose(noisy, expect(layers[0].row_gates))
    torch.testing.assert_close(plain, expect(layers[1].row_gates))


def test_batched_gates_refuse_nan_and_mixed_models():
    model = _model()
    batch = GateBatch(model)
    assert batch.usable()
    layer = next(m for m in model.modules() if isinstance(m, GatedLinear))
    with torch.no_grad():
        layer.col_gates.theta[0] = float("nan")
    with pytest.raises(ValueError, match="theta contain NaN"):
        batch.sample()
    layer.col_gates.straight_through = not layer.row_gates.straight_through
    assert not batch.usable()  # two gradient rules: the layers sample themselves
