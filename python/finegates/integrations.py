"""FineGates inside the Hugging Face ``Trainer`` (and anything built on it, such as TRL's trainers).

    model = finegates.sparsify(model, target_sparsity=0.4, lora_rank=8)
    trainer = FineGatesTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                               sparsity_start=50, sparsity_warmup=250, recovery_steps=100, gate_lr=0.05)
    trainer.train()
    trainer.compact_and_save("out/compact")      # the physically smaller model, 40% of the gated layers removed

It is a thin adapter: the method's schedule is the :class:`~finegates.engine.SparsityEngine`'s, the
same object the command line's loop and a plain PyTorch loop drive. The Trainer gives it its loss
(``compute_loss`` adds the engine's sparsity term), its steps (a callback), the run's length
(``create_scheduler``: ``max_steps`` or the epochs' count), its optimizer groups (gate logits at
``gate_lr``, no weight decay, the rest at ``args.learning_rate``), its checkpoints (the engine's state
beside the Trainer's, so a resume continues exactly) and its logs (``lambda``, ``sparsity_loss``,
``keep_fraction``). Distribution, mixed precision, gradient accumulation and checkpoints stay the
Trainer's (Accelerate underneath); the sparsity term is scaled like the task loss under gradient
accumulation. The sparsity settings are keywords of the same name or, as one object,
``options=finegates.TrainOptions(...)`` (e.g. a command-line run's own ``train_options.json``; its
loop fields are the ``TrainingArguments``' business), with TrainOptions' defaults.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

import fg_kernels

from .config import TrainOptions
from .engine import SparsityEngine

__all__ = ["FineGatesTrainer"]

# The TrainOptions fields the Trainer reads (the sparsity engine's); the others (batch size, steps,
# the loop's learning rate ...) are the TrainingArguments' business.
_ENGINE_FIELDS = ("target_sparsity", "sparsity_objective", "sparsity_lambda", "sparsity_start", "sparsity_warmup",
                  "sparsity_ramp", "budget_multiplier_lr", "budget_penalty", "kurtosis", "recovery_steps",
                  "recovery_lr", "closure_rank", "gate_lr")


class _EngineSteps(TrainerCallback):
    """The engine's step after every optimizer step, and its closing call at the end."""

    def __init__(self, engine: SparsityEngine):
        self.engine = engine

    def on_step_end(self, args, state, control, **kwargs):
        self.engine.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.engine.finish()


def _options(options: Optional[TrainOptions], given: dict) -> TrainOptions:
    if options is not None and given:
        raise TypeError(f"FineGatesTrainer: pass options or its sparsity fields, not both (got {sorted(given)})")
    if options is None:
        return TrainOptions(**given)
    if not isinstance(options, TrainOptions):
        raise TypeError(f"FineGatesTrainer: options must be a finegates.TrainOptions, got {type(options).__name__}")
    return options


class FineGatesTrainer(Trainer):
    """``transformers.Trainer`` for a model with FineGates (:func:`finegates.sparsify` first), driving
    a :class:`~finegates.engine.SparsityEngine` (``self.engine``) over the Trainer's own step count
    (``max_steps``, or the epochs' steps), with its state in every checkpoint."""

    def __init__(self, *args, options: Optional[TrainOptions] = None, **kwargs):
        given = {k: kwargs.pop(k) for k in _ENGINE_FIELDS if k in kwargs}
        opts = _options(options, given)
        super().__init__(*args, **kwargs)
        self.engine = SparsityEngine(self.model, opts, accelerator=self.accelerator,
                                     say=lambda msg: self.is_world_process_zero() and print(msg))
        self.add_callback(_EngineSteps(self.engine))

    def create_optimizer(self, model=None):
        """The Trainer's optimizer class and settings over FineGates' groups: gate logits at
        ``options.gate_lr`` without weight decay, everything else that trains at ``args.learning_rate``."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = self.engine.param_groups(self.args.learning_rate)
            groups = groups[1:] + groups[:1]  # gates last: the Trainer logs the first group's learning rate
            for g in groups:
                g.setdefault("weight_decay", self.args.weight_decay)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs.pop("lr", None)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's schedule up to the engine's freeze, then the recovery phase
        (:meth:`SparsityEngine.lr_scheduler`); ``num_training_steps`` is the Trainer's count of the
        run's optimizer steps, from ``max_steps`` or the epochs."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        self.engine.plan(num_training_steps)
        optimizer = optimizer or self.optimizer
        base = super().create_scheduler(self.engine.freeze_step or num_training_steps, optimizer)
        self.lr_scheduler = self.engine.lr_scheduler(optimizer, base)
        return self.lr_scheduler

    def _ga_scaled(self, num_items_in_batch) -> bool:
        """Whether the Trainer leaves the loss undivided by the accumulation steps (the model or
        ``compute_loss_func`` normalised it by the items of the whole accumulated batch)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return (bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None) or \
            getattr(self, "compute_loss_func", None) is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            term = self.engine.sparsity_term().to(loss.dtype)
            if self._ga_scaled(num_items_in_batch):  # summed over the micro-batches: one step's worth in all
                term = term / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's checkpoint, with the engine's state (JSON and safetensors) beside it."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.engine.save(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.engine.load(checkpoint)

    def log(self, logs, *args, **kwargs):
        """The Trainer's logs, with the gates' state (only where the training loss is logged):
        ``lambda`` is the weight the last step trained with."""
        if "loss" in logs:
            values = self.engine.log_values()
            logs.update({k: values[k] for k in ("lambda", "keep_fraction", "sparsity_loss") if k in values})
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's evaluation (and prediction) loop; the gates are fixed there, so each
        frozen weight's gate-folded block is built once, not once per batch."""
        with fg_kernels.frozen_weights():
            return super().evaluation_loop(*args, **kwargs)

    @torch.no_grad()
    def compact_and_save(self, path=None, tokenizer=None):
        """Compacts the trained model in place (eval mode, no gates left) and, with ``path``, writes
        it with :func:`finegates.save_compact` (main process only). Returns the compact model."""
        from .compaction.compact import compact
        from .compaction.serialize import save_compact

        self.accelerator.wait_for_everyone()
        model = compact(self.accelerator.unwrap_model(self.model).eval())
        if path is not None and self.is_world_process_zero():
            save_compact(model, path, tokenizer=tokenizer or getattr(self, "processing_class", None))
        return model
