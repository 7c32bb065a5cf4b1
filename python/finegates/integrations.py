"""FineGates inside the Hugging Face ``Trainer`` (and anything built on it, such as TRL's trainers).

    model = finegates.sparsify(model, target_sparsity=0.3, lora_rank=8)
    trainer = FineGatesTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                               sparsity_lambda=5.0, sparsity_start=50, sparsity_warmup=50, gate_lr=0.05)
    trainer.train()
    trainer.compact_and_save("out/compact")      # optional: the physically smaller model

What it adds to ``Trainer``: ``lambda(step) * sparsity_loss`` on the training loss, the gate logits in
their own optimizer group (``gate_lr``, no weight decay) beside the rest (``args.learning_rate``), and
``lambda``, ``sparsity_loss`` and ``keep_fraction`` in the Trainer's own logs. Distribution,
mixed precision, gradient accumulation and checkpoints are the Trainer's (Accelerate underneath).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer

from .loss import SparsitySchedule, sparsity_loss
from .report import keep_fraction
from .sparsify import gated_layers, param_groups

__all__ = ["FineGatesTrainer"]


class FineGatesTrainer(Trainer):
    """``transformers.Trainer`` for a model with FineGates (:func:`finegates.sparsify` first)."""

    def __init__(self, *args, sparsity_lambda: float = 5.0, sparsity_start: int = 0, sparsity_warmup: int = 0,
                 sparsity_ramp: str = "linear", gate_lr: float = 0.05, kurtosis: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if not gated_layers(self.model):
            raise ValueError("FineGatesTrainer: the model has no gated layer; call finegates.sparsify(model, ...) first")
        self.sparsity_schedule = SparsitySchedule(sparsity_lambda, sparsity_start, sparsity_warmup, sparsity_ramp)
        self.gate_lr = float(gate_lr)
        self.kurtosis = kurtosis
        self._last_sparsity: Optional[float] = None

    def create_optimizer(self, model=None):
        """The Trainer's optimizer class and settings over FineGates' groups: gate logits at
        ``gate_lr`` without weight decay, everything else that trains at ``args.learning_rate``."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = param_groups(opt_model, self.gate_lr, self.args.learning_rate)
            groups = groups[1:] + groups[:1]  # gates last: the Trainer logs the first group's learning rate
            for g in groups:
                g.setdefault("weight_decay", self.args.weight_decay)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs.pop("lr", None)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        lam = self.sparsity_schedule(self.state.global_step)
        if model.training and lam > 0:
            sp = sparsity_loss(self.accelerator.unwrap_model(model), kurtosis=self.kurtosis)
            loss = loss + lam * sp.to(loss.dtype)
            self._last_sparsity = float(sp.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """The Trainer's logs, with the gates' state (only where the training loss is logged)."""
        if "loss" in logs:
            logs["lambda"] = self.sparsity_schedule(self.state.global_step)
            logs["keep_fraction"] = keep_fraction(self.accelerator.unwrap_model(self.model))
            if self._last_sparsity is not None:
                logs["sparsity_loss"] = self._last_sparsity
        super().log(logs, *args, **kwargs)

    @torch.no_grad()
    def compact_and_save(self, path=None, tokenizer=None):
        """Compacts the trained model in place (eval mode, no gates left) and, with ``path``, writes
        it with :func:`finegates.save_compact` (main process only). Returns the compact model."""
        from .compact import compact
        from .serialize import save_compact

        self.accelerator.wait_for_everyone()
        model = compact(self.accelerator.unwrap_model(self.model).eval())
        if path is not None and self.is_world_process_zero():
            save_compact(model, path, tokenizer=tokenizer or getattr(self, "processing_class", None))
        return model
