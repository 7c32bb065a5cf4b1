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
* What FineGates does over the run (the objective's weight, the budget controller, the saliency,
  the freeze and its exact closure, recovery's learning rates) is the library's
  :class:`~finegates.engine.SparsityEngine`, the same object the Hugging Face Trainer and a plain
  loop drive; this loop calls it and logs what it reports.
* Checkpoints (``output_dir/checkpoints/step-N``, ``accelerator.save_state`` plus the loop's and the
  engine's state as JSON and safetensors, never pickle) are written to a temporary directory and
  renamed, so a crash never leaves a half-written checkpoint that ``--resume-from-checkpoint latest``
  would pick up.
"""

from __future__ import annotations

import json
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
from .distributed import full_model, meta_copy
from ..engine import ENGINE_STATE_JSON, SparsityEngine, base_scheduler
from ..layers import GatedLinear, gates_open
from ..loss import BudgetObjective, ReferenceObjective
from ..files import follow_umask, write_json
from .outputs import StepLog
from ..gate_batch import GateBatch
from .run_dir import CHECKPOINT_RE, TRAIN_STATE
from ..config import TrainOptions

__all__ = ["Objective", "EpochSampler", "TrainState", "train"]


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
    """The loop's own counters, saved in every checkpoint as ``train_state.json``."""

    def __init__(self):
        self.step = 0
        self.train_time = 0.0

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "train_time": self.train_time}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.step = int(d["step"])
        self.train_time = float(d.get("train_time", 0.0))

    def save(self, directory: Path) -> None:
        write_json(Path(directory) / TRAIN_STATE, self.state_dict())

    def load(self, directory: Path) -> None:
        path = Path(directory) / TRAIN_STATE
        try:
            d = json.loads(path.read_text())
            self.load_state_dict(d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{str(path)!r} is missing or unreadable ({type(e).__name__}); the checkpoint cannot "
                             "be resumed") from None


def _save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, log: Optional[StepLog],
                     state: TrainState, engine: Optional[SparsityEngine]) -> Path:
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
        state.save(tmp)
        if engine is not None:
            engine.save(tmp)
        if log is not None:
            log.flush()
            log.flush(tmp / "train_log.csv")
        follow_umask(tmp)  # accelerate writes model.safetensors 0600
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _rotate(ck, step, keep)
    accelerator.wait_for_everyone()
    return final


def _rotate(ck: Path, step: int, keep: int) -> None:
    """The checkpoints of this run's timeline: the last ``keep`` up to ``step`` stay (0: all); any
    past ``step`` belong to the run this one resumed from an earlier checkpoint, and go."""
    done = sorted((int(m.group(1)), p) for p in ck.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
    mine = [p for s, p in done if s <= step]
    stale = [p for s, p in done if s > step] + (mine[:-keep] if keep > 0 else [])
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


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
    engine: Optional[SparsityEngine] = None  # the sparsity engine of a gated model
    skeleton: Optional[nn.Module] = None  # under FSDP, the main process's parameterless copy of the model


def _engine(opts: TrainOptions, accelerator, model: nn.Module, max_steps: int) -> SparsityEngine:
    """The run's sparsity engine; its refusals (a recovery phase as long as the run) as usage errors."""
    try:
        return SparsityEngine(model, opts, total_steps=max_steps, accelerator=accelerator, say=accelerator.print)
    except ValueError as e:
        raise UsageError(str(e).removeprefix("SparsityEngine: ")) from None


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
    n_proc = accelerator.num_processes
    batches_per_epoch = math.ceil(len(train_dataset) / (opts.batch_size * n_proc))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / opts.gradient_accumulation_steps))
    max_steps = opts.max_steps if opts.max_steps else opts.epochs * steps_per_epoch
    engine = _engine(opts, accelerator, model, max_steps) if gated else None
    objective = Objective(model, engine.objective if engine else None, opts.distill_weight, opts.distill_temperature)
    optimizer = _adamw(param_groups, opts.weight_decay, accelerator)
    scheduler = engine.lr_scheduler(optimizer, scale=n_proc) if engine else \
        base_scheduler(opts, optimizer, max_steps, scale=n_proc)
    objective, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(
        objective, optimizer, train_dl, eval_dl, scheduler
    )
    trainable = [p for g in param_groups for p in g["params"]]
    return _Loop(objective, optimizer, scheduler, train_dl, eval_dl, sampler, trainable, max_steps, engine, skeleton)


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


class _Means:
    """Running means of the losses over the micro-batches since the last optimizer step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss = self.task = self.sparsity = 0.0
        self.n = 0

    def add(self, loss, task_loss, sp) -> None:
        self.loss += float(loss.detach())
        self.task += float(task_loss.detach())
        self.sparsity += float(sp.detach()) if sp is not None else 0.0
        self.n += 1

    def across(self, accelerator) -> Tuple[float, float, float]:
        """(loss, task loss, sparsity term) averaged over the micro-batches and over the processes
        (each process's loss is over its own share of the global batch; every process calls it)."""
        n = max(self.n, 1)
        local = torch.tensor([self.loss / n, self.task / n, self.sparsity / n], dtype=torch.float64)
        if accelerator.num_processes > 1:
            local = accelerator.reduce(local.to(accelerator.device), reduction="mean").cpu()
        return tuple(local.tolist())


def _step_record(step, epoch, losses, loop: _Loop) -> Dict[str, Any]:
    """One row of train_log.csv (``losses``: :meth:`_Means.across`; ``sparsity_loss``: the objective's
    value, with the budget objective the expected kept fraction; ``lambda``: the weight the step
    trained with; ``keep``: the compact model's kept fraction now; ``target_keep``: the kept
    fraction the objective aims at now; every process calls it)."""
    loss, task, sparsity = losses
    engine = loop.engine
    gates = engine.log_values() if engine is not None else {}
    return dict(
        step=step, epoch=epoch, loss=loss, task_loss=task,
        sparsity_loss=sparsity if engine else "", **{"lambda": gates.get("lambda", 0.0)},
        keep_fraction=gates.get("keep_fraction", ""), target_keep=gates.get("target_keep", ""),
        lr=loop.scheduler.get_last_lr()[-1],
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


def _train_step(loop: _Loop, batch, opts: TrainOptions, accelerator):
    """Forward (task + the engine's weight * sparsity), backward and, at an accumulation boundary,
    the update."""
    with accelerator.accumulate(loop.objective):
        out, sp = loop.objective(batch)
        task_loss = out.loss
        loss = task_loss + loop.engine.sparsity_term(sp) if sp is not None else task_loss
        del out  # the logits (vocabulary-sized for a causal LM) need not live through the backward
        accelerator.backward(loss)
        if accelerator.sync_gradients and opts.max_grad_norm:
            accelerator.clip_grad_norm_(loop.trainable, opts.max_grad_norm)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad()
    return loss, task_loss, sp


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
    if resume_from is not None:
        _resume(accelerator, loop, state, Path(resume_from))
    if accelerator.is_main_process:
        opts.save(Path(output_dir) / "train_options.json")
    steps = _Steps(opts, accelerator, loop, state, Path(output_dir), resumed=Path(resume_from) if resume_from else None)
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


def _check_checkpoint(checkpoint: Path, accelerator, gated: bool) -> None:
    """Every file the resume reads is there, and every process's RNG state loads as plain data
    (Accelerate would skip a missing or refused one and resume without it, silently). Every
    process checks every file, so all refuse together."""
    from accelerate.utils import load

    rng = [f"random_states_{i}.pkl" for i in range(accelerator.num_processes)]
    needed = [TRAIN_STATE, *rng] + ([ENGINE_STATE_JSON] if gated else [])
    if not _sharded(accelerator):  # FSDP writes its model and optimizer as directories of shards
        needed += ["optimizer.bin", "scheduler.bin"]
        if not (checkpoint / "model.safetensors").is_file() and not (checkpoint / "pytorch_model.bin").is_file():
            needed.append("model.safetensors")
    foreign = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if foreign:  # Accelerate would unpickle them, code and all
        raise UsageError(f"--resume-from-checkpoint {str(checkpoint)!r} holds {', '.join(foreign)}, which finegates "
                         "never writes (a pickle can run code when it is read); it is not loaded. Remove it or "
                         "resume from another checkpoint")
    missing = [n for n in needed if not (checkpoint / n).is_file()]
    if missing:
        raise UsageError(f"--resume-from-checkpoint {str(checkpoint)!r} lacks {', '.join(missing)}; resume from "
                         "another checkpoint of the run, or start it again")
    for name in rng:
        try:
            load(checkpoint / name)  # weights_only: plain tensors and numbers, never code
        except Exception as e:
            raise UsageError(f"--resume-from-checkpoint {str(checkpoint)!r}: {name} is not a plain RNG state "
                             f"({type(e).__name__}); it is not loaded. Resume from another checkpoint") from None


def _resume(accelerator, loop: _Loop, state: TrainState, checkpoint: Path) -> None:
    """Accelerate's state (model, optimizer, schedule, RNG), then the loop's and the engine's: a
    closure the engine makes at the resume acts on the checkpoint's gates, and a resume it refuses
    has written nothing."""
    _check_checkpoint(checkpoint, accelerator, loop.engine is not None)
    state.load(checkpoint)
    accelerator.load_state(str(checkpoint))
    if loop.engine is not None:
        try:
            loop.engine.load(checkpoint)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--resume-from-checkpoint {str(checkpoint)!r}: "
                             f"{str(e).removeprefix('SparsityEngine: ')}") from None
    accelerator.print(f"finegates: resumed from {checkpoint} (step {state.step})")


class _Steps:
    """The optimizer steps of a run, from where it starts (or resumes) to ``max_steps``, and what
    follows each: the gates' update, the log (every process takes part: the losses are averaged and
    the gates gathered), the checkpoint. Resuming mid-epoch skips the batches already seen."""

    def __init__(self, opts: TrainOptions, accelerator, loop: _Loop, state: TrainState, output_dir: Path,
                 resumed: Optional[Path]):
        from tqdm.auto import tqdm

        self.opts, self.accelerator, self.loop, self.state = opts, accelerator, loop, state
        self.output_dir = output_dir
        self.main = accelerator.is_main_process
        self.log = StepLog(output_dir / "train_log.csv", resume_step=state.step if resumed else None,
                           resume_from=resumed / "train_log.csv" if resumed else None) if self.main else None
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
                self.means.add(*_train_step(loop, batch, self.opts, self.accelerator))
                if not self.accelerator.sync_gradients:
                    continue
                step += 1
                self._after_step(step, epoch)
                if step >= loop.max_steps:
                    break
            epoch += 1
        self._finish()
        self.state.train_time += time.perf_counter() - self.t0
        self.bar.close()
        if self.main:
            self.log.flush()
        return step

    def _after_step(self, step: int, epoch: int) -> None:
        opts = self.opts
        self.state.step = step
        if self.loop.engine is not None:
            self.loop.engine.step()
        self.bar.update(1)
        if step % opts.logging_steps == 0 or step == self.loop.max_steps or step == 1:
            record = _step_record(step, epoch, self.means.across(self.accelerator), self.loop)
            if self.main:
                self.last = record
                _report(self.last, self.bar, self.log, self.accelerator, self.loop.engine is not None)
        self.means.reset()
        if opts.checkpointing_steps and step % opts.checkpointing_steps == 0:
            self.state.train_time += time.perf_counter() - self.t0
            _save_checkpoint(self.accelerator, self.output_dir, step, opts.keep_checkpoints, self.log, self.state,
                             self.loop.engine)
            self.t0 = time.perf_counter()

    def _finish(self) -> None:
        """The engine's closing call; a closure after the last step enters the run's last record, so
        that it says what the compact model keeps (every process calls it)."""
        engine = self.loop.engine
        if engine is None:
            return
        frozen = engine.frozen
        engine.finish()
        keep = engine.keep_fraction()
        if not frozen and self.main and self.last:
            self.last = dict(self.last, keep_fraction=keep, target_keep=engine.target_keep())


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
