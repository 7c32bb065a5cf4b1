"""A size budget: train the gates to a compact model of the requested size, then close them exactly.

The objective is the expected kept fraction ``S`` of the gated layers' parameters
(:class:`~finegates.expected_size.ExpectedSize`), weighted by a multiplier that a controller sets
from the *exact* size (:func:`finegates.compression_report`, the plan compaction executes)::

    target(step) = 1 - t * r(u),  u = (step - start) / ramp_steps in [0, 1], r(u) = 1 - (1 - u)^3
    c            = kept_exact - target(step)          (> 0: the model is still too large)
    weight       = lam + penalty * c,   lam <- lam + multiplier_lr * c    (after every step, while |c| <= 0.02)
    loss         = task_loss + weight * S

``lam`` is a Lagrange multiplier learned by dual ascent (signed: a model that became too small
gets its nearest gates reopened), ``penalty * c`` a proportional term that damps it. The target
ramps from the dense model to the request, so which gates close is decided by the task over the
whole ramp, and the layers share one budget: a layer gives more where its parameters matter less.

At the freeze step :func:`close_to_budget` makes the final decision exactly: every gate is ranked by
its eval value ``tanh(theta) + 0.5`` (or by its task saliency, :mod:`finegates.saliency`) and the k
lowest are closed, k the count whose compact model is
nearest the request (binary search over the exact size). After it the gates stop.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import TrainOptions
from .layers import GatedLinear
from .report import compression_report

__all__ = ["BudgetController", "close_to_budget", "kept_fraction", "check_reachable", "with_recovery"]


def kept_fraction(model: nn.Module, masks=None) -> float:
    """Exact fraction of the gated layers' parameters the compact model keeps."""
    return 1.0 - compression_report(model, masks=masks)["removed_fraction_of_gated"]


def _gates(model: nn.Module):
    return [(m, side) for m in model.modules() if isinstance(m, GatedLinear) for side in (m.row_gates, m.col_gates)]


def check_reachable(model: nn.Module, target_sparsity: float) -> float:
    """The largest removal compaction can reach (every gate closed); ValueError when
    ``target_sparsity`` exceeds it (units that must stay: biases, one head per attention, ...)."""
    masks = {m: (torch.full((m.out_features,), m.row_gates.fixed, dtype=torch.bool, device=m.weight.device),
                 torch.full((m.in_features,), m.col_gates.fixed, dtype=torch.bool, device=m.weight.device))
             for m in model.modules() if isinstance(m, GatedLinear)}  # every gate closed but those fixed open
    most = compression_report(model, masks=masks)["removed_fraction_of_gated"]
    if target_sparsity > most + 1e-9:
        raise ValueError(
            f"target_sparsity={target_sparsity:g} cannot be reached: with every gate closed the compact model "
            f"still keeps {100 * (1 - most):.2f}% of the gated layers' parameters (at most {most:.4f} removable)"
        )
    return most


# The multiplier integrates only while the size is within this of the target (anti-windup): the
# gates take tens of steps to cross their threshold, and a multiplier that kept growing through
# that lag overshot the target by 6 points of size on MiniLM before it came back.
INTEGRATION_BAND = 0.02


class BudgetController:
    """The multiplier of the budget objective (see the module docstring). ``state_dict`` /
    ``load_state_dict`` carry it through checkpoints."""

    def __init__(self, target_sparsity: float, *, start: int = 0, ramp_steps: int = 0,
                 multiplier_lr: float = TrainOptions.budget_multiplier_lr, penalty: float = TrainOptions.budget_penalty,
                 measure_every: int = 10):
        if not 0.0 <= float(target_sparsity) < 1.0 or target_sparsity != target_sparsity:
            raise ValueError(f"BudgetController: target_sparsity must lie in [0, 1), got {target_sparsity!r}")
        for name, v in (("start", start), ("ramp_steps", ramp_steps)):
            if int(v) != v or v < 0:
                raise ValueError(f"BudgetController: {name} must be an integer >= 0, got {v!r}")
        for name, v in (("multiplier_lr", multiplier_lr), ("penalty", penalty)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"BudgetController: {name} must be finite and >= 0, got {v!r}")
        if int(measure_every) != measure_every or measure_every < 1:
            raise ValueError(f"BudgetController: measure_every must be an integer >= 1, got {measure_every!r}")
        self.target_sparsity = float(target_sparsity)
        self.start, self.ramp_steps = int(start), int(ramp_steps)
        self.multiplier_lr, self.penalty = float(multiplier_lr), float(penalty)
        self.measure_every = int(measure_every)
        self.lam = 0.0
        self.error = 0.0  # c of the last update
        self.offset = 0.0  # exact - expected at the last exact measurement
        self.kept = 1.0  # the last estimate of the exact kept fraction

    def target_kept(self, step: int) -> float:
        """The kept fraction the model should have after ``step`` optimizer steps."""
        if step < self.start:
            return 1.0
        u = 1.0 if self.ramp_steps == 0 else min(1.0, (step - self.start + 1) / self.ramp_steps)
        return 1.0 - self.target_sparsity * (1.0 - (1.0 - u) ** 3)

    def weight(self, step: int) -> float:
        """The weight of ``S`` in the loss of this step (0 before ``start``)."""
        if step < self.start:
            return 0.0
        return self.lam + self.penalty * self.error

    def measures(self, step: int) -> bool:
        """Whether the update after ``step`` counts the exact kept fraction (reads every gate)."""
        return step % self.measure_every == 0

    def update(self, step: int, expected: float, model: Optional[nn.Module]) -> float:
        """After optimizer step ``step``: the kept fraction (exact every ``measure_every`` steps and
        where ``model`` is given, else the expected one shifted by the last exact offset), the error
        against the target, and the multiplier. Returns the estimate of the kept fraction."""
        if model is not None and self.measures(step):
            self.kept = kept_fraction(model)
            self.offset = self.kept - expected
        else:
            self.kept = expected + self.offset
        if step >= self.start:
            self.error = self.kept - self.target_kept(step)
            if abs(self.error) <= INTEGRATION_BAND:
                self.lam += self.multiplier_lr * self.error
        return self.kept

    def state_dict(self) -> Dict[str, Any]:
        return dict(lam=self.lam, error=self.error, offset=self.offset, kept=self.kept)

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.lam, self.error = float(d["lam"]), float(d["error"])
        self.offset, self.kept = float(d["offset"]), float(d["kept"])


def _masks_closing(order: Tensor, k: int, sizes: List[Tuple[GatedLinear, int, int]]):
    """Masks with the ``k`` lowest-ranked gates (``order``: positions in the flat gate vector) closed."""
    flat = torch.ones(sum(rows + cols for _, rows, cols in sizes), dtype=torch.bool)
    flat[order[:k]] = False
    masks, pos = {}, 0
    for m, rows, cols in sizes:
        dev = m.weight.device
        masks[m] = (flat[pos:pos + rows].to(dev), flat[pos + rows:pos + rows + cols].to(dev))
        pos += rows + cols
    return masks


_SCAN = 24  # closures tried on each side of the binary search's answer


@torch.no_grad()
def close_to_budget(model: nn.Module, target_sparsity: float, rank: Optional[Tensor] = None) -> Dict[str, Any]:
    """Closes the lowest gates so the compact model removes the fraction of the gated layers'
    parameters nearest ``target_sparsity``; the others open. Gates are ranked by their eval value,
    or by ``rank`` where given (one number per gate, higher keeps, in the order of the layers' rows
    then columns, e.g. :meth:`finegates.saliency.GateSaliency.ranking`; ties broken by value). Sets
    the logits (closed: at most ``atanh(-0.5)``; reopened: the eval value mirrored to ``|v|``) and
    returns ``dict(closed, reopened, newly_closed, removed_fraction)``. Gates fixed open
    (:meth:`finegates.gates.Gates.fix_open`) are never closed."""
    layers = [m for m in model.modules() if isinstance(m, GatedLinear)]
    sizes = [(m, m.out_features, m.in_features) for m in layers]
    values = torch.cat([torch.cat((m.row_gates.mu(), m.col_gates.mu())).float().cpu() + 0.5 for m in layers])
    order = torch.argsort(values, stable=True)
    if rank is not None:
        rank = rank.detach().float().cpu().reshape(-1)
        if rank.numel() != values.numel() or not torch.isfinite(rank).all():
            raise ValueError(f"close_to_budget: rank must hold {values.numel()} finite numbers (one per gate), got "
                             f"{rank.numel()}" + ("" if rank.numel() != values.numel() else " with NaN or inf"))
        order = order[torch.argsort(rank[order], stable=True)]
    fixed = torch.cat([torch.full((g.size,), g.fixed, dtype=torch.bool) for m in layers for g in (m.row_gates, m.col_gates)])
    order = order[~fixed[order]]
    bounds = torch.arange(order.numel() + 1)  # gates closed with the k lowest units closed
    if any(m.closes_whole_units for m in layers):
        from .compaction.units import unit_groups

        order, bounds = _by_units(order, unit_groups(model, layers), values if rank is None else rank)
    n_units = bounds.numel() - 1

    @functools.lru_cache(maxsize=None)  # the scan below revisits counts the search made
    def removed(k: int) -> float:
        return 1.0 - kept_fraction(model, _masks_closing(order, int(bounds[k]), sizes))

    lo, hi = 0, n_units  # removed(k) grows with k: the smallest k reaching the target
    while lo < hi:
        mid = (lo + hi) // 2
        if removed(mid) >= target_sparsity:
            hi = mid
        else:
            lo = mid + 1
    # The MLP's width padding makes the count step back now and then: the nearest k around it.
    window = range(max(0, lo - _SCAN), min(n_units, lo + _SCAN) + 1)
    k = min(window, key=lambda j: (abs(removed(j) - target_sparsity), j))
    closed = int(bounds[k])
    keep = torch.ones(values.numel(), dtype=torch.bool)
    keep[order[:closed]] = False
    was_open = values > 0
    _set_logits(layers, values, keep)
    return dict(closed=closed, reopened=int((keep & ~was_open).sum()), newly_closed=int((~keep & was_open).sum()),
                removed_fraction=removed(k))


def _by_units(order: Tensor, groups: Tensor, score: Tensor) -> Tuple[Tensor, Tensor]:
    """``order`` regrouped into whole units (``groups``: a unit id per gate, -1 a unit of its own),
    units ranked by their gates' mean score (ties: the unit whose first gate comes first); returns
    the gate order and, per count k of closed units, the number of gates they hold."""
    gid = groups[order].clone()
    singles = gid < 0
    gid[singles] = int(gid.max().clamp_min(-1)) + 1 + torch.arange(int(singles.sum()))
    n = int(gid.max()) + 1 if gid.numel() else 0
    sizes = torch.bincount(gid, minlength=n)
    mean = torch.zeros(n, dtype=torch.float64).index_add_(0, gid, score[order].double()) / sizes.clamp_min(1)
    first = torch.full((n,), gid.numel(), dtype=torch.long).scatter_reduce_(0, gid, torch.arange(gid.numel()), "amin")
    by_first = torch.argsort(first)
    unit_order = by_first[torch.argsort(mean[by_first], stable=True)]
    place = torch.empty(n, dtype=torch.long)
    place[unit_order] = torch.arange(n)
    regrouped = order[torch.argsort(place[gid], stable=True)]
    return regrouped, torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes[unit_order], 0)])


def _set_logits(layers: List[GatedLinear], values: Tensor, keep: Tensor) -> None:
    closed_logit = math.atanh(-0.5) - 0.5  # eval value tanh(.) + 0.5 < 0 with a margin
    pos = 0
    for m in layers:
        for gates in (m.row_gates, m.col_gates):
            v, k = values[pos:pos + gates.size], keep[pos:pos + gates.size]
            pos += gates.size
            opened = torch.where(k & (v <= 0), (-v).clamp_min(1e-3), v)  # a reopened gate: its mirror image
            theta = torch.atanh((opened - 0.5).clamp(-0.999, 0.999))
            theta = torch.where(k, torch.where(v > 0, gates.theta.detach().float().cpu(), theta),
                                torch.minimum(gates.theta.detach().float().cpu(), torch.tensor(closed_logit)))
            gates.theta.copy_(theta.to(gates.theta))


def with_recovery(optimizer: torch.optim.Optimizer, base, freeze: int, recovery: int, recovery_lr: float,
                  frozen_groups) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of a run with a recovery phase: ``base`` (a ``LambdaLR`` built to
    end at ``freeze``) until then; afterwards the groups in ``frozen_groups`` (the gates) at 0 and
    the others restarted at ``recovery_lr`` times their peak, decaying linearly to 0 over
    ``recovery`` steps (scheduler steps)."""
    if not 0.0 <= recovery_lr or not math.isfinite(recovery_lr):
        raise ValueError(f"recovery_lr must be finite and >= 0, got {recovery_lr!r}")

    def lam(i: int):
        before = base.lr_lambdas[i]
        if i in frozen_groups:
            return lambda s: before(s) if s < freeze else 0.0
        return lambda s: before(s) if s < freeze else recovery_lr * max(0.0, 1.0 - (s - freeze) / max(1, recovery))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lam(i) for i in range(len(optimizer.param_groups))])
