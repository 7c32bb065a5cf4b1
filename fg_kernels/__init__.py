"""fg_kernels: the kernels of FineGates as PyTorch custom ops (``torch.ops.fg.*``).

- ``gated_linear``: the training op, ``row_gate * ((x * col_gate) @ W.T + b)`` computing only active
  rows and columns, with autograd (C++/OpenMP on CPU, Triton on CUDA).
- ``gathered_linear``: inference on a compacted layer (gathered input, compact weight, scattered or
  compact output).
- ``cpu_weight_cache_bytes`` / ``clear_cpu_weight_cache`` / ``frozen_weights``: the CPU kernels'
  cache of gate-folded weight blocks (frozen weights only; reused between calls inside
  ``frozen_weights()``).
- ``reference``: the pure-PyTorch spec of every op, used by the tests.
- ``triton``: the Triton kernels (the CUDA implementation, registered for the CUDA key by
  ``cuda_registration``), also callable on CPU tensors under ``TRITON_INTERPRET=1``.

Importing this package never fails for a missing GPU, compiler or Triton; a missing compiled
library is reported loudly (see ``_library``).
"""

from . import reference
from ._library import library_loaded
from .ops import clear_cpu_weight_cache, cpu_weight_cache_bytes, frozen_weights, gated_linear, gathered_linear
from . import cuda_registration as _cuda_registration  # noqa: F401,E402  (Triton kernels for the CUDA key; no-op without CUDA)

__all__ = ["gated_linear", "gathered_linear", "cpu_weight_cache_bytes", "clear_cpu_weight_cache", "frozen_weights",
           "reference",
           "library_loaded"]
__version__ = "0.1.0"
