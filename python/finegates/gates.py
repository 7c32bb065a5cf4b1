"""Stochastic gates: the FineGates (reference) parametrisation.

theta ~ N(init_mean, init_std) at init; mu = tanh(theta);
training gate  g = clamp(mu + 0.5 + eps, 0, 1), eps ~ N(0, sigma^2) drawn from torch's RNG;
eval gate      g = clamp(mu + 0.5, 0, 1);
keep probability P(g > 0) = 1 - Phi((-0.5 - mu) / 0.5).

Gradient at the top of the clamp: the reference's clamp passes none where mu + 0.5 + eps > 1, which
at the initialisation (theta ~ N(1, 0.1), value ~ 1.26) is almost every gate, so the task has no say
in which gates close first. ``straight_through=True`` keeps the forward value and passes the gradient
as if the top were not clamped (the bottom stays clamped: a closed gate is exactly 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Gates", "sample_values", "keep_probability", "FIXED_OPEN_LOGIT"]

# The logit of a gate fixed open (Gates.fix_open): its value clamps to 1 with any noise above -0.49.
FIXED_OPEN_LOGIT = 3.0


def check_finite(owner, theta: Tensor) -> None:
    """NaN logits are an error (DESIGN: "NaN gates are an error in the layer"). The check costs a
    host sync on GPU, so there it runs every ``Gates.CUDA_CHECK_EVERY`` calls of ``owner`` (which
    counts them); under ``torch.compile`` it is skipped (a data-dependent branch would break the
    graph) and the NaN shows in the loss instead."""
    if torch.compiler.is_compiling():
        return
    if theta.is_cuda:
        owner._calls = getattr(owner, "_calls", 0) + 1
        if owner._calls % Gates.CUDA_CHECK_EVERY != 1:
            return
    if torch.isnan(theta).any():
        raise ValueError("Gates: the gate logits theta contain NaN (training diverged?); gate values are undefined")


def sample_values(mu: Tensor, sigma, straight_through: bool) -> Tensor:
    """Training gate values ``clamp(mu + 0.5 + eps, 0, 1)``, ``eps ~ N(0, sigma^2)`` (``sigma`` a
    number, or a tensor of ``mu``'s shape); the gradient rule at the clamp's top as the module
    docstring says."""
    noisy = isinstance(sigma, Tensor) or sigma > 0
    v = mu + 0.5 + torch.randn_like(mu) * sigma if noisy else mu + 0.5
    if straight_through:
        return torch.clamp(v, min=0.0) - torch.clamp(v.detach() - 1.0, min=0.0)
    return torch.clamp(v, 0.0, 1.0)


def keep_probability(mu: Tensor) -> Tensor:
    """``P(g > 0) = 1 - Phi((-0.5 - mu) / 0.5) = Phi(2 mu + 1)`` (the second form is two fewer ops)."""
    return torch.special.ndtr(mu.mul(2.0).add_(1.0))


class Gates(nn.Module):
    """A vector of ``size`` stochastic gates with logits ``theta`` (an ``nn.Parameter``)."""

    def __init__(
        self,
        size: int,
        *,
        sigma: float = 0.1,
        init_mean: float = 1.0,
        init_std: float = 0.1,
        dtype: torch.dtype = torch.float32,
        device=None,
        straight_through: bool = False,
    ):
        super().__init__()
        if int(size) <= 0:
            raise ValueError(f"Gates: size must be positive, got {size}")
        if sigma < 0:
            raise ValueError(f"Gates: sigma must be >= 0, got {sigma}")
        self.size = int(size)
        self.sigma = float(sigma)
        self.straight_through = bool(straight_through)
        self.theta = nn.Parameter(torch.empty(self.size, dtype=dtype, device=device))
        with torch.no_grad():
            self.theta.normal_(init_mean, init_std)
        self.fixed = False  # fix_open(): not trained, never closed

    @torch.no_grad()
    def fix_open(self) -> "Gates":
        """Holds every gate of this vector open: value 1, logits not trained, and the budget's
        closure never closes them (``sparsify(..., structure="heads_units")`` on residual sides)."""
        self.theta.fill_(FIXED_OPEN_LOGIT)
        self.theta.requires_grad_(False)
        self.fixed = True
        return self

    def mu(self) -> Tensor:
        return torch.tanh(self.theta)

    # On CUDA the NaN check reads a flag back to the host: do it every this many calls only.
    CUDA_CHECK_EVERY = 64

    def _check_finite(self) -> None:
        check_finite(self, self.theta)

    def values(self) -> Tensor:
        """Sampled gate values in training mode, deterministic ``clamp(mu + 0.5, 0, 1)`` in eval."""
        self._check_finite()
        mu = self.mu()
        if not self.training:
            return torch.clamp(mu + 0.5, 0.0, 1.0)
        return sample_values(mu, self.sigma, self.straight_through)

    def eval_values(self) -> Tensor:
        """Deterministic gate values regardless of the module's mode."""
        self._check_finite()
        return torch.clamp(self.mu() + 0.5, 0.0, 1.0)

    def keep_probability(self) -> Tensor:
        """``P(g > 0)`` per gate (differentiable in theta), :func:`keep_probability`."""
        return keep_probability(self.mu())

    @torch.no_grad()
    def active(self) -> Tensor:
        """Indices (int64) of the gates whose eval value is non-zero."""
        return torch.nonzero(self.eval_values() != 0, as_tuple=True)[0]

    def extra_repr(self) -> str:
        return (f"{self.size}, sigma={self.sigma}" + (", straight_through=True" if self.straight_through else "")
                + (", fixed open" if self.fixed else ""))
