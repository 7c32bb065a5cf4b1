"""FineGates inside the Hugging Face ``Trainer`` (and anything built on it, such as TRL's trainers).

    model = finegates.sparsify(model, target_sparsity=0.4, lora_rank=8)
    trainer = FineGatesTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                               sparsity_start=50, sparsity_warmup=250, recovery_steps=100, gate_lr=0.05)
    trainer.train()
    trainer.compact_and_save("out/compact")      # the physically smaller model, 40% of the gated layers removed

What it adds to ``Trainer``: the sparsity objective on the training loss (by default the size budget
of :mod:`finegates.budget`: the target ramps to ``sparsify``'s ``target_sparsity`` over
``sparsity_warmup`` steps, a learned multiplier holds the model to it, and at ``max_steps -
recovery_steps`` (or after the last step) the gates close exactly to it; ``sparsity_objective=
"reference"`` is the paper's per-layer objective with a fixed ``sparsity_lambda``), the gate logits
in their own optimizer group (``gate_lr``, no weight decay) beside the rest (``args.learning_rate``),
and ``lambda``, ``sparsity_loss`` and ``keep_fraction`` in the Trainer's own logs. Distribution,
mixed precision, gradient accumulation and checkpoints are the Trainer's (Accelerate underneath);
the sparsity term is scaled like the task loss under gradient accumulation. The sparsity settings
are keywords of the same name or, as one object, ``options=finegates.TrainOptions(...)`` (the
command line's record of a run; its other fields are the ``TrainingArguments``' business).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

import fg_kernels

from .budget import BudgetController, close_to_budget, with_recovery
from .config import TrainOptions, closure_rank_for
from .layers import GatedLinear
from .loss import OBJECTIVES, BudgetObjective, ReferenceObjective, SparsitySchedule
from .report import keep_fraction
from .saliency import GateSaliency
from .sparsify import gated_layers, param_groups

__all__ = ["FineGatesTrainer"]


class _AfterStep(TrainerCallback):
    """The budget controller's update after every optimizer step, and the freeze."""

    def __init__(self, trainer: "FineGatesTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._freeze(closing=True)


# The Trainer's sparsity settings (keywords of the same name, or the fields of a TrainOptions) and
# their defaults.
_SPARSITY_DEFAULTS = dict(sparsity_objective="budget", sparsity_lambda=5.0, sparsity_start=0, sparsity_warmup=0,
                          sparsity_ramp="linear", budget_penalty=50.0, budget_multiplier_lr=1.0, recovery_steps=0,
                          recovery_lr=0.5, kurtosis=False, closure_rank=None)


def _sparsity_settings(options: TrainOptions) -> dict:
    if not isinstance(options, TrainOptions):
        raise TypeError(f"FineGatesTrainer: options must be a finegates.TrainOptions, got {type(options).__name__}")
    if options.recovery_steps is None:
        raise ValueError("FineGatesTrainer: options.recovery_steps must be a number of steps (None, a fifth of the "
                         "run, is the command line's)")
    return {k: getattr(options, k) for k in _SPARSITY_DEFAULTS}


class FineGatesTrainer(Trainer):
    """``transformers.Trainer`` for a model with FineGates (:func:`finegates.sparsify` first)."""

    def __init__(self, *args, options: Optional[TrainOptions] = None, gate_lr: float = 0.05, **kwargs):
        given = {k: kwargs.pop(k) for k in _SPARSITY_DEFAULTS if k in kwargs}
        if options is not None and given:
            raise TypeError(f"FineGatesTrainer: pass options or its sparsity fields, not both (got {sorted(given)})")
        settings = _sparsity_settings(options) if options is not None else {**_SPARSITY_DEFAULTS, **given}
        s = SimpleNamespace(**settings)
        super().__init__(*args, **kwargs)
        layers = [m for _, m in gated_layers(self.model)]
        if not layers:
            raise ValueError("FineGatesTrainer: the model has no gated layer; call finegates.sparsify(model, ...) first")
        if s.sparsity_objective not in OBJECTIVES:
            raise ValueError(f"FineGatesTrainer: sparsity_objective must be one of {OBJECTIVES}, got {s.sparsity_objective!r}")
        if int(s.recovery_steps) != s.recovery_steps or s.recovery_steps < 0:
            raise ValueError(f"FineGatesTrainer: recovery_steps must be an integer >= 0, got {s.recovery_steps!r}")
        self.gate_lr = float(gate_lr)
        self.recovery_steps, self.recovery_lr = int(s.recovery_steps), float(s.recovery_lr)
        self.controller: Optional[BudgetController] = None
        if s.sparsity_objective == "budget":
            if s.kurtosis:
                raise ValueError("FineGatesTrainer: kurtosis weights the reference objective (sparsity_objective='reference')")
            targets = {m.target_sparsity for m in layers}
            if len(targets) != 1:
                raise ValueError(f"FineGatesTrainer: the budget needs one target_sparsity, the gated layers have {sorted(targets)}")
            self.objective = BudgetObjective(self.model)
            self.controller = BudgetController(targets.pop(), start=s.sparsity_start, ramp_steps=s.sparsity_warmup,
                                               multiplier_lr=s.budget_multiplier_lr, penalty=s.budget_penalty)
        else:
            self.objective = ReferenceObjective(s.kurtosis)
            self.sparsity_schedule = SparsitySchedule(s.sparsity_lambda, s.sparsity_start, s.sparsity_warmup, s.sparsity_ramp)
        closure_rank = closure_rank_for(s.closure_rank, s.sparsity_objective, "FineGatesTrainer: ")
        self.saliency = GateSaliency(self.model) if closure_rank == "saliency" else None
        self._layers = [m for m in layers if m.target_sparsity is not None]
        self._last_sparsity: Optional[float] = None
        self._last_lambda = 0.0
        self._frozen = False
        self.add_callback(_AfterStep(self))

    def _freeze_at(self) -> Optional[int]:
        return self.args.max_steps - self.recovery_steps if self.recovery_steps and self.args.max_steps > 0 else None

    def _weight(self, step: int) -> float:
        freeze = self._freeze_at()
        if self._frozen or (freeze is not None and step >= freeze):
            return 0.0
        return self.controller.weight(step) if self.controller else self.sparsity_schedule(step)

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

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's schedule; with ``recovery_steps`` it ends at the freeze, after which the
        gates stop and the rest restarts at ``recovery_lr`` of its peak, decaying to 0."""
        if not self.recovery_steps or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer or self.optimizer
        freeze = num_training_steps - self.recovery_steps
        if freeze <= 0:
            raise ValueError(f"FineGatesTrainer: recovery_steps={self.recovery_steps} leaves no step to train the gates")
        base = super().create_scheduler(freeze, optimizer)
        self.lr_scheduler = with_recovery(optimizer, base, freeze, self.recovery_steps, self.recovery_lr,
                                          {len(optimizer.param_groups) - 1})
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
        lam = self._weight(self.state.global_step)
        budget_on = self.controller is not None and not self._frozen  # its controller reads S every step
        if model.training and (lam != 0 or budget_on):
            sp = self.objective.combine({m: self.objective.term(m) for m in self._layers})
            term = lam * sp.to(loss.dtype)
            if self._ga_scaled(num_items_in_batch):  # summed over the micro-batches: one step's worth in all
                term = term / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = loss + term
            self._last_sparsity = float(sp.detach())
        self._last_lambda = lam
        return (loss, outputs) if return_outputs else loss

    def _after_step(self, step: int) -> None:
        if self.saliency is not None and not self._frozen:
            self.saliency.step(self.accelerator)
        freeze = self._freeze_at()
        if freeze is not None and step >= freeze:
            self._freeze(closing=step == freeze)
        elif self.controller is not None and self._last_sparsity is not None:
            self.controller.update(step, self._last_sparsity, self.accelerator.unwrap_model(self.model))

    @torch.no_grad()
    def _freeze(self, closing: bool) -> None:
        """The exact closure to the budget (budget objective), then no gate noise."""
        if self._frozen:
            return
        raw = self.accelerator.unwrap_model(self.model)
        rank = self.saliency.final_ranking(self.accelerator) if self.saliency is not None else None
        if self.controller is not None and closing:
            close_to_budget(raw, self.controller.target_sparsity, rank=rank)
        for m in raw.modules():
            if isinstance(m, GatedLinear):
                m.row_gates.sigma = m.col_gates.sigma = 0.0
        self._frozen = True

    def log(self, logs, *args, **kwargs):
        """The Trainer's logs, with the gates' state (only where the training loss is logged):
        ``lambda`` is the weight the last step trained with."""
        if "loss" in logs:
            logs["lambda"] = self._last_lambda
            logs["keep_fraction"] = keep_fraction(self.accelerator.unwrap_model(self.model))
            if self._last_sparsity is not None:
                logs["sparsity_loss"] = self._last_sparsity
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
