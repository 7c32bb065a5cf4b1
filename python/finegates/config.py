"""The typed configs: ``FineGatesConfig``, what :func:`finegates.sparsify` puts on a model, and
``TrainOptions``, what a training run reads; each one object that can be printed, compared, saved
next to a run and loaded again (as PEFT's ``LoraConfig`` is)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

__all__ = ["FineGatesConfig", "TrainOptions", "GATE_GRADIENTS", "STRUCTURES", "RECOVERY_SHARE"]

GATE_GRADIENTS = ("straight-through", "clamp")
STRUCTURES = ("rows_cols", "heads_units")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _JsonRecord:
    """JSON round trip of a config dataclass: ``to_dict`` (its own where a field needs a name),
    ``from_dict`` refusing unknown fields, atomic ``save`` and ``load``."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**d)

    def save(self, path: Union[str, Path]) -> None:
        """Writes the record as JSON (atomically)."""
        from .files import write_json

        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Union[str, Path]):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclasses.dataclass(frozen=True)
class FineGatesConfig(_JsonRecord):
    """The options of :func:`finegates.sparsify`; every value is checked when the config is made.

    ``target_sparsity``: the fraction of the gated layers' parameters the compact model removes, in
    [0, 1) (the reference objective reads it as each layer's per-dimension target).
    ``target_modules``: name suffixes or one regex (PEFT style); None: every Linear/Conv1D inside the
    transformer blocks, embeddings and heads excluded. ``lora_rank`` / ``lora_alpha``: LoRA inside
    the gates (0: none; alpha None: the rank). ``train_weights`` / ``train_bias``: whether the gated
    layers' weights / biases train. ``trainable_modules``: more modules (suffixes) that train.
    ``sigma``: the gate noise. ``gate_dtype``: the dtype of the gate logits. ``kurtosis`` /
    ``kurtosis_tau``: the reference's kurtosis weighting. ``gate_gradient``: ``"straight-through"``
    or ``"clamp"`` (the reference). ``structure``: ``"rows_cols"`` (every row and column of a gated
    layer can close) or ``"heads_units"``: only the dimensions compaction shrinks inside a block are
    gated (attention's q/k/v rows and o columns, the MLP's units; the sides that read or write the
    residual stream keep fixed open gates) and the budget's exact closure closes whole attention heads
    and whole MLP units, so the compact model is plain ``nn.Linear`` s with nothing gathered or
    scattered: the shape head-and-unit pruning gives, which runs faster per parameter removed."""

    target_sparsity: float
    target_modules: Optional[Union[str, List[str]]] = None
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    train_weights: bool = False
    train_bias: bool = True
    trainable_modules: Optional[List[str]] = None
    sigma: float = 0.1
    gate_dtype: torch.dtype = torch.float32
    kurtosis: bool = False
    kurtosis_tau: float = 100.0
    gate_gradient: str = "straight-through"
    structure: str = "rows_cols"

    def __post_init__(self):
        ts = self.target_sparsity
        if not _is_number(ts) or not (0.0 <= ts < 1.0):
            raise ValueError(f"target_sparsity must lie in [0, 1), got {ts!r}")
        if self.gate_gradient not in GATE_GRADIENTS:
            raise ValueError(f"gate_gradient must be one of {GATE_GRADIENTS}, got {self.gate_gradient!r}")
        if not (_is_number(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma!r}")
        r = self.lora_rank
        if isinstance(r, bool) or not isinstance(r, (int, float)) or int(r) != r or r < 0:
            raise ValueError(f"lora_rank must be an integer >= 0, got {r!r}")
        a = self.lora_alpha
        if a is not None and not (_is_number(a) and a >= 0):
            raise ValueError(f"lora_alpha must be None (the rank) or a finite number >= 0, got {a!r}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        for name in ("train_weights", "train_bias", "kurtosis"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (_is_number(self.kurtosis_tau) and self.kurtosis_tau > 0):
            raise ValueError(f"kurtosis_tau must be a finite number > 0, got {self.kurtosis_tau!r}")
        tm = self.trainable_modules
        if tm is not None and (isinstance(tm, str) or not all(isinstance(n, str) and n for n in tm)):
            raise ValueError(f"trainable_modules must be None or a list of module name suffixes, got {tm!r}"
                             + (f" (for one module: [{tm!r}])" if isinstance(tm, str) else ""))
        tg = self.target_modules
        if tg is not None and not isinstance(tg, str) and not all(isinstance(n, str) and n for n in tg):
            raise ValueError(f"target_modules must be None, a regex or a list of module name suffixes, got {tg!r}")
        if isinstance(self.gate_dtype, str):
            if self.gate_dtype not in _DTYPES:
                raise ValueError(f"gate_dtype must be one of {sorted(_DTYPES)}, got {self.gate_dtype!r}")
            object.__setattr__(self, "gate_dtype", _DTYPES[self.gate_dtype])
        for name in ("target_modules", "trainable_modules"):  # lists, so that equal configs compare equal
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, list(value))
        object.__setattr__(self, "target_sparsity", float(ts))
        object.__setattr__(self, "lora_rank", int(r))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON values (the dtype by name)."""
        d = dataclasses.asdict(self)
        d["gate_dtype"] = str(self.gate_dtype).removeprefix("torch.")
        return d



_CHOICES = {"sparsity_objective": ("budget", "reference"), "sparsity_ramp": ("linear", "cubic")}

# How the budget's exact closure orders the gates: by their value tanh(theta) + 0.5, or by task saliency.
CLOSURE_RANKS = ("value", "saliency")


def closure_rank_for(closure_rank: Optional[str], sparsity_objective: str, owner: str) -> str:
    """The closure rank a run uses: None is task saliency with the budget objective (it closes to
    the requested size at 1-2 points more accuracy than ranking by gate value on MiniLM/SST-2) and
    ``"value"`` with the reference objective (which has no exact closure to rank). ValueError,
    naming ``owner`` (e.g. ``"TrainOptions."``), for anything else or saliency without the budget."""
    if closure_rank is None:
        return "saliency" if sparsity_objective == "budget" else "value"
    if closure_rank not in CLOSURE_RANKS:
        raise ValueError(f"{owner}closure_rank must be one of {', '.join(CLOSURE_RANKS)}, got {closure_rank!r}")
    if closure_rank == "saliency" and sparsity_objective != "budget":
        raise ValueError(f"{owner}closure_rank must be 'value' with the reference objective (it has no exact "
                         f"closure to rank), got {closure_rank!r}")
    return closure_rank


# The recovery phase when ``recovery_steps`` is None: the last fifth of the run.
RECOVERY_SHARE = 0.2

_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclasses.dataclass(frozen=True)
class TrainOptions(_JsonRecord):
    """What a training run reads besides the model, and the one place their defaults live.

    The sparsity fields (``target_sparsity`` to ``closure_rank``, and ``gate_lr``) are the method's
    schedule, read by :class:`finegates.engine.SparsityEngine` in every loop: the command line's,
    :class:`finegates.integrations.FineGatesTrainer` and a user's own. The others are the command
    line's loop (built from the parsed arguments, each field the flag of the same name,
    ``--batch-size`` -> ``batch_size``; the command line sets every field, its defaults are per
    command). ``target_sparsity`` None is the target the gated layers were given by
    :func:`finegates.sparsify`; ``max_steps`` None trains ``epochs`` epochs; ``recovery_steps`` None
    is the last fifth of the run (``RECOVERY_SHARE``); ``sparsity_lambda`` weighs the reference
    objective only (the budget objective learns its multiplier)."""

    batch_size: int = 16
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    max_steps: Optional[int] = None
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    seed: int = 42
    target_sparsity: Optional[float] = None
    sparsity_objective: str = "budget"
    sparsity_lambda: float = 5.0
    sparsity_start: int = 0
    sparsity_warmup: int = 0
    sparsity_ramp: str = "linear"
    budget_multiplier_lr: float = 1.0
    budget_penalty: float = 50.0
    kurtosis: bool = False
    recovery_steps: Optional[int] = 0
    recovery_lr: float = 0.5
    closure_rank: Optional[str] = None  # None: closure_rank_for's default
    gate_lr: float = 0.05
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    logging_steps: int = 50
    checkpointing_steps: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "epochs", "logging_steps"):
            _require(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "an integer >= 1")
        for name in ("warmup_steps", "sparsity_start", "sparsity_warmup", "checkpointing_steps", "keep_checkpoints"):
            _require(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 0, "an integer >= 0")
        for name in ("max_steps", "recovery_steps"):
            v, least = getattr(self, name), 1 if name == "max_steps" else 0
            _require(self, name, v is None or (_is_int(v) and v >= least), f"None or an integer >= {least}")
        _require(self, "seed", _is_int(self.seed) and 0 <= self.seed < 2 ** 32, "an integer in [0, 2**32)")
        ts = self.target_sparsity
        _require(self, "target_sparsity", ts is None or (_is_number(ts) and 0.0 <= ts < 1.0),
                 "None (the layers' own) or a fraction in [0, 1)")
        for name in ("weight_decay", "max_grad_norm", "sparsity_lambda", "budget_multiplier_lr", "budget_penalty",
                     "gate_lr", "distill_weight"):
            _require(self, name, _is_number(getattr(self, name)) and getattr(self, name) >= 0, "a finite number >= 0")
        _require(self, "recovery_lr", _is_number(self.recovery_lr) and 0.0 <= self.recovery_lr <= 1.0,
                 "a fraction in [0, 1]")
        _require(self, "distill_temperature", _is_number(self.distill_temperature) and self.distill_temperature > 0,
                 "a finite number > 0")
        _require(self, "kurtosis", isinstance(self.kurtosis, bool), "true or false")
        for name, allowed in {**_CHOICES, "lr_scheduler": _SCHEDULERS}.items():
            _require(self, name, getattr(self, name) in allowed, "one of " + ", ".join(allowed))
        object.__setattr__(self, "closure_rank", closure_rank_for(self.closure_rank, self.sparsity_objective,
                                                                  "TrainOptions."))

    def recovery_steps_for(self, total_steps: int) -> int:
        """The recovery phase of a run of ``total_steps`` optimizer steps (None: a fifth of it); a
        ValueError when it leaves no step to train the gates in."""
        if self.recovery_steps is None:
            return int(total_steps * RECOVERY_SHARE)
        if self.recovery_steps and self.recovery_steps >= total_steps:
            raise ValueError(f"recovery_steps={self.recovery_steps} leaves no step to train the gates in a run of "
                             f"{total_steps} steps")
        return int(self.recovery_steps)

    @classmethod
    def from_namespace(cls, namespace: Any) -> "TrainOptions":
        """The fields the namespace has (a command's parsed arguments); the others keep their defaults."""
        present = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
        if present.get("sparsity_lambda") is None:
            present.pop("sparsity_lambda", None)
        return cls(**present)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(options: "TrainOptions", name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainOptions.{name} must be {expected}, got {getattr(options, name)!r}")
