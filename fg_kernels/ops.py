"""The `fg` ops: a docstring'd functional wrapper per op.

Schemas and the CPU kernels are defined in C++ (csrc/); importing this module gives the `fg`
namespace what every backend shares (``registration``): fake kernels that state the contract, so
that torch.compile and torch.library.opcheck trace the ops and refuse bad input at trace time, and
the one autograd formula, whose backward is itself an op (``fg::gated_linear_backward``) that
skips removed rows and columns as the forward does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._library import library_loaded, require_library
from .registration import register_fake_and_autograd

__all__ = ["gated_linear", "gathered_linear", "cpu_weight_cache_bytes", "clear_cpu_weight_cache", "frozen_weights"]


def gated_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    row_gate: Tensor,
    col_gate: Tensor,
    lora_a: Optional[Tensor] = None,
    lora_b: Optional[Tensor] = None,
    lora_scale: float = 1.0,
) -> Tensor:
    """FineGates linear layer: ``row_gate * ((x * col_gate) @ (weight + s * lora_b @ lora_a).T + bias)``.

    Only active rows ``R = {row_gate != 0}`` and active columns ``C = {col_gate != 0}`` are
    computed; the other outputs are exactly 0, and a zero gate receives and passes on no gradient
    (it is a removed row or column). With every gate non-zero this costs what ``F.linear`` costs.

    Args:
        x: ``(..., K)`` float32, float16, bfloat16 or float64 (the same on every device; float64 is
            for gradcheck, not speed).
        weight: ``(N, K)``, x's dtype; any strides (a transposed GPT-2 ``Conv1D`` weight works).
        bias: ``(N,)`` or None.
        row_gate, col_gate: ``(N,)`` and ``(K,)``, x's dtype or float32 (a float32 gate under a
            bfloat16 layer keeps its precision).
        lora_a, lora_b: optional LoRA factors ``(r, K)`` and ``(N, r)``, applied inside the gates.
        lora_scale: LoRA scaling ``s`` (alpha / r).
    Returns:
        ``(..., N)`` in x's dtype.
    """
    require_library()
    return torch.ops.fg.gated_linear(x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale)


def gathered_linear(
    x: Tensor,
    weight_c: Tensor,
    bias_c: Optional[Tensor],
    row_idx: Optional[Tensor],
    col_idx: Optional[Tensor],
    out_features: int,
) -> Tensor:
    """Inference on a compacted layer: ``y[..., row_idx] = x[..., col_idx] @ weight_c.T + bias_c``.

    Other outputs are 0. ``col_idx=None`` means x is already compact (``x.shape[-1] ==
    weight_c.shape[1]``); ``row_idx=None`` keeps the output compact, ``weight_c.shape[0]`` wide
    (then ``out_features`` must equal that width), for a next layer that consumes it compact.
    Indices are int64 (or int32) and must lie in range; they need not be sorted. ``row_idx`` must
    not repeat a value (two rows written to one output would leave one write and a gradient that
    reaches both); ``col_idx`` may (a column read twice is well defined).
    """
    require_library()
    return torch.ops.fg.gathered_linear(x, weight_c, bias_c, row_idx, col_idx, out_features)


def cpu_weight_cache_bytes() -> int:
    """Bytes held by the CPU kernels' cache of gate-folded weight blocks.

    ``gated_linear`` on CPU keeps, per frozen weight (one that does not require grad), the block
    ``g_r W[R][:, C] g_c`` it last built. A training step's backward reuses its forward's block; a
    forward reuses an earlier call's block only inside :func:`frozen_weights`. A block is reused
    only while the weight's version counter, its storage, the active sets, the gate values and the
    LoRA factors' values (compared as values: fused AdamW updates them without a version bump) are
    unchanged. At most ``FG_CPU_WEIGHT_CACHE_MB`` MiB (default 1024; 0 turns the cache off).
    """
    require_library()
    return int(torch.ops.fg.cpu_weight_cache(False))


class frozen_weights:
    """Lets CPU forwards reuse gate-folded weight blocks between calls (evaluation, inference).

    Entering is a promise that no weight changes inside the scope except through the tensor itself
    (optimizer steps, ``copy_`` under ``no_grad``, ``load_state_dict``: these the cache sees). Writes
    that bypass the version counter (``weight.data.copy_``, ``weight.numpy()[:] = ...``) would not
    be seen inside the scope; outside it they cannot reach a result, since every forward folds its
    block anew. Saves the fold, a pass over the active weight block, per layer and call: about a
    third of the GEMM at 128 tokens. Scopes nest and may be open on several threads at once.
    """

    __slots__ = ()

    def __enter__(self) -> "frozen_weights":
        require_library()
        torch.ops.fg.cpu_weight_reuse.default(1)
        return self

    def __exit__(self, *exc) -> None:
        torch.ops.fg.cpu_weight_reuse.default(-1)


def clear_cpu_weight_cache() -> None:
    """Drops every block of the CPU weight cache (see ``cpu_weight_cache_bytes``)."""
    require_library()
    torch.ops.fg.cpu_weight_cache(True)


if library_loaded():
    register_fake_and_autograd("fg")
