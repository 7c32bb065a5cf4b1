"""The sparsity engine: the method's schedule over a run, one object that any training loop drives.

    engine = finegates.SparsityEngine(model, finegates.TrainOptions(...), total_steps=500)
    optimizer = torch.optim.AdamW(engine.param_groups(lr=2e-3))
    scheduler = engine.lr_scheduler(optimizer)
    for batch in batches:                                  # total_steps optimizer steps
        loss = model(**batch).loss + engine.sparsity_term()
        loss.backward(); optimizer.step(); scheduler.step(); optimizer.zero_grad()
        engine.step()
    engine.finish()                                        # the compact model now has the size asked for

It owns everything FineGates does over time, so that the command line's loop,
:class:`finegates.integrations.FineGatesTrainer` and a user's own loop train the same way:

- the objective (:class:`~finegates.loss.BudgetObjective`, the default, or the reference's
  :class:`~finegates.loss.ReferenceObjective`) and its weight: the budget controller's learned
  multiplier (:class:`~finegates.budget.BudgetController`) or the reference's lambda schedule;
- the task saliency of the gates (:class:`~finegates.saliency.GateSaliency`), which the closure ranks by;
- the freeze at ``total_steps - recovery_steps`` (after the last step without a recovery phase):
  the exact closure to the budget (:func:`~finegates.budget.close_to_budget`), then no gate noise,
  and the gates' learning rate 0 in the schedule of :meth:`lr_scheduler` (recovery);
- the numbers a loop logs (:meth:`log_values`) and its state (:meth:`state_dict`, :meth:`save`,
  :meth:`load`: JSON and safetensors, no pickle) for exact resumes.

Its options are the sparsity fields of :class:`~finegates.config.TrainOptions`, whose defaults are the
only ones; the step count is the engine's own (:attr:`steps_done`), one per :meth:`step`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from .budget import BudgetController, close_to_budget, with_recovery
from .config import TrainOptions
from .layers import GatedLinear
from .loss import BudgetObjective, ReferenceObjective, SparsitySchedule
from .report import keep_fraction
from .saliency import GateSaliency
from .sharding import full_gates
from .sparsify import gate_parameters, gated_layers, param_groups, sparsify_record

__all__ = ["SparsityEngine", "base_scheduler", "ENGINE_STATE_JSON", "ENGINE_STATE_TENSORS"]

logger = logging.getLogger("finegates")

ENGINE_STATE_JSON = "finegates_engine.json"
ENGINE_STATE_TENSORS = "finegates_engine.safetensors"
_FORMAT = 1


def base_scheduler(options: TrainOptions, optimizer: torch.optim.Optimizer, steps: int, *, scale: int = 1):
    """``options.lr_scheduler`` with ``options.warmup_steps`` over ``steps`` optimizer steps
    (``scale`` scheduler steps each), as transformers builds it."""
    from transformers import get_scheduler

    return get_scheduler(options.lr_scheduler, optimizer, num_warmup_steps=options.warmup_steps * scale,
                         num_training_steps=steps * scale)


class SparsityEngine:
    """FineGates' schedule for ``model`` (already :func:`finegates.sparsify`-ed) over a run of
    ``total_steps`` optimizer steps (or :meth:`plan` later, once the loop knows them).

    ``options``: a :class:`~finegates.config.TrainOptions` (its sparsity fields; default: its
    defaults). ``options.target_sparsity`` None takes the gated layers' target; one that differs from
    theirs is refused. ``accelerator``: an Accelerate ``Accelerator`` when several processes train
    (the saliency is averaged over them and all close the same gates). ``say``: where the closure's
    one-line summary goes (default: the ``finegates`` logger)."""

    def __init__(self, model: nn.Module, options: Optional[TrainOptions] = None, *, total_steps: Optional[int] = None,
                 accelerator=None, say: Optional[Callable[[str], None]] = None):
        options = TrainOptions() if options is None else options
        if not isinstance(options, TrainOptions):
            raise TypeError(f"SparsityEngine: options must be a finegates.TrainOptions, got {type(options).__name__}")
        self.model, self.accelerator = model, accelerator
        self.say = say or logger.info
        self.layers: List[GatedLinear] = [m for _, m in gated_layers(model)]
        if not self.layers:
            raise ValueError("SparsityEngine: the model has no gated layer; call finegates.sparsify(model, ...) first")
        self.options = dataclasses.replace(options, target_sparsity=self._target(options))
        budget = self.options.sparsity_objective == "budget"
        o = self.options
        self.objective = BudgetObjective(model) if budget else ReferenceObjective(kurtosis=o.kurtosis)
        self.controller = BudgetController(o.target_sparsity, start=o.sparsity_start, ramp_steps=o.sparsity_warmup,
                                           multiplier_lr=o.budget_multiplier_lr, penalty=o.budget_penalty) if budget else None
        self.lambda_schedule = None if budget else SparsitySchedule(
            o.sparsity_lambda, start_step=o.sparsity_start, warmup_steps=o.sparsity_warmup, shape=o.sparsity_ramp)
        self.saliency = GateSaliency(model) if o.closure_rank == "saliency" else None
        self.steps_done = 0
        self.frozen = False
        self.closure: Optional[Dict[str, Any]] = None  # close_to_budget's record, once closed
        self.total_steps: Optional[int] = None
        self.freeze_step: Optional[int] = None
        self.last_sparsity: Optional[float] = None
        self.last_weight = 0.0
        # The exact kept fraction, while the gates cannot have changed since it was counted: the
        # controller's count of this step, or the count after the freeze (a count walks the whole
        # compaction plan, ~10 ms on MiniLM, and a loop may log every step).
        self._counted: Optional[tuple] = None
        model.finegates_train_options = self.options.to_dict()  # saved with the compact model
        if total_steps is not None:
            self.plan(total_steps)

    def _target(self, options: TrainOptions) -> float:
        """The size the run closes to: the layers' target, or the options' when it agrees with theirs."""
        targets = sorted({m.target_sparsity for m in self.layers if m.target_sparsity is not None})
        asked = options.target_sparsity
        if options.sparsity_objective == "budget" and len(targets) != 1 and asked is None:
            raise ValueError(f"SparsityEngine: the budget needs one target_sparsity, the gated layers have {targets}")
        if asked is not None and targets and targets != [asked]:
            raise ValueError(f"SparsityEngine: options.target_sparsity={asked:g} but the gated layers were sparsified "
                             f"with target_sparsity {', '.join(f'{t:g}' for t in targets)}; leave it None or "
                             "sparsify with the same target")
        return asked if asked is not None else targets[0] if len(targets) == 1 else None

    # ------------------------------------------------------------------------------------------
    # the run's length, the optimizer groups and the learning-rate schedule
    # ------------------------------------------------------------------------------------------

    def plan(self, total_steps: int) -> None:
        """The run's length in optimizer steps, which places the freeze (``total_steps -
        recovery_steps``, or after the last step without a recovery phase)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"SparsityEngine: total_steps must be an integer >= 1, got {total_steps!r}")
        recovery = self.options.recovery_steps_for(total_steps)
        self.total_steps = total_steps
        self.freeze_step = total_steps - recovery if recovery else None

    @property
    def recovery_steps(self) -> int:
        return self.total_steps - self.freeze_step if self.freeze_step is not None else 0

    def param_groups(self, lr: float, weight_lr: Optional[float] = None) -> List[Dict[str, Any]]:
        """AdamW groups: the gate logits at ``options.gate_lr`` without weight decay, the gated
        weights at ``weight_lr`` (pretraining), the rest that trains at ``lr``."""
        return param_groups(self.model, self.options.gate_lr, lr, weight_lr)

    def gate_groups(self, optimizer: torch.optim.Optimizer) -> set:
        """Indices of the optimizer's groups that hold only gate logits."""
        gates = {id(p) for p in gate_parameters(self.model)}
        return {i for i, g in enumerate(optimizer.param_groups)
                if g["params"] and all(id(p) in gates for p in g["params"])}

    def lr_scheduler(self, optimizer: torch.optim.Optimizer, base=None, *, scale: int = 1):
        """The run's learning-rate schedule: ``base`` (a ``LambdaLR`` over the steps before the freeze;
        default ``options.lr_scheduler`` with ``options.warmup_steps``), then, with a recovery phase,
        the gates' groups at 0 and the others restarted at ``options.recovery_lr`` of their peak,
        decaying to 0. ``scale``: scheduler steps per optimizer step (Accelerate steps a prepared
        scheduler once per process)."""
        self._require_plan("lr_scheduler")
        main = self.freeze_step if self.freeze_step is not None else self.total_steps
        if base is None:
            base = base_scheduler(self.options, optimizer, main, scale=scale)
        if self.freeze_step is None:
            return base
        return with_recovery(optimizer, base, main * scale, self.recovery_steps * scale, self.options.recovery_lr,
                             self.gate_groups(optimizer))

    def _require_plan(self, what: str) -> None:
        if self.total_steps is None:
            raise RuntimeError(f"SparsityEngine.{what}: the run's length is not known; pass total_steps or call plan()")

    # ------------------------------------------------------------------------------------------
    # each step
    # ------------------------------------------------------------------------------------------

    def weight(self) -> float:
        """The weight of the sparsity objective in the coming step (0 once frozen)."""
        if self.frozen:
            return 0.0
        step = self.steps_done
        return self.controller.weight(step) if self.controller is not None else self.lambda_schedule(step)

    def objective_value(self) -> Tensor:
        """The objective from every gated layer's gates: the budget's expected kept fraction, or the
        reference's loss (a loop whose forward gathers the terms itself passes them to
        :meth:`sparsity_term` instead)."""
        layers = [m for m in self.layers if m.target_sparsity is not None or self.controller is not None]
        return self.objective.combine({m: self.objective.term(m) for m in layers})

    def sparsity_term(self, value: Optional[Tensor] = None) -> Tensor:
        """``weight * objective`` for this micro-batch's loss (``value``: the objective, when the
        loop computed it; else :meth:`objective_value`). Remembers the value for :meth:`step`."""
        self._require_plan("sparsity_term")
        value = self.objective_value() if value is None else value
        self.last_sparsity = float(value.detach())
        self.last_weight = self.weight()
        return self.last_weight * value

    def step(self) -> None:
        """After every optimizer step: the saliency, the controller's update, and at the freeze step
        the exact closure. Every process calls it."""
        self._require_plan("step")
        self.steps_done += 1
        step = self.steps_done
        if self.frozen:
            return
        if self.saliency is not None:
            self.saliency.step(self.accelerator)
        if self.controller is not None and self.last_sparsity is not None:
            if self.controller.measures(step):
                with full_gates(self.model):
                    self.controller.update(step, self.last_sparsity, self.model)
                self._counted = (step, self.controller.kept)
            else:  # an estimated step reads no gate: nothing to gather
                self.controller.update(step, self.last_sparsity, None)
        if self.freeze_step is not None and step >= self.freeze_step:
            self._freeze(closing=True)

    def finish(self) -> None:
        """After the last step: without a recovery phase, the budget's exact closure comes here."""
        if not self.frozen:
            self._freeze(closing=True)

    @torch.no_grad()
    def _freeze(self, closing: bool) -> None:
        """The gates' last decision: with the budget they close exactly to the requested size
        (``closing``; ranked by saliency where gathered, the same on every process), then keep
        their deterministic values (no noise; the schedule gives them no learning rate)."""
        rank = self.saliency.final_ranking(self.accelerator) if self.saliency is not None else None
        if self.controller is not None and closing:
            with full_gates(self.model, write_back=True):
                self.closure = close_to_budget(self.model, self.controller.target_sparsity, rank=rank)
            c = self.closure
            self.say(f"finegates: gates frozen at {100 * c['removed_fraction']:.2f}% removed ({c['newly_closed']} "
                     f"closed, {c['reopened']} reopened at the freeze)")
        for layer in self.layers:
            layer.row_gates.sigma = layer.col_gates.sigma = 0.0
        self.frozen, self._counted = True, None

    # ------------------------------------------------------------------------------------------
    # what a loop logs
    # ------------------------------------------------------------------------------------------

    def keep_fraction(self) -> float:
        """The compact model's exact kept fraction of the gated parameters now (every process calls it)."""
        step = self.steps_done
        if self._counted is not None and (self._counted[0] == step or self.frozen):
            return self._counted[1]
        with full_gates(self.model):
            keep = keep_fraction(self.model)
        self._counted = (step, keep)
        return keep

    def target_keep(self) -> float:
        """The kept fraction the objective aims at after the last step."""
        if self.controller is not None and not self.frozen:
            return self.controller.target_kept(self.steps_done)
        return 1.0 - (self.options.target_sparsity or 0.0)

    def log_values(self) -> Dict[str, Any]:
        """``lambda`` (the weight the last step trained with), ``sparsity_loss`` (the objective's last
        value: with the budget the expected kept fraction), ``keep_fraction`` (exact, now) and
        ``target_keep``."""
        values = {"lambda": self.last_weight, "keep_fraction": self.keep_fraction(), "target_keep": self.target_keep()}
        if self.last_sparsity is not None:
            values["sparsity_loss"] = self.last_sparsity
        return values

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Everything the engine holds, with the options and the model's sparsify record."""
        return dict(
            format=_FORMAT, steps_done=self.steps_done, frozen=self.frozen, total_steps=self.total_steps,
            freeze_step=self.freeze_step, last_sparsity=self.last_sparsity, last_weight=self.last_weight,
            closure=self.closure, controller=self.controller.state_dict() if self.controller is not None else None,
            saliency=self.saliency.state_dict() if self.saliency is not None else None,
            options=self.options.to_dict(), sparsify=sparsify_record(self.model),
        )

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues the run ``state`` was taken from (:meth:`plan` first: a resume whose length would
        move the freeze across the checkpoint is refused, before anything changes)."""
        self._require_plan("load_state_dict")
        if state.get("format") != _FORMAT:
            raise ValueError(f"SparsityEngine: unknown state format {state.get('format')!r} (expected {_FORMAT})")
        self._check_same_method(state)
        steps, frozen = int(state["steps_done"]), bool(state["frozen"])
        self._check_freeze(steps, frozen, state.get("freeze_step"))
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        if self.saliency is not None:
            self.saliency.load_state_dict(state["saliency"])
        self.steps_done, self.closure = steps, state.get("closure")
        self.last_sparsity, self.last_weight = state.get("last_sparsity"), float(state.get("last_weight", 0.0))
        self._counted = None
        if frozen:
            self._freeze(closing=False)
        elif self.freeze_step is not None and steps == self.freeze_step:
            self._freeze(closing=True)

    def _check_same_method(self, state: Dict[str, Any]) -> None:
        saved = state.get("options") or {}
        for key in ("sparsity_objective", "target_sparsity", "closure_rank"):
            if key in saved and saved[key] != getattr(self.options, key):
                raise ValueError(f"SparsityEngine: the checkpoint was trained with {key}={saved[key]!r}, this run "
                                 f"has {getattr(self.options, key)!r}")
        if (state.get("controller") is None) != (self.controller is None):
            raise ValueError("SparsityEngine: the checkpoint's objective differs from this run's")

    def _check_freeze(self, steps: int, frozen: bool, saved_freeze: Optional[int]) -> None:
        """The freeze happens once, at one step: a checkpoint past this run's freeze step whose
        gates never froze, or a frozen one whose run would train its gates again, is refused."""
        now = self.freeze_step
        if not frozen and now is not None and steps > now:
            raise ValueError(
                f"SparsityEngine: the checkpoint is at step {steps}, past this run's freeze step {now} "
                f"({self.total_steps} steps, {self.recovery_steps} of recovery), and its gates were never frozen; "
                f"resume with a run whose freeze lies at step {steps} or later")
        if frozen and (now is None or now > steps):
            raise ValueError(
                f"SparsityEngine: the checkpoint's gates were frozen at step {saved_freeze}; this run's "
                + (f"freeze step {now} lies after the checkpoint ({steps})" if now is not None
                   else "has no recovery phase") + ", so its gates would train again. Resume with the same "
                "total steps and recovery steps")

    def save(self, directory: Union[str, Path]) -> None:
        """Writes the state as ``finegates_engine.json`` (numbers, options, the sparsify record) and
        ``finegates_engine.safetensors`` (the saliency scores), each atomically."""
        from safetensors.torch import save

        from .files import atomic_write_bytes, write_json

        directory = Path(directory)
        state = self.state_dict()
        tensors = {}
        if state["saliency"] is not None:
            for i, pair in enumerate(state["saliency"].pop("scores")):
                for side, t in zip(("rows", "cols"), pair):
                    tensors[f"saliency.{i}.{side}"] = t.detach().float().cpu().contiguous()
        if tensors:
            atomic_write_bytes(directory / ENGINE_STATE_TENSORS, save(tensors))
        write_json(directory / ENGINE_STATE_JSON, state)

    def load(self, directory: Union[str, Path]) -> None:
        """Reads what :meth:`save` wrote into ``directory`` and continues from it (:meth:`load_state_dict`)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / ENGINE_STATE_JSON
        if not path.is_file():
            raise FileNotFoundError(f"SparsityEngine: {str(path)!r} is missing; the checkpoint holds no engine state")
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"SparsityEngine: {str(path)!r} is unreadable ({e})") from None
        if state.get("saliency") is not None:
            tensors = load_file(directory / ENGINE_STATE_TENSORS)
            n = len(self.saliency.scores) if self.saliency is not None else 0
            try:
                state["saliency"]["scores"] = [[tensors[f"saliency.{i}.rows"], tensors[f"saliency.{i}.cols"]]
                                               for i in range(n)]
            except KeyError as e:
                raise ValueError(f"SparsityEngine: {ENGINE_STATE_TENSORS} lacks {e.args[0]}") from None
        self.load_state_dict(state)
