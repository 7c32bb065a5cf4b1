"""Argument checks of the Triton entry points, mirroring csrc/checks.h: every failure names the
argument and raises the matching Python exception (TypeError for dtypes, ValueError for shapes,
values and devices, IndexError for indices)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def check_float(t: Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {t.dtype}")


def check_same_dtype(t: Tensor, x: Tensor, name: str) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")


def check_same_device(t: Tensor, x: Tensor, name: str) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


def check_vector(t: Tensor, n: int, name: str, what: str) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length {n} ({what}), got shape {tuple(t.shape)}")


def check_gate(g: Tensor, x: Tensor, n: int, name: str, what: str) -> None:
    check_same_device(g, x, name)
    if g.dtype != x.dtype and g.dtype != torch.float32:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}) or float32, got {g.dtype}")
    check_vector(g, n, name, what)


def check_gated_linear_args(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    row_gate: Tensor,
    col_gate: Tensor,
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
) -> None:
    check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    check_same_dtype(weight, x, "weight")
    check_same_device(weight, x, "weight")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"x must have last dimension in_features = weight.shape[1] = {K}, got shape {tuple(x.shape)}"
        )
    if bias is not None:
        check_same_dtype(bias, x, "bias")
        check_same_device(bias, x, "bias")
        check_vector(bias, N, "bias", "out_features = weight.shape[0]")
    check_gate(row_gate, x, N, "row_gate", "out_features = weight.shape[0]")
    check_gate(col_gate, x, K, "col_gate", "in_features = weight.shape[1]")
    if (lora_a is None) != (lora_b is None):
        raise ValueError(
            "lora_a and lora_b must be given together (got only "
            + ("lora_a" if lora_a is not None else "lora_b") + ")"
        )
    if lora_a is not None:
        check_same_dtype(lora_a, x, "lora_a")
        check_same_dtype(lora_b, x, "lora_b")
        check_same_device(lora_a, x, "lora_a")
        check_same_device(lora_b, x, "lora_b")
        if lora_a.dim() != 2 or lora_a.shape[1] != K:
            raise ValueError(f"lora_a must be 2-D (rank, in_features={K}), got shape {tuple(lora_a.shape)}")
        r = lora_a.shape[0]
        if lora_b.dim() != 2 or lora_b.shape[0] != N or lora_b.shape[1] != r:
            raise ValueError(
                f"lora_b must be 2-D (out_features={N}, rank={r}), got shape {tuple(lora_b.shape)}"
            )


def check_index(idx: Tensor, bound: int, name: str, what: str, x: Tensor) -> None:
    """1-D int32/int64 on x's device with every value in [0, bound) (one host sync to check)."""
    check_same_device(idx, x, name)
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 index tensor, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() > 0:
        lo, hi = (int(v) for v in torch.stack([idx.min(), idx.max()]).tolist())
        if lo < 0 or hi >= bound:
            raise IndexError(f"{name} values must lie in [0, {bound}) ({what}), got range [{lo}, {hi}]")
