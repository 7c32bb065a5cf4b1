"""Run under ``torchrun --nproc_per_node 2`` by test_distributed.py: FineGatesTrainer on a tiny BERT
classifier, each process on its own CPU; writes what the test compares into OUT_DIR/rank-<r>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import finegates  # noqa: E402
import finegates.compaction.serialize  # noqa: E402
from families import build, inputs, logits  # noqa: E402
from finegates.integrations import FineGatesTrainer  # noqa: E402
from test_integrations import _data  # noqa: E402


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    saves = []
    real_save = finegates.compaction.serialize.save_compact
    finegates.compaction.serialize.save_compact = lambda *a, **kw: (saves.append(str(a[1])), real_save(*a, **kw))[1]
    torch.manual_seed(0)
    model = build("bert")
    finegates.sparsify(model, target_sparsity=0.5, lora_rank=2, verbose=False)
    args = transformers.TrainingArguments(
        output_dir=str(out / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = FineGatesTrainer(model=model, args=args, train_dataset=_data(), sparsity_start=0,
                               sparsity_warmup=2, gate_lr=0.5)
    trainer.train()
    gates = torch.cat([g.theta.detach().flatten() for _, layer in finegates.gated_layers(model)
                       for g in (layer.row_gates, layer.col_gates)])
    model.eval()
    ids, mask = inputs()
    gated_logits = logits(model, ids, mask)
    trainer.compact_and_save(out / "compact")
    record = dict(world=trainer.accelerator.num_processes, gates=gates.tolist(), saves=saves,
                  logits=gated_logits.tolist(), keep=[h["keep_fraction"] for h in trainer.state.log_history
                                                       if "keep_fraction" in h])
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
