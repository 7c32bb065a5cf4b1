"""``FineGatesConfig``: what :func:`finegates.sparsify` puts on a model, as one object that can be
printed, compared, saved next to a run and loaded again (as PEFT's ``LoraConfig`` is)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

__all__ = ["FineGatesConfig", "GATE_GRADIENTS"]

GATE_GRADIENTS = ("straight-through", "clamp")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class FineGatesConfig:
    """The options of :func:`finegates.sparsify`; every value is checked when the config is made.

    ``target_sparsity``: the fraction of the gated layers' parameters the compact model removes, in
    [0, 1) (the reference objective reads it as each layer's per-dimension target).
    ``target_modules``: name suffixes or one regex (PEFT style); None: every Linear/Conv1D inside the
    transformer blocks, embeddings and heads excluded. ``lora_rank`` / ``lora_alpha``: LoRA inside
    the gates (0: none; alpha None: the rank). ``train_weights`` / ``train_bias``: whether the gated
    layers' weights / biases train. ``trainable_modules``: more modules (suffixes) that train.
    ``sigma``: the gate noise. ``gate_dtype``: the dtype of the gate logits. ``kurtosis`` /
    ``kurtosis_tau``: the reference's kurtosis weighting. ``gate_gradient``: ``"straight-through"``
    or ``"clamp"`` (the reference)."""

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

    def __post_init__(self):
        ts = self.target_sparsity
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not (0.0 <= ts < 1.0):
            raise ValueError(f"target_sparsity must lie in [0, 1), got {ts!r}")
        if self.gate_gradient not in GATE_GRADIENTS:
            raise ValueError(f"gate_gradient must be one of {GATE_GRADIENTS}, got {self.gate_gradient!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma!r}")
        r = self.lora_rank
        if isinstance(r, bool) or not isinstance(r, (int, float)) or int(r) != r or r < 0:
            raise ValueError(f"lora_rank must be an integer >= 0, got {r!r}")
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

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FineGatesConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"FineGatesConfig: unknown fields {unknown}")
        return cls(**d)

    def save(self, path: Union[str, Path]) -> None:
        """Writes the config as JSON (atomically)."""
        from .files import write_json

        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "FineGatesConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
