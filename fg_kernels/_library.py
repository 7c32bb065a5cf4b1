"""Loads the compiled operator library (fg_kernels._C) that defines the `fg` op schemas.

Importing fg_kernels must never crash, on a machine without a GPU, a compiler or Triton. When the
compiled library is missing, the import warns once and every op call raises an error that names
the fix, instead of a bare AttributeError from torch.ops.
"""

from __future__ import annotations

import warnings

REBUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the fg_kernels source tree "
    "(after `pip install torch`)"
)

try:
    from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY initialisers)

    LOAD_ERROR: Exception | None = None
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    LOAD_ERROR = err
    warnings.warn(
        f"fg_kernels: the compiled library fg_kernels._C could not be loaded ({err}); "
        f"torch.ops.fg.* are unavailable until you {REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def library_loaded() -> bool:
    """True when the `fg` schemas and CPU kernels are registered."""
    return LOAD_ERROR is None


def require_library() -> None:
    """Raises a RuntimeError naming the fix when the compiled library is missing."""
    if LOAD_ERROR is not None:
        raise RuntimeError(
            f"fg_kernels: the compiled library fg_kernels._C is not available ({LOAD_ERROR}); "
            f"{REBUILD_HINT}."
        )

