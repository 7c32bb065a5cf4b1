"""Two CPU processes (gloo, ``torchrun``) train like one process with the same global batch.

Tolerance: the two runs differ only in float rounding (DDP averages two half-batch gradients where
the single process averages one full batch; dynamic padding differs per half batch), so after 4
AdamW steps every gate logit agrees within 1e-5 absolute (logits are O(1)); the metrics are equal.
The ranks themselves must stay bitwise in sync: ``rank_divergence`` (the largest difference of
per-parameter checksums across processes, computed by the trainer) is exactly 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli import sst_small, tiny_bert  # noqa: F401  (fixtures)

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _gates(ckpt: Path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(ckpt / "model.safetensors").items() if k.endswith("gates.theta")}


@pytest.mark.slow
def test_two_processes_match_one(tiny_bert, sst_small, tmp_path):  # noqa: F811
    train, val = sst_small

    def args(out, batch):
        return ["finetune", "--model", str(tiny_bert), "--train-file", str(train), "--validation-file", str(val),
                "--output-dir", str(out), "--batch-size", str(batch), "--max-length", "32", "--max-steps", "4",
                "--gate-lr", "0.1", "--target-sparsity", "0.5", "--cpu", "--recovery-steps", "1",
                "--checkpointing-steps", "4", "--no-compact", "--eval-batch-size", "8",
                "--sparsity-start", "0", "--lora-rank", "0"]

    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "finegates", *args(one, 8)], env=ENV, capture_output=True,
                        text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "finegates", *args(two, 4)], env=ENV, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["num_processes"] == 1 and m2["num_processes"] == 2
    assert m2["rank_divergence"] == 0.0
    assert m1["steps"] == m2["steps"] == 4
    for k in ("accuracy", "f1", "removed_fraction"):
        assert m1[k] == m2[k], k
    g1, g2 = _gates(one / "checkpoints" / "step-4"), _gates(two / "checkpoints" / "step-4")
    assert g1.keys() == g2.keys() and g1
    worst = max((g1[k] - g2[k]).abs().max().item() for k in g1)
    assert worst <= 1e-5, worst
    moved = max((g1[k] - 1.0).abs().max().item() for k in g1)
    assert moved > 0.2  # the gates trained (init ~ N(1, 0.1), 4 steps of lr 0.1)
