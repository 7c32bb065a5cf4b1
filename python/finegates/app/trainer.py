"""The training loop shared by ``finegates finetune | posttrain | pretrain``, on Hugging Face
Accelerate, so that one code path runs on a CPU, one GPU, and under ``accelerate launch`` /
``torchrun`` (DDP, FSDP).

Why the pieces look the way they do:

* The model and its sparsity loss run in one ``forward`` (:class:`Objective`), so DDP/FSDP see a
  single forward per step and the gates' gradients from both losses are reduced together.
* The training data are shuffled by :class:`EpochSampler` from its own generator (``seed +
  epoch``), and the DataLoader gets its own generator too: the global torch RNG (gate noise,
  dropout) is then consumed only by the model, so a run resumed from a checkpoint (RNG states
  restored by ``load_state``, data position by ``skip_first_batches``) continues exactly as the
  uninterrupted run would have.
* Checkpoints (``output_dir/checkpoints/step-N``, ``accelerator.save_state``) are written to a
  temporary directory and renamed, so a crash never leaves a half-written checkpoint that
  ``--resume-from-checkpoint latest`` would pick up.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

import fg_kernels

from .errors import UsageError
from ..budget import BudgetController, close_to_budget, with_recovery
from .distributed import full_gates, full_model, meta_copy
from ..layers import GatedLinear, gates_open
from ..loss import BudgetObjective, ReferenceObjective, SparsitySchedule
from ..files import follow_umask
from .outputs import StepLog
from ..gate_batch import GateBatch
from ..report import keep_fraction
from ..saliency import GateSaliency
from .run_dir import CHECKPOINT_RE
from ..sparsify import gated_layers
from ..config import TrainOptions

__all__ = ["Objective", "EpochSampler", "TrainState", "train"]

RECOVERY_SHARE = 0.2  # the default recovery phase: the last fifth of the run


class Objective(nn.Module):
    """``model(**batch)`` plus, when the model is gated, the sparsity objective, in one forward.

    ``sparsity`` (:class:`~finegates.loss.BudgetObjective` or :class:`~finegates.loss.ReferenceObjective`)
    gets each layer's term from a forward hook while that layer runs: under FSDP a layer's gate
    logits are only materialised during its own forward. Elsewhere a training forward samples every
    gate in one batched pass first (:class:`~finegates.gate_batch.GateBatch`), and the budget reads
    its keep probabilities from there."""

    def __init__(self, model: nn.Module, sparsity=None, distill_weight: float = 0.0, distill_temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.sparsity = sparsity
        self.distill_weight, self.distill_temperature = float(distill_weight), float(distill_temperature)
        self.gated = sparsity is not None
        self._terms: Optional[Dict[nn.Module, Any]] = None
        self._layers: List[GatedLinear] = []
        self._gate_batch = GateBatch(model) if sparsity is not None else None
        self._batch_usable: Optional[bool] = None
        if sparsity is not None:
            reference = isinstance(sparsity, ReferenceObjective)
            for m in model.modules():
                if isinstance(m, GatedLinear) and (m.target_sparsity is not None or not reference):
                    m.register_forward_hook(self._collect)
                    self._layers.append(m)
            if not self._layers:
                raise ValueError("Objective: the model has no gated layer with a target sparsity")

    def _collect(self, module, inputs, output) -> None:
        if self._terms is not None:
            self._terms[module] = self.sparsity.term(module)

    @torch.no_grad()
    def _teacher_logits(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Self-distillation's teacher: the same model with every gate open, without dropout."""
        self.model.eval()
        try:
            with gates_open(self.model):
                return self.model(**batch).logits.detach()
        finally:
            self.model.train()

    def distillation(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, mean over examples (tokens)."""
        t = self.distill_temperature
        s_log = torch.log_softmax(student.float().flatten(0, -2) / t, -1)
        t_log = torch.log_softmax(teacher.float().flatten(0, -2) / t, -1)
        return torch.nn.functional.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * t * t

    def _sample_gates(self) -> Optional[Dict[nn.Module, Any]]:
        """In a training forward, every gate sampled in one batched pass (where the model allows it:
        :class:`~finegates.gate_batch.GateBatch`); returns the keep probabilities, or None when the
        layers sample themselves."""
        if self._gate_batch is None or not (self.training and torch.is_grad_enabled()):
            return None
        if self._batch_usable is None:  # decided at the first training forward: after FSDP has sharded
            self._batch_usable = self._gate_batch.usable()
        return self._gate_batch.sample() if self._batch_usable else None

    def forward(self, batch: Dict[str, torch.Tensor], with_sparsity: bool = True):
        want = self.gated and with_sparsity
        distill = want and self.distill_weight > 0 and self.training
        teacher = self._teacher_logits(batch) if distill else None
        probs = self._sample_gates()
        from_batch = want and probs is not None and isinstance(self.sparsity, BudgetObjective)
        self._terms = {} if want and not from_batch else None
        try:
            out = self.model(**batch)
            if teacher is not None:
                out.loss = out.loss + self.distill_weight * self.distillation(out.logits, teacher)
            sp = None
            if from_batch:
                sp = self.sparsity.combine(probs)
            elif want:
                if len(self._terms) != len(self._layers):  # some gated layer did not run: read them all
                    self._terms = {m: self.sparsity.term(m) for m in self._layers}
                sp = self.sparsity.combine(self._terms)
        finally:
            self._terms = None
            if probs is not None:
                self._gate_batch.clear()
        return out, sp


class EpochSampler(Sampler):
    """A random permutation per epoch from ``torch.Generator().manual_seed(seed + epoch)``; the
    global RNG is never touched."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class TrainState:
    """The loop's own counters, saved in every checkpoint (``register_for_checkpointing``)."""

    def __init__(self):
        self.step = 0
        self.train_time = 0.0

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "train_time": self.train_time}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.step = int(d["step"])
        self.train_time = float(d.get("train_time", 0.0))


def _save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, log: Optional[StepLog]) -> Path:
    ck = Path(output_dir) / "checkpoints"
    final = ck / f"step-{step}"
    tmp = ck / f".tmp-step-{step}"
    if accelerator.is_main_process:
        ck.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if log is not None:
            log.flush()
        follow_umask(tmp)  # accelerate writes model.safetensors 0600
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            done = sorted((int(m.group(1)), p) for p in ck.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
            for _, p in done[:-keep]:
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@torch.no_grad()
def _rank_divergence(accelerator, params) -> Optional[float]:
    """Largest difference between processes of per-tensor checksums (sum, sum of |x|) of the
    trained parameters: 0.0 when the ranks stayed in sync; None on a single process."""
    if accelerator.num_processes == 1 or _sharded(accelerator):  # FSDP: one copy of each parameter, nothing to diverge
        return None
    sums = torch.stack([t for p in params for t in (p.detach().double().sum(), p.detach().double().abs().sum())])
    every = accelerator.gather(sums.unsqueeze(0).to(accelerator.device))
    return float((every - every[0]).abs().max())


@dataclass
class _Loop:
    """What one training run iterates with, after ``accelerator.prepare``."""

    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_dl: DataLoader
    eval_dl: DataLoader
    sampler: EpochSampler
    trainable: List[torch.Tensor]
    max_steps: int
    recovery_steps: int = 0
    skeleton: Optional[nn.Module] = None  # under FSDP, the main process's parameterless copy of the model


def _sparsity_objective(opts: TrainOptions, model: nn.Module, gated: bool):
    if not gated:
        return None
    if opts.sparsity_objective == "reference":
        return ReferenceObjective(kurtosis=opts.kurtosis)
    return BudgetObjective(model)


def _gate_groups(param_groups: List[Dict[str, Any]], model: nn.Module) -> set:
    thetas = {id(g.theta) for _, layer in gated_layers(model) for g in (layer.row_gates, layer.col_gates)}
    return {i for i, g in enumerate(param_groups) if g["params"] and all(id(p) in thetas for p in g["params"])}


def _scheduler(opts: TrainOptions, optimizer, max_steps: int, n_proc: int, recovery: int, gate_groups: set):
    """The LR schedule (per process step, accelerate's convention); with a recovery phase the main
    schedule ends at the freeze and the recovery schedule of :func:`finegates.budget.with_recovery`
    follows."""
    from transformers import get_scheduler

    main_steps = max_steps - recovery
    base = get_scheduler(opts.lr_scheduler, optimizer, num_warmup_steps=opts.warmup_steps * n_proc,
                         num_training_steps=main_steps * n_proc)
    if not recovery:
        return base
    return with_recovery(optimizer, base, main_steps * n_proc, recovery * n_proc,
                         opts.recovery_lr, gate_groups)


def _adamw(param_groups, weight_decay: float, accelerator) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over every parameter instead of a dozen small ops per tensor: a gated
    model has four small tensors per layer) where torch has it for these parameters; the for-each
    form under FSDP, whose sharded parameters the fused kernel does not take."""
    from accelerate.utils import DistributedType

    params = [p for g in param_groups for p in g["params"]]
    fused = accelerator.distributed_type != DistributedType.FSDP and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(param_groups, weight_decay=weight_decay, fused=fused or None)


def _prepare(opts: TrainOptions, accelerator, model, gated, train_dataset, eval_dataset, collate_fn, param_groups) -> _Loop:
    """Data loaders (shuffled by EpochSampler's own generator), AdamW, the LR schedule, all prepared."""
    # Before the objective hooks the gated layers: a copy made after would carry copies of the hooks,
    # and through them of the objective itself.
    skeleton = meta_copy(model) if _sharded(accelerator) and accelerator.is_main_process else None
    sampler = EpochSampler(len(train_dataset), opts.seed)
    train_dl = DataLoader(
        train_dataset, batch_size=opts.batch_size, sampler=sampler, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(opts.seed),
    )
    eval_dl = DataLoader(eval_dataset, batch_size=opts.eval_batch_size, shuffle=False, collate_fn=collate_fn)
    objective = Objective(model, _sparsity_objective(opts, model, gated), opts.distill_weight,
                          opts.distill_temperature)
    optimizer = _adamw(param_groups, opts.weight_decay, accelerator)
    n_proc = accelerator.num_processes
    batches_per_epoch = math.ceil(len(train_dataset) / (opts.batch_size * n_proc))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / opts.gradient_accumulation_steps))
    max_steps = opts.max_steps if opts.max_steps else opts.epochs * steps_per_epoch
    recovery = _recovery_steps(opts, gated, max_steps)
    scheduler = _scheduler(opts, optimizer, max_steps, n_proc, recovery, _gate_groups(param_groups, model))
    objective, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(
        objective, optimizer, train_dl, eval_dl, scheduler
    )
    trainable = [p for g in param_groups for p in g["params"]]
    return _Loop(objective, optimizer, scheduler, train_dl, eval_dl, sampler, trainable, max_steps, recovery, skeleton)


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _recovery_steps(opts: TrainOptions, gated: bool, max_steps: int) -> int:
    """``--recovery-steps``; None: a fifth of the run (``RECOVERY_SHARE``)."""
    if not gated:
        return 0
    recovery = opts.recovery_steps
    if recovery is None:
        return int(max_steps * RECOVERY_SHARE)
    if recovery >= max_steps:
        raise UsageError(f"--recovery-steps {recovery} leaves no step to train the gates in a run of {max_steps} steps")
    return int(recovery)


class _Means:
    """Running means of the losses over the micro-batches since the last optimizer step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss = self.task = self.sparsity = 0.0
        self.last_sparsity: Optional[float] = None
        self.n = 0

    def add(self, loss, task_loss, sp) -> None:
        self.loss += float(loss.detach())
        self.task += float(task_loss.detach())
        self.last_sparsity = float(sp.detach()) if sp is not None else None
        self.sparsity += self.last_sparsity or 0.0
        self.n += 1

    def across(self, accelerator) -> Tuple[float, float, float]:
        """(loss, task loss, sparsity term) averaged over the micro-batches and over the processes
        (each process's loss is over its own share of the global batch; every process calls it)."""
        n = max(self.n, 1)
        local = torch.tensor([self.loss / n, self.task / n, self.sparsity / n], dtype=torch.float64)
        if accelerator.num_processes > 1:
            local = accelerator.reduce(local.to(accelerator.device), reduction="mean").cpu()
        return tuple(local.tolist())


def _step_record(step, epoch, losses, lam, loop: _Loop, keep, gates: "_GateControl") -> Dict[str, Any]:
    """One row of train_log.csv (``losses``: :meth:`_Means.across`; ``sparsity_loss``: the objective's
    value, with the budget objective the expected kept fraction; ``keep``: the compact model's kept
    fraction now; ``target_keep``: the kept fraction the objective aims at now)."""
    loss, task, sparsity = losses
    gated = gates.gated
    return dict(
        step=step, epoch=epoch, loss=loss, task_loss=task,
        sparsity_loss=sparsity if gated else "", **{"lambda": lam},
        keep_fraction=keep if gated else "",
        target_keep=gates.target_keep(step) if gated else "", lr=loop.scheduler.get_last_lr()[-1],
    )


def _report(record, bar, log: StepLog, accelerator, gated: bool) -> None:
    """A logged step: the CSV row, the progress bar and any Accelerate tracker."""
    log.append(record)
    post = {"loss": f"{record['loss']:.4f}"}
    if gated:
        post.update(sp=f"{record['sparsity_loss']:.4f}", keep=f"{record['keep_fraction']:.3f}")
    bar.set_postfix(post)
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if v != "" and k != "step"}, step=record["step"])


def _train_step(loop: _Loop, batch, lam: float, opts: TrainOptions, accelerator):
    """Forward (task + lambda * sparsity), backward and, at an accumulation boundary, the update."""
    with accelerator.accumulate(loop.objective):
        out, sp = loop.objective(batch)
        task_loss = out.loss
        loss = task_loss + lam * sp if sp is not None else task_loss
        del out  # the logits (vocabulary-sized for a causal LM) need not live through the backward
        accelerator.backward(loss)
        if accelerator.sync_gradients and opts.max_grad_norm:
            accelerator.clip_grad_norm_(loop.trainable, opts.max_grad_norm)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad()
    return loss, task_loss, sp


class _GateControl:
    """What the gates do at each step: the sparsity weight (the budget controller's multiplier, or
    the reference's lambda schedule), the controller's update after the step, and the freeze
    (exact closure to the budget, then no noise and no learning rate) at ``max_steps -
    recovery_steps``, or after the last step when there is no recovery phase."""

    def __init__(self, opts: TrainOptions, loop: _Loop, raw_model: nn.Module, gated: bool, accelerator):
        self.gated, self.raw_model, self.accelerator = gated, raw_model, accelerator
        budget = gated and opts.sparsity_objective == "budget"
        self.controller = BudgetController(
            opts.target_sparsity, start=opts.sparsity_start, ramp_steps=opts.sparsity_warmup,
            multiplier_lr=opts.budget_multiplier_lr, penalty=opts.budget_penalty,
        ) if budget else None
        self.lam_of = None if budget or not gated else SparsitySchedule(
            opts.sparsity_lambda, start_step=opts.sparsity_start, warmup_steps=opts.sparsity_warmup,
            shape=opts.sparsity_ramp)
        self.reference_keep = 1.0 - opts.target_sparsity
        self.freeze_at = loop.max_steps - loop.recovery_steps if gated and loop.recovery_steps else None
        self.frozen = False
        self.saliency = GateSaliency(raw_model) if budget and opts.closure_rank == "saliency" else None
        # The exact kept fraction, when the gates cannot have changed since it was counted: the
        # controller's count of this step, or the count after the freeze (a count walks the whole
        # compaction plan, ~10 ms on MiniLM, and the log asks at every logging step).
        self.counted: Optional[Tuple[int, float]] = None  # (step, kept fraction)

    def before_step(self, step: int) -> float:
        if not self.gated:
            return 0.0
        if self.freeze_at is not None and step >= self.freeze_at:
            if not self.frozen:
                _freeze_gates(self.raw_model, self.controller, step == self.freeze_at, self.accelerator, self.saliency)
                self.frozen, self.counted = True, None
            return 0.0
        return self.controller.weight(step) if self.controller else self.lam_of(step)

    def after_step(self, step: int, expected: Optional[float]) -> None:
        if self.saliency is not None and not self.frozen:
            self.saliency.step(self.accelerator)
        if self.controller is None or self.frozen or expected is None:
            return
        if not self.controller.measures(step):  # an estimated step reads no gate: nothing to gather
            self.controller.update(step, expected, None)
            return
        with full_gates(self.raw_model):
            self.controller.update(step, expected, self.raw_model)
        self.counted = (step, self.controller.kept)

    def keep_fraction(self, step: int) -> Optional[float]:
        """The compact model's kept fraction of the gated parameters after ``step`` (every process
        calls it)."""
        if not self.gated:
            return None
        if self.counted is not None and (self.counted[0] == step or self.frozen):
            return self.counted[1]
        with full_gates(self.raw_model):
            keep = keep_fraction(self.raw_model)
        self.counted = (step, keep)
        return keep

    def target_keep(self, step: int) -> float:
        return self.controller.target_kept(step) if self.controller else self.reference_keep

    def finish(self, step: int) -> None:
        """Without a recovery phase the budget's exact closure comes after the last step."""
        if self.controller is not None and not self.frozen:
            _freeze_gates(self.raw_model, self.controller, True, self.accelerator, self.saliency)
            self.frozen, self.counted = True, None


def _freeze_gates(raw_model: nn.Module, controller: Optional[BudgetController], closing: bool, accelerator,
                  saliency: Optional[GateSaliency] = None) -> None:
    """The recovery phase (``--recovery-steps``): with the budget objective the gates are first closed
    exactly to the requested size (``closing``: not again when resuming past the freeze), ranked by
    ``saliency`` where given (averaged over the processes, so that all close the same gates); then
    they keep their deterministic values (no noise; their learning rate is 0 from here, see
    :func:`_scheduler`), so the head and adapters adapt to the model compaction will keep."""
    rank = saliency.final_ranking(accelerator) if saliency is not None else None
    if controller is not None and closing:
        with full_gates(raw_model, write_back=True):
            done = close_to_budget(raw_model, controller.target_sparsity, rank=rank)
        accelerator.print(
            f"finegates: gates frozen at {100 * done['removed_fraction']:.2f}% removed ({done['newly_closed']} closed, "
            f"{done['reopened']} reopened at the freeze)"
        )
    for _, layer in gated_layers(raw_model):
        for gates in (layer.row_gates, layer.col_gates):
            gates.sigma = 0.0


def train(
    opts: TrainOptions,
    accelerator,
    model: nn.Module,
    *,
    gated: bool,
    train_dataset,
    eval_dataset,
    collate_fn: Callable,
    param_groups: List[Dict[str, Any]],
    evaluate: Callable,
    output_dir: Path,
    resume_from: Optional[Path] = None,
) -> Dict[str, Any]:
    """Train ``model`` (already sparsified when ``gated``) and evaluate it at the end.

    ``opts`` (:class:`~finegates.config.TrainOptions`) holds what the loop reads.
    ``evaluate(forward, eval_dataloader, gather=...) -> dict`` computes the metrics, gathering
    every process's predictions with ``gather``. Returns the metrics plus ``steps``,
    ``train_time_s`` and the last logged values."""
    if not isinstance(opts, TrainOptions):
        raise TypeError(f"train: opts must be a TrainOptions (TrainOptions.from_namespace(args) for parsed "
                        f"arguments), got {type(opts).__name__}")
    loop = _prepare(opts, accelerator, model, gated, train_dataset, eval_dataset, collate_fn, param_groups)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    gates = _GateControl(opts, loop, accelerator.unwrap_model(loop.objective).model, gated, accelerator)
    if gates.controller is not None:
        accelerator.register_for_checkpointing(gates.controller)
    if gates.saliency is not None:
        accelerator.register_for_checkpointing(gates.saliency)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"finegates: resumed from {resume_from} (step {state.step})")
    steps = _Steps(opts, accelerator, loop, gates, state, Path(output_dir), resumed=resume_from is not None)
    step = steps.run()
    t_eval = time.perf_counter()
    metrics = _evaluate(loop, evaluate, accelerator)
    eval_time = time.perf_counter() - t_eval
    divergence = _rank_divergence(accelerator, loop.trainable)
    raw_model = accelerator.unwrap_model(loop.objective).model
    if _sharded(accelerator):
        raw_model = full_model(accelerator, loop.objective, loop.skeleton)
    accelerator.wait_for_everyone()
    return dict(model=raw_model, metrics=metrics, steps=step, rank_divergence=divergence,
                train_time_s=state.train_time, eval_time_s=eval_time, last_log=steps.last, max_steps=loop.max_steps)


class _Steps:
    """The optimizer steps of a run, from where it starts (or resumes) to ``max_steps``, and what
    follows each: the gates' update, the log (every process takes part: the losses are averaged and
    the gates gathered), the checkpoint. Resuming mid-epoch skips the batches already seen."""

    def __init__(self, opts: TrainOptions, accelerator, loop: _Loop, gates: _GateControl, state: TrainState, output_dir: Path,
                 resumed: bool):
        from tqdm.auto import tqdm

        self.opts, self.accelerator, self.loop, self.gates, self.state = opts, accelerator, loop, gates, state
        self.output_dir = output_dir
        self.main = accelerator.is_main_process
        self.log = StepLog(output_dir / "train_log.csv", resume_step=state.step if resumed else None) if self.main else None
        self.bar = tqdm(total=loop.max_steps, initial=state.step, disable=not self.main, desc="train", dynamic_ncols=True)
        self.last: Dict[str, Any] = {}
        self.means = _Means()

    def run(self) -> int:
        """Trains to ``max_steps``; returns the last step. The training time excludes checkpointing."""
        loop, ga = self.loop, self.opts.gradient_accumulation_steps
        steps_per_epoch = max(1, math.ceil(len(loop.train_dl) / ga))
        step = self.state.step
        epoch, skip = step // steps_per_epoch, (step % steps_per_epoch) * ga
        self.t0 = time.perf_counter()
        while step < loop.max_steps:
            loop.train_dl.set_epoch(epoch)
            loop.sampler.set_epoch(epoch)
            batches = self.accelerator.skip_first_batches(loop.train_dl, skip) if skip else loop.train_dl
            skip = 0
            loop.objective.train()
            for batch in batches:
                lam = self.gates.before_step(step)
                self.means.add(*_train_step(loop, batch, lam, self.opts, self.accelerator))
                if not self.accelerator.sync_gradients:
                    continue
                step += 1
                self._after_step(step, epoch, lam)
                if step >= loop.max_steps:
                    break
            epoch += 1
        self.gates.finish(step)
        self.state.train_time += time.perf_counter() - self.t0
        self.bar.close()
        if self.main:
            self.log.flush()
        return step

    def _after_step(self, step: int, epoch: int, lam: float) -> None:
        opts = self.opts
        self.state.step = step
        self.gates.after_step(step, self.means.last_sparsity)
        self.bar.update(1)
        if step % opts.logging_steps == 0 or step == self.loop.max_steps or step == 1:
            keep, losses = self.gates.keep_fraction(step), self.means.across(self.accelerator)
            if self.main:
                self.last = _step_record(step, epoch, losses, lam, self.loop, keep, self.gates)
                _report(self.last, self.bar, self.log, self.accelerator, self.gates.gated)
        self.means.reset()
        if opts.checkpointing_steps and step % opts.checkpointing_steps == 0:
            self.state.train_time += time.perf_counter() - self.t0
            _save_checkpoint(self.accelerator, self.output_dir, step, opts.keep_checkpoints, self.log)
            self.t0 = time.perf_counter()


def _evaluate(loop: _Loop, evaluate: Callable, accelerator) -> Dict[str, Any]:
    """The metrics of the trained model on the evaluation set, without the sparsity loss."""
    loop.objective.eval()

    def forward(batch):
        with torch.no_grad():
            out, _ = loop.objective(batch, with_sparsity=False)
        return out

    from tqdm.auto import tqdm

    batches = tqdm(loop.eval_dl, desc="evaluate", disable=not accelerator.is_main_process, dynamic_ncols=True,
                   leave=False)
    with fg_kernels.frozen_weights():  # the gates are fixed: each weight is folded once, not once per batch
        return evaluate(forward, batches, gather=accelerator.gather_for_metrics)
