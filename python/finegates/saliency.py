"""Task saliency of the gates: which gates the task needs, for the budget's exact closure to rank by.

A gate's value ``g`` scales its row or column; closing it sets ``g`` to 0. The first-order Taylor
estimate of the loss change is ``-g * dL/dg``, and its square averaged over batches (Molchanov et
al., "Importance Estimation for Neural Network Pruning", 2019) is the saliency::

    score <- beta * score + (1 - beta) * (g * dL/dg)^2      (once per optimizer step)

``dL/dg`` is read from a hook on the gate values themselves, so it is the task's gradient alone (the
sparsity objective reaches the logits through the keep probabilities, not through ``g``). The
linear term ``g * dL/dg`` is summed over a step's micro-batches and averaged over the processes
before it is squared (:meth:`GateSaliency.step`), so the score is that of the whole step's batch:
two processes, or two accumulated halves, score as one process on the full batch does. A closed
gate (``g = 0``) scores 0. :meth:`GateSaliency.ranking` divides each score by the number of weights
the gate spans, so that the closure removes the parameters that cost the task least per parameter.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

from .layers import GatedLinear

__all__ = ["GateSaliency"]


class GateSaliency:
    """Gathers the saliency of every gate of ``model``'s GatedLinear layers from its training
    backwards until :meth:`stop`. ``state_dict`` / ``load_state_dict`` carry it through checkpoints."""

    def __init__(self, model: nn.Module, beta: float = 0.99):
        if not (math.isfinite(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"GateSaliency: beta must lie in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.layers: List[GatedLinear] = [m for m in model.modules() if isinstance(m, GatedLinear)]
        if not self.layers:
            raise ValueError("GateSaliency: the model has no GatedLinear layer")
        self.scores: List[List[Tensor]] = [
            [torch.zeros(m.out_features, dtype=torch.float32, device=m.weight.device),
             torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)] for m in self.layers]
        self._step_taylor: List[List[Tensor]] = [[torch.zeros_like(s) for s in pair] for pair in self.scores]
        self._handles = [m.register_gate_hook(functools.partial(self._observe, i)) for i, m in enumerate(self.layers)]

    def _observe(self, index: int, layer: GatedLinear, row: Tensor, col: Tensor) -> None:
        for side, values in enumerate((row, col)):
            if values.requires_grad:
                values.register_hook(functools.partial(self._accumulate, index, side, values.detach()))

    @torch.no_grad()
    def _accumulate(self, index: int, side: int, values: Tensor, grad: Tensor) -> None:
        if self._step_taylor[index][side].device != grad.device:  # made before the model moved to its device
            self._move(grad.device)
        self._step_taylor[index][side].add_(values.float() * grad.float())

    def _move(self, device: torch.device) -> None:
        self.scores = [[s.to(device) for s in pair] for pair in self.scores]
        self._step_taylor = [[t.to(device) for t in pair] for pair in self._step_taylor]

    @torch.no_grad()
    def step(self, accelerator=None) -> None:
        """After an optimizer step (every process calls it): the step's summed ``g * dL/dg``,
        averaged over ``accelerator``'s processes where there are several, enters the scores
        squared."""
        flat = torch.cat([t for pair in self._step_taylor for t in pair])
        if accelerator is not None and accelerator.num_processes > 1:
            flat = accelerator.reduce(flat.to(accelerator.device), reduction="mean").to(flat.device)
        offset = 0
        for pair, taylor in zip(self.scores, self._step_taylor):
            for score, t in zip(pair, taylor):
                score.mul_(self.beta).add_(flat[offset:offset + t.numel()].square(), alpha=1.0 - self.beta)
                t.zero_()
                offset += t.numel()

    def stop(self) -> None:
        """No more gathering (the gates are frozen): the hooks go, the scores stay."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def ranking(self) -> Tensor:
        """Every gate's score per weight it spans, flat on the CPU in the order of
        :func:`finegates.budget.close_to_budget` (layers in module order, rows then columns)."""
        return torch.cat([torch.cat((rows / m.in_features, cols / m.out_features)).cpu()
                          for m, (rows, cols) in zip(self.layers, self.scores)])

    def final_ranking(self, accelerator=None) -> Tensor:
        """For the closure at the freeze: stops gathering and returns :meth:`ranking`, the main
        process's where there are several (their scores agree up to rounding; all must close the
        same gates). Every process must call it."""
        self.stop()
        rank = self.ranking()
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            rank = broadcast(rank.to(accelerator.device), from_process=0).cpu()
        return rank

    def state_dict(self) -> Dict[str, Any]:
        return dict(beta=self.beta, scores=[[s.cpu() for s in pair] for pair in self.scores])

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        if len(d["scores"]) != len(self.scores):
            raise ValueError(f"GateSaliency: the checkpoint has {len(d['scores'])} layers' scores, the model "
                             f"{len(self.scores)} gated layers")
        for pair, saved in zip(self.scores, d["scores"]):
            for s, v in zip(pair, saved):
                s.copy_(v)
