"""Registers the Triton kernels (``fg_kernels.triton``) for the CUDA dispatch key of the ``fg`` ops.

The schemas, the CPU kernels (C++), the fake kernels and the autograd formulas are registered
elsewhere (``fg_kernels._C`` and ``fg_kernels.ops``) and are device-agnostic: autograd calls
``torch.ops.fg.gated_linear_backward``, which on CUDA tensors lands on the Triton backward
registered here. So ``torch.ops.fg.*`` on CUDA tensors, their gradients, ``torch.compile`` and
``torch.library.opcheck`` work as on the CPU.

``register()`` runs when ``fg_kernels`` is imported and is a silent no-op (returning False) when
the compiled library, Triton or a CUDA device is missing; it never imports triton on a machine
without CUDA (so a CPU-only process can still choose TRITON_INTERPRET=1 before importing it).
"""

from __future__ import annotations

import importlib.util
import threading
import warnings

import torch

from ._library import library_loaded

__all__ = ["register", "registered", "OPS"]

OPS = ("fg::gated_linear", "fg::gated_linear_backward", "fg::gathered_linear")

_lock = threading.Lock()
_registered = False


def registered() -> bool:
    """True once the Triton kernels serve the CUDA key of the fg ops in this process."""
    return _registered


def _cuda_present() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - broken driver installs
        return False


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] is None
        return False


def register(force: bool = False) -> bool:
    """Registers the CUDA kernels once. ``force=True`` registers even without a visible CUDA
    device (for tests of the registration itself); Triton and the compiled library are still
    required. Returns whether the kernels are registered."""
    global _registered
    with _lock:
        if _registered:
            return True
        if not library_loaded():
            return False
        if not force and not _cuda_present():
            return False
        if not _triton_installed():
            # A GPU without Triton is a broken install, not a CPU-only one: say so loudly.
            if _cuda_present():
                warnings.warn(
                    "fg_kernels: CUDA is available but the `triton` package is not installed, so "
                    "torch.ops.fg.* have no CUDA kernels; `pip install triton` (or the fg-kernels[triton] extra).",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False
        try:
            from . import triton as fg_triton
        except ImportError as err:
            warnings.warn(
                f"fg_kernels: the Triton kernels failed to import ({err}); torch.ops.fg.* on CUDA "
                "tensors will fail until this is fixed.",
                RuntimeWarning,
                stacklevel=3,
            )
            return False

        def gated_linear_cuda(x, weight, bias, row_gate, col_gate, lora_a=None, lora_b=None, lora_scale=1.0):
            return fg_triton.gated_linear_forward(x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale)

        def gated_linear_backward_cuda(grad_out, x, weight, row_gate, col_gate, lora_a, lora_b, lora_scale,
                                       output, output_mask):
            return fg_triton.gated_linear_backward(grad_out, x, weight, row_gate, col_gate, lora_a, lora_b,
                                                   lora_scale, output, output_mask)

        def gathered_linear_cuda(x, weight_c, bias_c, row_idx, col_idx, out_features):
            return fg_triton.gathered_linear_forward(x, weight_c, bias_c, row_idx, col_idx, out_features)

        torch.library.register_kernel("fg::gated_linear", "cuda", gated_linear_cuda)
        torch.library.register_kernel("fg::gated_linear_backward", "cuda", gated_linear_backward_cuda)
        torch.library.register_kernel("fg::gathered_linear", "cuda", gathered_linear_cuda)
        _registered = True
        return True


try:
    register()
except Exception as err:  # pragma: no cover - never let a GPU-side problem break the import
    warnings.warn(
        f"fg_kernels: the Triton CUDA kernels could not be registered ({err!r}); torch.ops.fg.* on CUDA "
        "tensors will fail until this is fixed.",
        RuntimeWarning,
        stacklevel=2,
    )
