"""Triton kernels of the ``fg`` ops (the CUDA implementation), callable directly on tensors of any
device: CUDA tensors run compiled kernels, CPU tensors (or any tensors with ``TRITON_INTERPRET=1``)
run the Triton interpreter, which is how CI checks them without a GPU. The interpreter needs
``TRITON_INTERPRET=1`` in the environment before ``triton`` is first imported (triton decorates its
own ``tl.*`` helpers then); a process that imported triton without it can only run CUDA tensors,
and vice versa (a clear RuntimeError says so).

- ``gated_linear(x, weight, bias, row_gate, col_gate, lora_a=None, lora_b=None, lora_scale=1.0)``:
  differentiable (its backward runs the Triton backward kernels).
- ``gathered_linear(x, weight_c, bias_c, row_idx, col_idx, out_features)``.
- ``gated_linear_forward`` / ``gated_linear_backward`` / ``gathered_linear_forward``: exactly the
  schemas of ``fg::gated_linear``, ``fg::gated_linear_backward`` and ``fg::gathered_linear`` (no
  autograd), registered for the CUDA dispatch key by ``fg_kernels.cuda_registration``.

Sparsity patterns are runtime data (device-side index lists and counts): a new gate pattern never
compiles or autotunes anything. Set ``FG_TRITON_AUTOTUNE=0`` to use fixed block configurations
instead of autotuning (keys: full sizes, a power-of-two bucket of the token count, flags).
"""

try:
    import triton as _triton  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fg_kernels.triton needs the `triton` package (`pip install triton`, or the "
        "`fg-kernels[triton]` extra)"
    ) from err

from ._launch import kernels
from .gated_linear import gated_linear, gated_linear_backward, gated_linear_forward
from .gathered_linear import gathered_linear, gathered_linear_forward

__all__ = [
    "gated_linear",
    "gated_linear_forward",
    "gated_linear_backward",
    "gathered_linear",
    "gathered_linear_forward",
    "kernels",
]
