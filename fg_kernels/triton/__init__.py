"""Triton kernels of the ``fg`` ops (the CUDA implementation), callable on tensors of any device:
CUDA tensors run compiled kernels, CPU tensors (or any tensors with ``TRITON_INTERPRET=1``) run the
Triton interpreter, which is how CI checks them without a GPU. The interpreter needs
``TRITON_INTERPRET=1`` in the environment before ``triton`` is first imported (triton decorates its
own ``tl.*`` helpers then); a process that imported triton without it can only run CUDA tensors,
and vice versa (a clear RuntimeError says so).

- ``gated_linear_forward`` / ``gated_linear_backward`` / ``gathered_linear_forward``: the kernels,
  exactly the schemas of ``fg::gated_linear``, ``fg::gated_linear_backward`` and
  ``fg::gathered_linear``; ``fg_kernels.cuda_registration`` registers them for ``fg``'s CUDA key.
- ``gated_linear(...)`` / ``gathered_linear(...)``: the ops ``torch.ops.fg_triton.*``, which run
  these kernels on the CPU (interpreter) and CUDA keys behind the same fake kernels and the same
  autograd as ``torch.ops.fg.*`` (``fg_kernels.registration``): differentiable, ``opcheck``-able.

Sparsity patterns are runtime data (device-side index lists and counts): a new gate pattern never
compiles or autotunes anything. Autotuning keys are full sizes, a power-of-two bucket of the token
count, the route and flags; each key is tuned once, on a 60%-active pattern. Set
``FG_TRITON_AUTOTUNE=0`` to use fixed block configurations instead. Kernel design and register /
spill report: ``kernels.py`` and ``python -m fg_kernels.triton._compile_check --help``.
"""

try:
    import triton as _triton  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fg_kernels.triton needs the `triton` package (`pip install triton`, or the "
        "`fg-kernels[triton]` extra)"
    ) from err

import torch

from .._library import library_loaded, require_library
from ..registration import define_namespace
from ._launch import kernel_module
from .gated_linear import gated_linear_backward, gated_linear_forward
from .gathered_linear import gathered_linear_forward

__all__ = [
    "NAMESPACE",
    "OP_KERNELS",
    "gated_linear",
    "gated_linear_forward",
    "gated_linear_backward",
    "gathered_linear",
    "gathered_linear_forward",
    "kernel_module",
]

NAMESPACE = "fg_triton"
# The kernel of each fg op (by op name), as registered for fg's CUDA key and fg_triton's keys.
OP_KERNELS = {
    "gated_linear": gated_linear_forward,
    "gated_linear_backward": gated_linear_backward,
    "gathered_linear": gathered_linear_forward,
}

# The schemas come from the compiled fg library: without it, the ops below raise its rebuild hint.
_LIBRARY = define_namespace(NAMESPACE, OP_KERNELS, ("CPU", "CUDA")) if library_loaded() else None


def _registered_op(name: str, summary: str):
    """``fg_kernels.triton.<name>``: calls ``torch.ops.fg_triton.<name>`` (schema and arguments of
    ``torch.ops.fg.<name>``), or raises the compiled library's rebuild hint."""

    def op(*args, **kwargs):
        require_library()
        return getattr(torch.ops.fg_triton, name)(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = summary
    return op


gated_linear = _registered_op(
    "gated_linear", "``fg::gated_linear`` through the Triton kernels on any device (CUDA: compiled; CPU: "
    "interpreted), with the same autograd as ``torch.ops.fg.gated_linear``.")
gathered_linear = _registered_op(
    "gathered_linear", "``fg::gathered_linear`` through the Triton kernels on any device, with the same autograd.")
