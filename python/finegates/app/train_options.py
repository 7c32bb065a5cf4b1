"""What the training loop reads: one typed, frozen record instead of the command line's namespace.

:func:`finegates.app.trainer.train` takes a :class:`TrainOptions`; the command line builds one from its
parsed arguments with :meth:`TrainOptions.from_namespace` (each field is the flag of the same name,
``--batch-size`` -> ``batch_size``, documented in docs/cli.md). The defaults are the command line's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

__all__ = ["TrainOptions"]

_CHOICES = {"sparsity_objective": ("budget", "reference"), "sparsity_ramp": ("linear", "cubic")}


@dataclass(frozen=True)
class TrainOptions:
    """The loop's options. ``max_steps`` None trains ``epochs`` epochs; ``recovery_steps`` None is
    the last fifth of the run; ``sparsity_lambda`` weighs the reference objective only (the budget
    objective learns its multiplier)."""

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
    target_sparsity: float = 0.0
    sparsity_objective: str = "budget"
    sparsity_lambda: float = 0.0
    sparsity_start: int = 0
    sparsity_warmup: int = 0
    sparsity_ramp: str = "linear"
    budget_multiplier_lr: float = 1.0
    budget_penalty: float = 50.0
    kurtosis: bool = False
    recovery_steps: Optional[int] = 0
    recovery_lr: float = 0.5
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    logging_steps: int = 50
    checkpointing_steps: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "epochs", "logging_steps"):
            _require(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "an integer >= 1")
        for name in ("warmup_steps", "sparsity_start", "sparsity_warmup", "checkpointing_steps", "keep_checkpoints"):
            _require(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 0, "an integer >= 0")
        for name in ("max_steps", "recovery_steps"):
            v = getattr(self, name)
            _require(self, name, v is None or (isinstance(v, int) and v >= (1 if name == "max_steps" else 0)),
                     "None or an integer >= " + ("1" if name == "max_steps" else "0"))
        _require(self, "target_sparsity", 0.0 <= self.target_sparsity < 1.0, "a fraction in [0, 1)")
        _require(self, "recovery_lr", 0.0 <= self.recovery_lr <= 1.0, "a fraction in [0, 1]")
        _require(self, "distill_temperature", self.distill_temperature > 0, "a number > 0")
        for name, allowed in _CHOICES.items():
            _require(self, name, getattr(self, name) in allowed, "one of " + ", ".join(allowed))

    @classmethod
    def from_namespace(cls, namespace: Any) -> "TrainOptions":
        """The fields the namespace has (a command's parsed arguments); the others keep their defaults."""
        present = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
        if present.get("sparsity_lambda") is None:
            present.pop("sparsity_lambda", None)
        return cls(**present)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _require(options: TrainOptions, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainOptions.{name} must be {expected}, got {getattr(options, name)!r}")
