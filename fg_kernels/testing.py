"""What the tests and the benchmarks share to judge the ops: the error metric, the tolerance rule
per dtype and random gates. (Like ``torch.testing``: importable, but not part of the ops.)

Accuracy rule (``assert_matches``):

* The truth is the pure-PyTorch reference (``fg_kernels.reference``) evaluated in float64 on
  exactly the inputs the op saw (low-precision inputs are upcast, so rounding of the inputs is not
  counted as error).
* float64: ``rel_err <= 1e-12``; float32: ``rel_err <= 1e-5``. Measured headroom for float32: the
  reference itself computed in float32 lands at 1e-7..3e-7 of float64 for every output and
  gradient at the sizes tested (up to 129 features, ~500 tokens), so 1e-5 is ~30x above honest
  rounding and far below any indexing or gating bug (errors of order 1).
* bfloat16 and float16 (the flash-attention rule): at most ``2x`` the error of the reference
  computed *in that dtype* on the same inputs, plus a floor of one unit roundoff (the op may round
  its float32 accumulator once more than the reference where the low-precision reference happens
  to be exact), and never more than a sanity cap of 1e-2 (forward) / 3e-2 (gradients, whose
  reductions over tokens round more often).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["LOW_PRECISION", "abs_err", "rel_err", "assert_matches", "make_gate"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Relative-error bound of the float32 / float64 rule, for outputs and gradients alike.
_HIGH_PRECISION_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Where the true result nearly cancels, an absolute error within this fraction of the magnitude
# (the same quantity on |inputs|) also passes: ~sqrt(K) ulps of float32 for K <= 129.
_CANCEL_FLOOR = {torch.float32: 1e-6, torch.float64: 1e-14}
_LOWP_CAP = {False: 1e-2, True: 3e-2}  # forward, gradient


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1.0 to the next value: 2**-8 for bfloat16, 2**-11 for float16."""
    return torch.finfo(dtype).eps / 2


def _norm64(t: Tensor) -> float:
    return t.detach().to(device="cpu", dtype=torch.float64).norm().item()


def abs_err(a: Tensor, b: Tensor) -> float:
    """``||a - b||`` in float64 on the CPU (Frobenius norm)."""
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    return _norm64(a.detach().to(device="cpu", dtype=torch.float64) - b.detach().to(device="cpu", dtype=torch.float64))


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / max(||b||, tiny)`` in float64 on the CPU (Frobenius norms)."""
    return abs_err(a, b) / max(_norm64(b), torch.finfo(torch.float64).tiny)


def assert_matches(
    out: Tensor,
    truth: Tensor,
    *,
    lowp_ref: Optional[Tensor] = None,
    grad: bool = False,
    what: str = "output",
    compute_dtype: Optional[torch.dtype] = None,
    scale: Optional[Tensor] = None,
) -> None:
    """Assert ``out`` (the op's result) matches ``truth`` (the float64 reference).

    ``lowp_ref``: for bfloat16/float16, the reference computed in that dtype on the same inputs.
    ``compute_dtype`` (default ``out.dtype``) picks the rule: a float32 gradient of a float32
    gate used in a bfloat16 computation is held to the bfloat16 rule. ``scale``: the same
    quantity computed on absolute values; where the truth nearly cancels, an absolute error
    within rounding of it passes too (indexing bugs give errors of the order of ``scale``).
    """
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(out).any(), f"{what}: op produced NaN"
    assert not torch.isinf(out).any() or torch.isinf(truth).any(), f"{what}: op produced inf"
    dtype = out.dtype if compute_dtype is None else compute_dtype
    if scale is not None:
        floor = _CANCEL_FLOOR.get(dtype, _unit_roundoff(dtype))
        if abs_err(out, truth) <= floor * _norm64(scale):
            return
    err = rel_err(out, truth)
    if dtype in _HIGH_PRECISION_TOL:
        tol = _HIGH_PRECISION_TOL[dtype]
        assert err <= tol, f"{what}: {dtype} rel err {err:.3e} > {tol:.1e}"
        return
    assert dtype in LOW_PRECISION, f"{what}: no tolerance rule for {dtype}"
    assert lowp_ref is not None, f"{what}: a {dtype} comparison needs the {dtype} reference"
    base = rel_err(lowp_ref, truth)
    floor = _unit_roundoff(dtype)
    tol = min(2.0 * base + floor, _LOWP_CAP[grad])
    assert err <= tol, (
        f"{what}: {dtype} rel err {err:.3e} > {tol:.3e} "
        f"(reference in {dtype}: {base:.3e}, floor {floor:.1e}, cap {_LOWP_CAP[grad]:.0e})"
    )


def make_gate(
    n: int,
    *,
    gen: torch.Generator,
    sparsity: float = 0.0,
    kind: str = "fractional",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A gate of length ``n``: each entry exactly 0 with probability ``sparsity`` (0 and 1 give no
    zero / all zeros). ``kind``: "fractional" (active values uniform in (0.05, 1]), "binary"
    (active values 1) or "ones" (all 1, ignores sparsity). Drawn on the CPU from ``gen``, so the
    same seed gives the same gate on every device."""
    if kind == "ones":
        return torch.ones(n, dtype=dtype, device=device)
    if kind == "binary":
        vals = torch.ones(n)
    elif kind == "fractional":
        vals = 0.05 + 0.95 * torch.rand(n, generator=gen)
    else:
        raise ValueError(f"kind must be 'fractional', 'binary' or 'ones', got {kind!r}")
    if sparsity >= 1.0:
        keep = torch.zeros(n, dtype=torch.bool)
    elif sparsity <= 0.0:
        keep = torch.ones(n, dtype=torch.bool)
    else:
        keep = torch.rand(n, generator=gen) >= sparsity
    g = (vals * keep).to(dtype)
    # Rounding to a low-precision dtype must not create or remove zeros.
    assert torch.equal(g != 0, keep)
    return g.to(device)
