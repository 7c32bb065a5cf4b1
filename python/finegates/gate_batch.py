"""Every gate vector of a model sampled in one batched pass per training forward.

Layer by layer, each gate vector costs a dozen small ops per step (the NaN check, tanh, the noise,
the clamp, the keep probability's tanh and ndtr) and as many autograd nodes: about 900 ops and 450
nodes on a 36-layer encoder, a fixed cost that small fine-tuning batches feel. :class:`GateBatch`
concatenates every logit vector once, runs the same formulas (:func:`finegates.gates.sample_values`,
:func:`finegates.gates.keep_probability`) on the whole, and hands each layer its slices for the
forward that follows. The values are those the layers would sample themselves (the noise, where
there is any, comes from one draw over all gates instead of one per vector: the same distribution,
other draws).

It needs every logit whole on one device (not under FSDP, whose shards are only gathered inside each
layer's forward) and one gradient rule; :meth:`GateBatch.usable` says whether the model qualifies,
and the layers sample themselves otherwise.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from .gates import Gates, check_finite, keep_probability, sample_values
from .layers import GatedLinear

__all__ = ["GateBatch"]


class GateBatch:
    """``sample()`` before a training forward of ``model`` (it returns every layer's keep
    probabilities), ``clear()`` after it."""

    def __init__(self, model: nn.Module):
        self.layers: List[GatedLinear] = [m for m in model.modules() if isinstance(m, GatedLinear)]
        self.vectors: List[Gates] = [g for m in self.layers for g in (m.row_gates, m.col_gates)]
        self.sizes = [g.size for g in self.vectors]

    def usable(self) -> bool:
        """Every logit a plain tensor (no FSDP shard), all on one device in one dtype, one gradient rule."""
        thetas = [g.theta for g in self.vectors]
        if not thetas or any(type(t.data) is not torch.Tensor for t in thetas):
            return False
        return (len({(t.device, t.dtype) for t in thetas}) == 1
                and len({g.straight_through for g in self.vectors}) == 1)

    def _sigma(self, like: Tensor):
        """The noise scale: one number when every vector has the same, else one per gate."""
        sigmas = [g.sigma for g in self.vectors]
        if len(set(sigmas)) == 1:
            return sigmas[0]
        return torch.repeat_interleave(torch.tensor(sigmas, dtype=like.dtype, device=like.device),
                                       torch.tensor(self.sizes, device=like.device))

    def sample(self) -> Dict[GatedLinear, Tuple[Tensor, Tensor]]:
        """Samples every gate (training values) into its layer and returns ``{layer: (row keep
        probabilities, column keep probabilities)}`` for the sparsity objective."""
        theta = torch.cat([g.theta for g in self.vectors])
        check_finite(self, theta)
        mu = torch.tanh(theta)
        values = sample_values(mu, self._sigma(mu), self.vectors[0].straight_through).split(self.sizes)
        keep = keep_probability(mu).split(self.sizes)
        probs = {}
        for i, layer in enumerate(self.layers):
            layer.sampled_gates = (values[2 * i], values[2 * i + 1])
            probs[layer] = (keep[2 * i], keep[2 * i + 1])
        return probs

    def clear(self) -> None:
        """The layers sample themselves again (a later forward must not reuse this step's values)."""
        for layer in self.layers:
            layer.sampled_gates = None
