#!/usr/bin/env python
"""Prune-then-LoRA peers of FineGates: Torch-Pruning or TextPruner, then PEFT LoRA, at FineGates' size.

    pip install -e ".[peers]" && pip install --no-deps textpruner==1.1.post2
    python bench/peers.py --schedule tp-prune-tune --sparsity 0.4 --seed 1 --output-dir bench/out/peer
    python bench/quality_table.py --configs peer-tp-prune-tune-40 --seeds 1,2,3   # the same, as table rows

Every phase trains with the command line's own loop and settings (``finegates finetune --method lora``:
PEFT LoRA r=8, alpha 16, on every encoder Linear, the task head fully trained, warm-up + linear decay,
batch 16, mean pooling for MiniLM), on the same data, and the phases add up to the same number of
optimizer steps as a FineGates run (500 by default). Schedules:

``tp-prune-tune``   the literal question: the task head trained alone (50 steps), Torch-Pruning
                    with Taylor importance on 16 calibration batches, LoRA for the rest;
``tp-tune-prune``   LoRA+Prune: LoRA for 80% of the steps, merged, Torch-Pruning, a fresh LoRA for the rest;
``textpruner-tune-prune``  the same with TextPruner's iterative Taylor pruning (4 rounds).

The phases share out the examples a FineGates run with the same seed sees, in its order (the
first phase its first steps' examples, the next the following ones): the same data, each example as
often, whatever the split. The pruned model is checked before it trains on (logits equal to the dense model's with the same heads
and units zeroed) and counted by FineGates' own counter. The run leaves ``metrics.json`` (the keys
of a ``finegates finetune`` run's, where they mean the same) and the final model, LoRA merged, in
``pruned/`` (``structure.json`` + ``model.safetensors``), for the latency bench.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peer_pruning import (Structure, check_pruned, counted_removal, peer_shape, slice_pruned,  # noqa: E402
                                textpruner_prune, torch_pruning_prune)

SCHEDULES = ("tp-prune-tune", "tp-tune-prune", "textpruner-tune-prune")
HEAD_STEPS = 50  # prune-tune: steps of the task head alone before pruning
TUNE_SHARE = 0.8  # tune-prune: the share of the steps before pruning
CALIBRATION_BATCHES = 16


@dataclasses.dataclass
class Run:
    """One peer run's fixed parts: the parsed command-line options, the task and its evaluators."""

    args: Any
    task: Any
    accelerator: Any
    out: Path
    evaluate: Any
    evaluate_model: Any
    phases: List[Dict[str, Any]] = dataclasses.field(default_factory=list)


def _cli_args(steps: int, seed: int) -> argparse.Namespace:
    """The options of ``finegates finetune --method lora`` with the command line's defaults."""
    from finegates.app.cli import build_parser

    return build_parser().parse_args(["finetune", "--method", "lora", "--max-steps", str(steps),
                                      "--seed", str(seed)])


def _setup(steps: int, seed: int, out: Path) -> Run:
    from accelerate.utils import set_seed

    from finegates.app.distributed import make_accelerator
    from finegates.app.evaluation import classification_metrics, plain_evaluator
    from finegates.app.recipes import classification_task

    args = _cli_args(steps, seed)
    accelerator = make_accelerator(args, log_with=None, project_dir=str(out))
    set_seed(seed)
    task = classification_task(args)
    metrics = dict(task=args.task, num_labels=task.num_labels)
    return Run(args, task, accelerator, out, functools.partial(classification_metrics, **metrics),
               plain_evaluator(classification_metrics, task.val_ds, args.eval_batch_size, task.collate,
                               desc="evaluate (pruned)", **metrics))


def _examples(run: Run, start: int, steps: int):
    """The training examples of optimizer steps ``start`` to ``start + steps`` of a whole run with
    the command line's sampler (one permutation per epoch, seeded with seed + epoch)."""
    from finegates.app.trainer import EpochSampler

    n, bs = len(run.task.train_ds), run.args.batch_size
    sampler, order = EpochSampler(n, run.args.seed), []
    while len(order) < (start + steps) * bs:
        sampler.set_epoch(len(order) // n)
        order += list(sampler)
    return run.task.train_ds.select(order[start * bs:(start + steps) * bs])


def _train_phase(run: Run, model: nn.Module, steps: int, param_groups, name: str) -> Dict[str, Any]:
    """The next ``steps`` optimizer steps of the command line's loop on ``model``, on the examples
    those steps of a whole run would see (each once, the loop's own shuffling within them)."""
    from finegates.app.trainer import train
    from finegates.config import TrainOptions

    opts = dataclasses.replace(TrainOptions.from_namespace(run.args), max_steps=steps)
    (run.out / "phases" / name).mkdir(parents=True, exist_ok=True)
    start = sum(p["steps"] for p in run.phases)
    result = train(opts, run.accelerator, model, gated=False, train_dataset=_examples(run, start, steps),
                   eval_dataset=run.task.val_ds, collate_fn=run.task.collate, param_groups=param_groups,
                   evaluate=run.evaluate, output_dir=run.out / "phases" / name)
    run.phases.append(dict(name=name, steps=result["steps"], train_time_s=result["train_time_s"],
                           accuracy=result["metrics"].get("accuracy")))
    print(f"peers: {name}: {result['steps']} steps, accuracy {result['metrics'].get('accuracy')}", flush=True)
    return result


def _head_only(run: Run, model: nn.Module, steps: int) -> None:
    from finegates.app.recipes import _head_names

    heads = _head_names(model)
    head = [p for n, p in model.named_parameters() if any(f"{h}." in n for h in heads)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    _train_phase(run, model, steps, [dict(params=head, lr=run.args.head_lr)], "head")


def _lora(run: Run, model: nn.Module, steps: int, name: str) -> nn.Module:
    """The command line's PEFT LoRA for ``steps`` steps; returns the model with LoRA merged."""
    from finegates.app.recipes import _prepare_method

    for p in model.parameters():
        p.requires_grad_(False)
    peft_model, groups = _prepare_method(run.args, model)
    result = _train_phase(run, peft_model, steps, groups, name)
    return result["model"].merge_and_unload()


def _calibration(run: Run, seed: int) -> List[Dict[str, torch.Tensor]]:
    """The pruning tools' data: 16 training batches of the run's batch size, drawn with the seed."""
    order = torch.randperm(len(run.task.train_ds), generator=torch.Generator().manual_seed(seed))
    bs = run.args.batch_size
    return [run.task.collate([run.task.train_ds[int(i)] for i in order[k * bs:(k + 1) * bs]])
            for k in range(CALIBRATION_BATCHES)]


def _prune(run: Run, model: nn.Module, tool: str, fraction: float, seed: int):
    """Prunes ``model`` with ``tool`` to ``fraction`` of the encoder's Linear parameters, checks and
    counts the result; returns (pruned model, structure, its metrics)."""
    heads, units = peer_shape(model, fraction)
    batches = _calibration(run, seed)
    dense = copy.deepcopy(model).eval()
    t0 = time.perf_counter()
    if tool == "tp":
        structure = torch_pruning_prune(model, batches, heads, units)
    else:  # TextPruner zeroes what it prunes; the model is cut to its masks here
        structure = textpruner_prune(model, batches, heads, units)
        slice_pruned(model, structure)
    prune_time = time.perf_counter() - t0
    worst = check_pruned(model, dense, structure, batches[:4])
    size = counted_removal(dense, model, structure)
    model.eval()
    return model, structure, dict(prune_time_s=round(prune_time, 2), heads_removed_per_layer=heads,
                                  units_removed_per_layer=units, pruned_check_max_abs_diff=worst, **size)


def run_schedule(schedule: str, fraction: float, seed: int, steps: int, out: Path) -> Dict[str, Any]:
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {schedule!r}")
    run = _setup(steps, seed, out)
    model = run.task.model
    tool = "tp" if schedule.startswith("tp-") else "textpruner"
    if schedule == "tp-prune-tune":
        _head_only(run, model, HEAD_STEPS)
        model, structure, pruned = _prune(run, model, tool, fraction, seed)
        model = _lora(run, model, steps - HEAD_STEPS, "lora")
    else:
        tune = round(TUNE_SHARE * steps)
        model = _lora(run, model, tune, "lora")
        model, structure, pruned = _prune(run, model, tool, fraction, seed)
        model = _lora(run, model, steps - tune, "recover")
    final = run.evaluate_model(model.eval())
    metrics = dict(command="peers", method=schedule, schedule=schedule, tool=tool, seed=seed,
                   target_sparsity=fraction, steps=sum(p["steps"] for p in run.phases),
                   accuracy=run.phases[-1]["accuracy"], compact_accuracy=final.get("accuracy"),
                   train_time_s=round(sum(p["train_time_s"] for p in run.phases), 2),
                   phases=run.phases, pooling=run.task.pooling, model=run.task.model_desc, data=run.task.data_desc,
                   **pruned)
    _save_pruned(model, structure, out / "pruned")
    from finegates.files import write_json

    write_json(out / "metrics.json", metrics)
    return metrics


def _save_pruned(model: nn.Module, structure: Structure, out: Path) -> None:
    from safetensors.torch import save_file

    from finegates.files import write_json

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    write_json(out / "structure.json", structure.to_dict())


def dense_classifier() -> nn.Module:
    """The dense MiniLM classifier every peer starts from (the command line's, mean pooling), in eval mode."""
    from finegates.app.recipes import classification_task

    return classification_task(_cli_args(1, 0), say=lambda *a: None).model.eval()


def load_pruned(path: Path, dense: nn.Module) -> nn.Module:
    """A saved peer model: a copy of ``dense`` (:func:`dense_classifier`) cut to ``structure.json``,
    its weights loaded."""
    from safetensors.torch import load_file

    model = copy.deepcopy(dense)
    structure = Structure.from_dict(json.loads((path / "structure.json").read_text()),
                                    model.config.num_attention_heads, model.config.intermediate_size)
    slice_pruned(model, structure)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", required=True, choices=SCHEDULES)
    p.add_argument("--sparsity", type=float, required=True, help="share of the encoder's Linear parameters removed")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=500, help="optimizer steps of all phases together")
    p.add_argument("--output-dir", type=Path, required=True)
    a = p.parse_args(argv)
    if not 0.0 < a.sparsity < 1.0:
        p.error(f"--sparsity must lie in (0, 1), got {a.sparsity}")
    if a.steps <= HEAD_STEPS:
        p.error(f"--steps must exceed {HEAD_STEPS}")
    m = run_schedule(a.schedule, a.sparsity, a.seed, a.steps, a.output_dir)
    print(f"peers: {a.schedule} seed {a.seed}: accuracy {m['accuracy']:.4f} (pruned model {m['compact_accuracy']:.4f}), "
          f"removed {100 * m['removed_fraction_of_gated']:.3f}% of the encoder's Linear parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
