"""The evaluation loops of the recipes: one per kind of task, used both during training (through
Accelerate, whose ``gather_for_metrics`` collects every process's share) and on the compact model
after it (a plain loop in one process)."""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch

from .glue import compute_metrics

__all__ = ["classification_metrics", "lm_metrics", "plain_evaluator"]

# (model outputs of one batch) from a batch with labels.
Forward = Callable[[Dict[str, torch.Tensor]], object]


def _identity(t):
    return t


def classification_metrics(forward: Forward, batches, task: str, num_labels: int, gather=_identity) -> Dict[str, float]:
    """GLUE metrics of the predictions over ``batches`` (regression when ``num_labels == 1``)."""
    preds, golds = [], []
    for batch in batches:
        logits = forward(batch).logits
        pred = logits.squeeze(-1).float() if num_labels == 1 else logits.argmax(-1)
        pred, gold = gather((pred, batch["labels"]))
        preds.append(pred.cpu())
        golds.append(gold.cpu())
    return compute_metrics(task, torch.cat(preds).numpy(), torch.cat(golds).numpy(), num_labels)


def lm_metrics(forward: Forward, batches, gather=_identity) -> Dict[str, float]:
    """Token-weighted causal-LM loss over ``batches`` and its perplexity. Summed per sequence before
    gathering: ``gather_for_metrics`` drops the sequences repeated to even out the processes' last
    batches by their position along the first dimension, which per-batch sums would not have."""
    total, count = 0.0, 0
    for batch in batches:
        logits = forward(batch).logits
        # The next token's label at each position (the last predicts none): no shifted copy of the logits.
        labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                       reduction="none", ignore_index=-100)
        loss, n = gather((token_loss.view(labels.shape).sum(1), (labels != -100).sum(1)))
        total += float(loss.double().sum())
        count += int(n.sum())
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def plain_evaluator(metrics_fn, dataset, batch_size: int, collate_fn, desc: str = "evaluate (compact)", **kw):
    """``model -> metrics`` on ``dataset`` in this process, no gradients (the compact model), with a
    progress bar (a large validation set takes minutes on a CPU)."""
    from tqdm.auto import tqdm

    def run(model) -> Dict[str, float]:
        dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
        with torch.no_grad():
            return metrics_fn(lambda batch: model(**batch), tqdm(dl, desc=desc, dynamic_ncols=True, leave=False), **kw)

    return run
