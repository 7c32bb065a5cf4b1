"""The sparsity objectives and a schedule for the reference's weight lambda.

Two objectives, both computed from per-layer terms gathered while each gated layer runs (under FSDP a
layer's gate logits exist only during its own forward):

- :class:`BudgetObjective` (default): the expected kept fraction of the gated layers' parameters in
  the compact model (:class:`~finegates.expected_size.ExpectedSize`), weighted by the budget
  controller's multiplier (:mod:`finegates.budget`);
- :class:`ReferenceObjective`: the reference's per-layer keep targets (:func:`sparsity_loss`),
  weighted by a fixed lambda (:class:`SparsitySchedule`).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from .layers import GatedLinear

__all__ = ["sparsity_loss", "layer_loss", "SparsitySchedule", "ReferenceObjective", "BudgetObjective", "OBJECTIVES"]

OBJECTIVES = ("budget", "reference")


def layer_loss(layer: GatedLinear, kurtosis: bool) -> Tensor:
    """One layer's term of :func:`sparsity_loss` (the training loop sums them per layer as the
    layers run, which FSDP needs)."""
    keep_r = layer.row_gates.keep_probability()
    keep_c = layer.col_gates.keep_probability()
    if kurtosis:
        state = layer.kurtosis_state
        if state is None:
            raise RuntimeError(
                "sparsity_loss(kurtosis=True) needs kurtosis weights: sparsify(..., kurtosis=True) and a "
                "forward pass in training mode first"
            )
        row_w, col_w, rows, cols = state
        means = torch.stack(((keep_r[rows] * row_w.to(keep_r.dtype)).sum(), (keep_c[cols] * col_w.to(keep_c.dtype)).sum()))
    else:
        means = torch.stack((keep_r.mean(), keep_c.mean()))
    target_keep = 1.0 - float(layer.target_sparsity)
    return (means - target_keep).abs().mean()


def sparsity_loss(model: nn.Module, *, kurtosis: bool = False) -> Tensor:
    """The reference (jsvir/FineGates ``SparseLayer.sparsity_loss`` + ``compute_sparsity_loss``):

    for each gated layer with keep probabilities ``p_r`` (rows) and ``p_c`` (columns) and
    ``t = 1 - target_sparsity``::

        L_layer = ( |mean(p_r) - t| + |mean(p_c) - t| ) / 2

    and ``sparsity_loss = mean over gated layers of L_layer`` (a float32 scalar).

    ``kurtosis=True`` (reference ``--kurt``): ``mean(p)`` is replaced by the weighted sum
    ``sum_i w_i p_i`` over the currently active rows (columns), with weights
    ``softmax(-sqrt(kurt_i) / tau)`` recorded in the last training forward (see
    ``GatedLinear._record_kurtosis``); requires ``sparsify(..., kurtosis=True)``.
    Layers whose ``target_sparsity`` is None are skipped.
    """
    layers = [m for m in model.modules() if isinstance(m, GatedLinear) and m.target_sparsity is not None]
    if not layers:
        raise ValueError("sparsity_loss: the model has no gated layer with a target_sparsity (call sparsify first)")
    return torch.stack([layer_loss(m, kurtosis).float() for m in layers]).mean()


class SparsitySchedule:
    """``lambda(step)``: 0 before ``start_step``; then a ramp over ``warmup_steps`` steps to ``lam``,
    ``lam * r(t)`` with ``t = min(1, (step - start_step + 1) / warmup_steps)`` and ``r(t) = t``
    (``shape="linear"``) or ``1 - (1 - t)^3`` (``"cubic"``: most of the ramp early, as the sparsity
    schedule of movement pruning); ``lam`` afterwards."""

    SHAPES = ("linear", "cubic")

    def __init__(self, lam: float, start_step: int = 0, warmup_steps: int = 0, shape: str = "linear"):
        if lam < 0 or start_step < 0 or warmup_steps < 0:
            raise ValueError("SparsitySchedule: lam, start_step and warmup_steps must be >= 0")
        if shape not in self.SHAPES:
            raise ValueError(f"SparsitySchedule: shape must be one of {self.SHAPES}, got {shape!r}")
        self.lam = float(lam)
        self.start_step = int(start_step)
        self.warmup_steps = int(warmup_steps)
        self.shape = shape

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.warmup_steps > 0:
            t = min(1.0, (step - self.start_step + 1) / self.warmup_steps)
            return self.lam * (t if self.shape == "linear" else 1.0 - (1.0 - t) ** 3)
        return self.lam


class ReferenceObjective:
    """:func:`sparsity_loss` from per-layer terms: ``term(layer)`` as the layer runs, ``combine``."""

    name = "reference"

    def __init__(self, kurtosis: bool = False):
        self.kurtosis = kurtosis

    def term(self, layer: GatedLinear):
        return layer_loss(layer, self.kurtosis).float()

    def combine(self, terms: Dict[GatedLinear, Tensor]) -> Tensor:
        return torch.stack(list(terms.values())).mean()


class BudgetObjective:
    """The expected kept fraction ``S`` of the compact model, from each layer's keep probabilities."""

    name = "budget"

    def __init__(self, model: nn.Module):
        from .expected_size import ExpectedSize

        self.expected_size = ExpectedSize(model)

    def term(self, layer: GatedLinear):
        return layer.row_gates.keep_probability(), layer.col_gates.keep_probability()

    def combine(self, terms) -> Tensor:
        return self.expected_size(terms)
