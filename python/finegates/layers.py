"""``GatedLinear``: row/column gates (and optional LoRA inside them) on a frozen Linear weight."""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

import fg_kernels

from .gates import Gates

__all__ = ["GatedLinear", "is_conv1d", "is_linear_like", "set_backend", "set_submodule", "gates_open", "LAYER_BACKENDS"]

# "ops": fg::gated_linear, dispatched by device (C++ on CPU, Triton on CUDA).
# "triton": fg_triton::gated_linear, the Triton kernels on any device (CPU tensors under
# TRITON_INTERPRET=1), to check a whole model through them without a GPU. Same autograd.
LAYER_BACKENDS = ("ops", "triton")


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces the submodule at the dotted path ``name`` by ``new`` (how gates go on and compaction
    swaps layers)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (weight of shape (in, out)), detected by class name."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@contextlib.contextmanager
def gates_open(model: nn.Module):
    """Every GatedLinear of ``model`` computes with all its gates open (the adapter and bias
    still apply). A flag on each layer, not a context variable, so torch.compile traces it."""
    layers = [m for m in model.modules() if isinstance(m, GatedLinear)]
    before = [m.gates_forced_open for m in layers]
    for m in layers:
        m.gates_forced_open = True
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.gates_forced_open = was


class GatedLinear(nn.Module):
    """``y = g_r * ((x * g_c) @ (W + s * B @ A).T + b)`` computed by ``fg_kernels.gated_linear``.

    ``weight`` (and ``bias``) are the base module's own Parameters (no copy). For a ``Conv1D`` the
    stored weight has shape (in, out) and the op gets ``weight.t()``. A bias is never added when the
    base has none. ``target_sparsity`` is set by :func:`finegates.sparsify`.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        lora_rank: int = 0,
        lora_alpha: Optional[float] = None,
        train_weight: bool = False,
        sigma: float = 0.1,
        gate_dtype: torch.dtype = torch.float32,
        target_sparsity: Optional[float] = None,
        straight_through: bool = False,
    ):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"GatedLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        self.transposed = is_conv1d(base)
        self.weight = base.weight
        self.bias = base.bias if getattr(base, "bias", None) is not None else None
        if self.transposed:
            self.in_features, self.out_features = self.weight.shape
        else:
            self.out_features, self.in_features = self.weight.shape
        self.weight.requires_grad_(bool(train_weight))
        dev = self.weight.device
        gates = dict(sigma=sigma, dtype=gate_dtype, device=dev, straight_through=straight_through)
        self.row_gates = Gates(self.out_features, **gates)
        self.col_gates = Gates(self.in_features, **gates)
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        self.lora_rank = int(lora_rank)
        if self.lora_rank > 0:
            alpha = float(lora_alpha) if lora_alpha is not None else float(self.lora_rank)
            self.lora_scale = alpha / self.lora_rank
            wd = self.weight.dtype
            self.lora_a = nn.Parameter(torch.empty(self.lora_rank, self.in_features, dtype=wd, device=dev))
            self.lora_b = nn.Parameter(torch.zeros(self.out_features, self.lora_rank, dtype=wd, device=dev))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        else:
            self.lora_scale = 1.0
            self.lora_a = None
            self.lora_b = None
        self.target_sparsity = target_sparsity
        self.backend = "ops"
        self.gates_forced_open = False  # set by gates_open()
        # sparsify(structure="heads_units"): the budget's closure closes this layer's gates by whole
        # heads and MLP units (finegates.compaction.units)
        self.closes_whole_units = False
        # Kurtosis weighting (reference --kurt), enabled by sparsify(kurtosis=True).
        self.kurtosis_tau: Optional[float] = None
        self.kurtosis_state = None  # (row weights, col weights, rows, cols) of the last training forward
        self._gate_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self.sampled_gates: Optional[tuple] = None  # (row, col) set by finegates.gate_batch for one forward

    def register_gate_hook(self, hook: Callable[["GatedLinear", Tensor, Tensor], None]) -> RemovableHandle:
        """``hook(layer, row, col)`` is called in every forward with the gate values it computes
        with (before any cast), e.g. to register a gradient hook on them. Returns a handle whose
        ``remove()`` takes it off."""
        handle = RemovableHandle(self._gate_hooks)
        self._gate_hooks[handle.id] = hook
        return handle

    def dense_module(self) -> nn.Module:
        """The plain layer this one gates (``nn.Linear``, or ``Conv1D``) on the same weight and bias
        Parameters, no copy: the dense model a compact one is timed against."""
        with torch.device("meta"):
            if self.transposed:
                from transformers.pytorch_utils import Conv1D

                plain = Conv1D(self.out_features, self.in_features)
            else:
                plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def dense_weight(self) -> Tensor:
        """The weight as (out, in), a view for Conv1D."""
        return self.weight.t() if self.transposed else self.weight

    def gate_values(self):
        """(row, col) gate values, sampled in this order when training (or sampled for this forward
        by :class:`finegates.gate_batch.GateBatch`); all ones inside :func:`gates_open` (the teacher
        of self-distillation: no gate noise drawn)."""
        if self.gates_forced_open:
            ones = torch.ones((), dtype=self.row_gates.theta.dtype, device=self.row_gates.theta.device)
            return ones.expand(self.out_features), ones.expand(self.in_features)
        if self.sampled_gates is not None and self.training:
            return self.sampled_gates
        return self.row_gates.values(), self.col_gates.values()

    def forward(self, x: Tensor) -> Tensor:
        row, col = self.gate_values()
        for hook in self._gate_hooks.values():
            hook(self, row, col)
        if not (x.dtype == torch.bfloat16 and row.dtype == torch.float32):
            row = row.to(x.dtype)
            col = col.to(x.dtype)
        w = self.dense_weight()
        if self.kurtosis_tau is not None and self.training:
            self._record_kurtosis(x, w)
        op = fg_kernels.gated_linear
        if self.backend == "triton":
            from fg_kernels import triton as fg_triton  # imported lazily: triton is optional

            op = fg_triton.gated_linear
        return op(x, w, self.bias, row, col, self.lora_a, self.lora_b, float(self.lora_scale))

    @torch.no_grad()
    def _record_kurtosis(self, x: Tensor, w: Tensor) -> None:
        """Reference ``--kurt``: activations = mean input (over all tokens) * W, restricted to active
        rows/cols; per-column and per-row sqrt(Pearson kurtosis) -> softmax(-kurt / tau)."""
        x_mean = x.reshape(-1, x.shape[-1]).float().mean(0, keepdim=True)
        rows = self.row_gates.active()
        cols = self.col_gates.active()
        act = (x_mean * w.float())[rows][:, cols]

        def kurt(m: Tensor) -> Tensor:  # over dim 0, unbiased std as in the reference
            z = (m - m.mean(0, keepdim=True)) / m.std(0, keepdim=True)
            z = torch.where(torch.isnan(z), torch.zeros_like(z), z)
            return z.pow(4).mean(0).sqrt()

        tau = float(self.kurtosis_tau)
        col_w = torch.softmax(-kurt(act) / tau, dim=0)
        row_w = torch.softmax(-kurt(act.t()) / tau, dim=0)
        self.kurtosis_state = (row_w, col_w, rows, cols)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.transposed:
            s += ", conv1d=True"
        if self.lora_rank:
            s += f", lora_rank={self.lora_rank}, lora_scale={self.lora_scale:g}"
        if self.target_sparsity is not None:
            s += f", target_sparsity={self.target_sparsity:g}"
        return s


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Selects how every ``GatedLinear`` in ``model`` computes: ``"ops"`` (default) or ``"triton"``."""
    if backend not in LAYER_BACKENDS:
        raise ValueError(f"backend must be one of {LAYER_BACKENDS}, got {backend!r}")
    for m in model.modules():
        if isinstance(m, GatedLinear):
            m.backend = backend
    return model
