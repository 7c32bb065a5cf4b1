"""Runs on several processes, each on the CPU (gloo), against the same run on one process.

DDP and FSDP2, through ``accelerate launch`` / ``torchrun``: the command line's three workflows and
``FineGatesTrainer``. These tests start processes (20-40 s each on 2 cores): they are marked
``distributed``, left out of the default test command and run by CI (``pytest -m distributed``).

Tolerances. The multi-process run and the one-process run with the same global batch see the same
examples and the same gate noise (every process seeds its RNG alike); they differ only in float
rounding: the gradient is the mean of two half-batch means (DDP all-reduce, FSDP reduce-scatter)
instead of one full-batch mean, and dynamic padding differs per half batch. Over the few AdamW steps
here that leaves losses within 1e-4 relative and gate logits within 1e-4 absolute (logits are O(1);
a wrong sparsity term or an unsynchronised gate would move them by 1e-2 or more). Under DDP the
ranks themselves stay bitwise equal (``rank_divergence`` 0); FSDP keeps one copy of every parameter.
A resumed FSDP run replays the uninterrupted one exactly.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finegates
from test_cli import _gates, _llama_config, corpus, minilm, sst_small, tiny_bert, tiny_llama  # noqa: F401  (fixtures)

pytestmark = pytest.mark.distributed

TESTS = Path(__file__).parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

def _fsdp(block: str):
    return ["-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--use_fsdp", "--fsdp_version", "2",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", block,
            "-m", "finegates"]


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "finegates"]


def _run(launcher, args, expect=0):
    r = subprocess.run([sys.executable, *launcher, *args], env=ENV, capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    if expect is not None:
        assert r.returncode == expect, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def _metrics(out: Path):
    return json.loads((out / "metrics.json").read_text())


def _log(out: Path):
    return list(csv.DictReader(open(out / "train_log.csv")))


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def _same_run(one: Path, many: Path, metric: str, rtol: float = 1e-4):
    """The multi-process FSDP run ``many`` trained like ``one`` and ended as a one-process run does."""
    m1, m2 = _metrics(one), _metrics(many)
    assert (m1["num_processes"], m1["engine"]) == (1, "single")
    assert (m2["num_processes"], m2["engine"], m2["device"]) == (2, "fsdp2", "cpu")
    assert m1["steps"] == m2["steps"]
    l1, l2 = _log(one), _log(many)
    assert [r["step"] for r in l1] == [r["step"] for r in l2]
    for a, b in zip(l1, l2):
        for k in ("loss", "task_loss", "sparsity_loss", "keep_fraction"):
            assert _close(float(a[k]), float(b[k]), rtol), (k, a, b)
    assert _close(m1[metric], m2[metric], rtol)
    assert _close(m2[f"compact_{metric}"], m2[metric], 1e-5)  # compacted from the gathered full state dict
    assert m1["params_compact"] == m2["params_compact"] == m2["compact_model_params"]
    compact = finegates.load_compact(many / "compact")
    assert sum(p.numel() for p in compact.parameters()) == m2["params_compact"]
    assert (many / "sparsity_per_layer.png").exists() and (many / "layers.json").exists()


def _fsdp_gates(checkpoint: Path):
    """The gate logits of an FSDP checkpoint (a sharded torch.distributed.checkpoint), read on one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = checkpoint.parent / (checkpoint.name + ".pt")
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", whole)
    state = torch.load(whole, weights_only=True)
    state = state.get("model", state)
    return {k: v for k, v in state.items() if k.endswith("gates.theta")}


def _pretrain_args(cfg, corpus, out, batch, *extra):  # noqa: F811
    return ["pretrain", "--cpu", "--config", str(cfg), "--tokenizer", str(minilm.get_model_path()), "--train-file", str(corpus),
            "--block-size", "32", "--batch-size", str(batch), "--max-steps", "6", "--logging-steps", "1",
            "--seed", "0", "--sparsity-start", "0", "--sparsity-warmup", "0", "--lr-scheduler", "constant",
            "--warmup-steps", "0", "--latency-batch-size", "4", "--output-dir", str(out), *extra]


def test_fsdp_pretrain_matches_one_process_and_resumes(corpus, tmp_path):  # noqa: F811
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(_llama_config().to_dict()))
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    fsdp = _fsdp("LlamaDecoderLayer")
    _run(["-m", "finegates"], _pretrain_args(cfg, corpus, one, 4, "--checkpointing-steps", "6"))
    _run(fsdp, _pretrain_args(cfg, corpus, two, 2, "--checkpointing-steps", "3"))
    _same_run(one, two, "perplexity")
    g_one, g_two = _gates(one / "checkpoints" / "step-6"), _fsdp_gates(two / "checkpoints" / "step-6")
    assert g_one.keys() == g_two.keys() and g_one
    assert max((g_one[k] - g_two[k]).abs().max().item() for k in g_one) <= 1e-4
    assert max((g_one[k] - 1.0).abs().max().item() for k in g_one) > 0.05  # the gates trained
    # Stopped after 3 steps and resumed under FSDP: the uninterrupted run's log, gates and result.
    _run(fsdp, _pretrain_args(cfg, corpus, resumed, 2, "--checkpointing-steps", "3", "--max-steps", "3"))
    _run(fsdp, _pretrain_args(cfg, corpus, resumed, 2, "--checkpointing-steps", "3",
                              "--resume-from-checkpoint", "latest"))
    assert [r for r in _log(resumed) if r["step"] != "3"] == [r for r in _log(two) if r["step"] != "3"]
    g_two, g_resumed = (_fsdp_gates(d / "checkpoints" / "step-6") for d in (two, resumed))
    assert g_two.keys() == g_resumed.keys() and g_two
    assert all(torch.equal(g_two[k], g_resumed[k]) for k in g_two)
    assert _metrics(resumed)["perplexity"] == _metrics(two)["perplexity"]


def test_fsdp_posttrain_without_cpu_flag_forms_one_group(tiny_llama, corpus, tmp_path):  # noqa: F811
    """No --cpu and no GPU: the launched processes still train as one FSDP group on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the launch would train there")

    def args(out, batch):
        return ["posttrain", "--model", str(tiny_llama), "--train-file", str(corpus), "--block-size", "32",
                "--batch-size", str(batch), "--max-steps", "4", "--logging-steps", "1", "--seed", "0",
                "--gate-lr", "0.1", "--sparsity-start", "0", "--sparsity-warmup", "0", "--target-sparsity", "0.3",
                "--latency-batch-size", "4", "--output-dir", str(out)]

    one, two = tmp_path / "one", tmp_path / "two"
    _run(["-m", "finegates"], args(one, 4))
    _run(_fsdp("LlamaDecoderLayer"), args(two, 2))
    _same_run(one, two, "perplexity")


def test_fsdp_finetune_matches_one_process(tiny_bert, sst_small, tmp_path):  # noqa: F811
    train, val = sst_small

    def args(out, batch):
        return ["finetune", "--cpu", "--model", str(tiny_bert), "--train-file", str(train), "--validation-file",
                str(val), "--output-dir", str(out), "--batch-size", str(batch), "--max-length", "32",
                "--max-steps", "4", "--logging-steps", "1", "--gate-lr", "0.1", "--target-sparsity", "0.5",
                "--sparsity-start", "0", "--sparsity-warmup", "0", "--lora-rank", "2", "--eval-batch-size", "8",
                "--latency-batch-size", "8"]

    one, two = tmp_path / "one", tmp_path / "two"
    _run(["-m", "finegates"], args(one, 8))
    _run(_fsdp("BertLayer"), args(two, 4))
    _same_run(one, two, "accuracy")


def test_fsdp_version_1_is_refused_before_anything_is_written(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "never"
    launch = _fsdp("LlamaDecoderLayer")
    launch[launch.index("--fsdp_version") + 1] = "1"
    r = _run(launch, ["pretrain", "--cpu", "--config", "llama_9m", "--tokenizer", str(minilm.get_model_path()), "--train-file",
                      str(corpus), "--max-steps", "2", "--output-dir", str(out)], expect=None)
    assert r.returncode != 0  # each process exits 2; the launcher reports the failure with its own code
    said = [line for line in (r.stdout + r.stderr).splitlines() if "finegates pretrain: error:" in line]
    assert len(said) == 1 and "--fsdp_version 2" in said[0], said
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_ddp_two_processes_match_one(tiny_bert, sst_small, tmp_path):  # noqa: F811
    train, val = sst_small

    def args(out, batch):
        return ["finetune", "--model", str(tiny_bert), "--train-file", str(train), "--validation-file", str(val),
                "--output-dir", str(out), "--batch-size", str(batch), "--max-length", "32", "--max-steps", "4",
                "--gate-lr", "0.1", "--target-sparsity", "0.5", "--cpu", "--recovery-steps", "1",
                "--checkpointing-steps", "4", "--no-compact", "--eval-batch-size", "8",
                "--sparsity-start", "0", "--lora-rank", "0"]

    one, two = tmp_path / "one", tmp_path / "two"
    _run(["-m", "finegates"], args(one, 8))
    _run(TORCHRUN, args(two, 4))
    m1, m2 = _metrics(one), _metrics(two)
    assert (m1["num_processes"], m2["num_processes"], m2["engine"]) == (1, 2, "ddp")
    assert m2["rank_divergence"] == 0.0
    assert m1["steps"] == m2["steps"] == 4
    for k in ("accuracy", "f1", "removed_fraction"):
        assert m1[k] == m2[k], k
    g1, g2 = _gates(one / "checkpoints" / "step-4"), _gates(two / "checkpoints" / "step-4")
    assert g1.keys() == g2.keys() and g1
    assert max((g1[k] - g2[k]).abs().max().item() for k in g1) <= 1e-5  # DDP: one more reduction order, no more
    assert max((g1[k] - 1.0).abs().max().item() for k in g1) > 0.2  # the gates trained (init ~ N(1, 0.1))


def test_trainer_under_ddp(tmp_path):
    """FineGatesTrainer on two processes: the gates stay equal, the compact model is written once."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(TESTS / "ddp_trainer_run.py"), str(tmp_path)], env=ENV, check=True, timeout=600,
                   capture_output=True, stdin=subprocess.DEVNULL)
    r0, r1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["gates"] == r1["gates"]
    assert r0["saves"] == [str(tmp_path / "compact")] and r1["saves"] == []
    assert r0["keep"][-1] < 1.0  # the gates closed during training
    from families import inputs, logits

    ids, mask = inputs()
    loaded = finegates.load_compact(tmp_path / "compact")
    torch.testing.assert_close(logits(loaded, ids, mask), torch.tensor(r0["logits"]), rtol=1e-5, atol=1e-5)
