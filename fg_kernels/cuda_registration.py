"""Registers the Triton kernels (``fg_kernels.triton.OP_KERNELS``) for the CUDA dispatch key of the
``fg`` ops.

The schemas, the CPU kernels (C++), the fake kernels and the autograd are registered elsewhere
(``fg_kernels._C`` and ``fg_kernels.registration``) and are device-agnostic: autograd calls
``torch.ops.fg.gated_linear_backward``, which on CUDA tensors lands on the Triton backward
registered here. So ``torch.ops.fg.*`` on CUDA tensors, their gradients, ``torch.compile`` and
``torch.library.opcheck`` work as on the CPU.

``register()`` runs when ``fg_kernels`` is imported and is a silent no-op (returning False) when
the compiled library or a CUDA device is missing; it never imports triton on a machine without
CUDA (so a CPU-only process can still choose TRITON_INTERPRET=1 before importing it).
"""

from __future__ import annotations

import importlib.util
import threading
import warnings

import torch

from ._library import library_loaded

__all__ = ["register", "registered"]

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


def _warn(message: str) -> None:
    warnings.warn(f"fg_kernels: {message}; torch.ops.fg.* on CUDA tensors will fail until this is fixed.",
                  RuntimeWarning, stacklevel=4)


def register(force: bool = False) -> bool:
    """Registers the CUDA kernels once. ``force=True`` registers even without a visible CUDA
    device (for tests of the registration itself); Triton and the compiled library are still
    required. Returns whether the kernels are registered."""
    global _registered
    with _lock:
        if _registered:
            return True
        if not library_loaded() or (not force and not _cuda_present()):
            return False
        if not _triton_installed():
            # A GPU without Triton is a broken install, not a CPU-only one: say so loudly.
            if _cuda_present():
                _warn("CUDA is available but the `triton` package is not installed (`pip install triton`, "
                      "or the fg-kernels[triton] extra)")
            return False
        try:
            from .triton import OP_KERNELS
        except ImportError as err:
            _warn(f"the Triton kernels failed to import ({err})")
            return False
        for op, kernel in OP_KERNELS.items():
            torch.library.register_kernel(f"fg::{op}", "cuda", kernel)
        _registered = True
        return True


try:
    register()
except Exception as err:  # pragma: no cover - never let a GPU-side problem break the import
    _warn(f"the Triton CUDA kernels could not be registered ({err!r})")
