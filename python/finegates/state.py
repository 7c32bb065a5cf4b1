"""Saving and restoring just the trainable state (gates, LoRA, trained biases/heads)."""

from __future__ import annotations

from typing import Dict

from torch import Tensor, nn

from .gates import Gates
from .layers import GatedLinear

__all__ = ["trainable_state_dict", "load_trainable_state"]


def trainable_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """Detached copies of the parameters that require grad, plus every gate and LoRA tensor
    (parameters and buffers of ``Gates`` modules and ``GatedLinear.lora_a/lora_b``) even if frozen.
    Keys are those of ``model.state_dict()``."""
    full = model.state_dict(keep_vars=True)
    keep = set()
    for name, t in full.items():
        if isinstance(t, nn.Parameter) and t.requires_grad:
            keep.add(name)
    for mname, m in model.named_modules():
        prefix = mname + "." if mname else ""
        if isinstance(m, Gates):
            for k in m.state_dict(keep_vars=True):
                keep.add(prefix + k)
        elif isinstance(m, GatedLinear) and m.lora_a is not None:
            keep.add(prefix + "lora_a")
            keep.add(prefix + "lora_b")
    return {k: full[k].detach().clone() for k in full if k in keep}


def _gate_or_lora(key: str) -> bool:
    return key.endswith(("row_gates.theta", "col_gates.theta", ".lora_a", ".lora_b")) or key in ("lora_a", "lora_b")


def load_trainable_state(model: nn.Module, state: Dict[str, Tensor]) -> nn.Module:
    """Load a :func:`trainable_state_dict` onto a model sparsified the same way (e.g. a fresh base
    model + :func:`finegates.sparsify_as` with its :func:`finegates.sparsify_record`). Raises KeyError
    on keys the model lacks, and on gate or LoRA tensors of the model the state lacks (they would
    stay at their initial values: every gate open)."""
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise KeyError(f"load_trainable_state: keys not in the model (sparsified the same way?): {unknown[:5]}")
    needed = [k for k in trainable_state_dict(model) if _gate_or_lora(k) and k not in state]
    if needed:
        raise KeyError(f"load_trainable_state: the state lacks {len(needed)} gate/LoRA tensors of the model, "
                       f"e.g. {needed[:3]}; it was saved from a model sparsified otherwise, or damaged")
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return model
