"""Mean pooling for Hugging Face sequence classifiers whose head reads the first token.

BERT-style classifiers feed the first token (CLS) through a pooler (``bert.pooler``) or a
classification head (``RobertaClassificationHead``). A sentence-transformers backbone such as
all-MiniLM-L6-v2 was trained for the attention-masked *mean* of its token states instead, and a frozen
backbone never learns a good CLS feature. :func:`use_mean_pooling` makes the head read that mean, with
hooks only: the parameters and their names stay those of the stock class, so ``save_compact`` /
``load_compact`` and checkpoints work unchanged, and ``config.finegates_pooling = "mean"`` tells
``load_compact`` to apply it again.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from torch import Tensor, nn

__all__ = ["use_mean_pooling", "pooling_of_checkpoint", "POOLINGS", "CONFIG_KEY"]

POOLINGS = ("cls", "mean")
CONFIG_KEY = "finegates_pooling"
_FLAG = "_finegates_mean_pool"


def pooling_of_checkpoint(path: Optional[str]) -> Optional[str]:
    """``"mean"`` or ``"cls"`` when a local model directory says how it was trained to pool
    (sentence-transformers ``1_Pooling/config.json``), else None."""
    cfg = os.path.join(path, "1_Pooling", "config.json") if path and os.path.isdir(path) else None
    if not cfg or not os.path.isfile(cfg):
        return None
    try:
        with open(cfg) as f:
            modes = json.load(f)
    except (OSError, ValueError):
        return None
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    return None


def _first_token_reader(model: nn.Module) -> Optional[nn.Module]:
    """The module that reads the first token of the last hidden states: a pooler, else a
    classification head that takes the whole sequence (RoBERTa-style)."""
    for n, m in model.named_modules():
        if n.rpartition(".")[2] == "pooler" and hasattr(m, "dense"):
            return m
    head = getattr(model, "classifier", None)
    if head is not None and hasattr(head, "dense") and hasattr(head, "out_proj"):
        return head
    return None


def _stash_mask(backbone: nn.Module, args, kwargs) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
        mask = args[1]
    backbone._finegates_mask = mask


def _mean_first_token(reader: nn.Module, args):
    hidden = args[0]
    mask = getattr(reader._finegates_backbone, "_finegates_mask", None)
    if mask is None or mask.shape != hidden.shape[:2]:
        mean = hidden.mean(1)
    else:
        w = mask.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
    return (mean.unsqueeze(1),) + tuple(args[1:])


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Makes ``model``'s head read the attention-masked mean of the token states (in place)."""
    reader = _first_token_reader(model)
    if reader is None:
        raise ValueError(
            f"mean pooling: {type(model).__name__} has no pooler or classification head that reads the first "
            "token (BERT, RoBERTa and their relatives have one); use --pooling cls"
        )
    if not getattr(reader, _FLAG, False):
        # the mask is taken where the backbone is called (PEFT calls the top model's forward directly)
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
        setattr(reader, _FLAG, True)
        object.__setattr__(reader, "_finegates_backbone", backbone)  # a reference, not a submodule
        reader.register_forward_pre_hook(_mean_first_token)
        backbone.register_forward_pre_hook(_stash_mask, with_kwargs=True)
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_KEY, "mean")
    return model
