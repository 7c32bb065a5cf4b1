"""One registration of the ``fg`` contract for a namespace: fake (meta) kernels, autograd, autocast.

Every namespace that implements the ``fg`` schemas gets exactly these: ``fg`` itself (schemas and
CPU kernels from C++, the Triton kernels for CUDA) and ``fg_triton`` (the Triton kernels for the
CPU key too, so they run under the Triton interpreter; see ``fg_kernels.triton``). So there is one
backward formula, whatever kernel runs underneath: the autograd of ``<ns>::gated_linear`` calls
``<ns>::gated_linear_backward``, which skips removed rows and columns as the forward does.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch

from . import contract

__all__ = ["OP_NAMES", "register_fake_and_autograd", "define_namespace"]

OP_NAMES = ("gated_linear", "gated_linear_backward", "gathered_linear")


# --------------------------------------------------------------------------------------------
# Fake kernels: the contract's checks (torch._check*), then the output shapes.
# --------------------------------------------------------------------------------------------


def gated_linear_fake(x, weight, bias, row_gate, col_gate, lora_a=None, lora_b=None, lora_scale=1.0):
    contract.check_gated_linear(x, weight, bias, row_gate, col_gate, lora_a, lora_b)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def gated_linear_backward_fake(grad_out, x, weight, row_gate, col_gate, lora_a, lora_b, lora_scale, output,
                               output_mask):
    contract.check_gated_linear_backward(grad_out, x, weight, row_gate, col_gate, lora_a, lora_b, output,
                                         output_mask)
    return contract.backward_outputs(grad_out, weight, row_gate, col_gate, lora_a, output_mask)


def gathered_linear_fake(x, weight_c, bias_c, row_idx, col_idx, out_features):
    contract.check_gathered_linear(x, weight_c, bias_c, row_idx, col_idx, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


def _gated_setup_context(ctx, inputs, output):
    x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale = inputs
    plan = contract.backward_plan(ctx.needs_input_grad, bias is not None, lora_a is not None)
    # Only what the requested gradients read. Like torch.exp, the op saves its output (for the
    # row-gate gradient): modifying y in place before backward raises autograd's "modified by an
    # inplace operation" error, never a wrong gradient.
    ctx.save_for_backward(
        x if plan.needs_x else None, weight, row_gate, col_gate, lora_a, lora_b,
        output if plan.needs_output else None,
    )
    ctx.mask = plan.mask
    ctx.lora_scale = lora_scale


def _gated_backward_for(backward_op) -> Callable:
    def gated_backward(ctx, grad):
        x, weight, row_gate, col_gate, lora_a, lora_b, output = ctx.saved_tensors
        grads = backward_op(grad, x, weight, row_gate, col_gate, lora_a, lora_b, ctx.lora_scale, output, ctx.mask)
        grads = [g if m else None for g, m in zip(grads, ctx.mask)]
        if torch.is_grad_enabled():  # create_graph=True
            grads = _refuse_double_backward(grads, (grad, *ctx.saved_tensors))
        return (*grads, None)

    return gated_backward


class _OnceDifferentiable(torch.autograd.Function):
    """Identity on the gradients, whose own backward raises ``contract.DOUBLE_BACKWARD_ERROR``; the
    backward's inputs ride along so that a second backward reaches this node (and not 0)."""

    @staticmethod
    def forward(ctx, n_grads, *tensors):
        return tuple(t.view_as(t) for t in tensors[:n_grads])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(contract.DOUBLE_BACKWARD_ERROR)


def _refuse_double_backward(grads, sources):
    """Under create_graph, the gradients stay in the graph through a node that refuses a second
    backward (else they would leave it silently and a second derivative would read 0)."""
    sources = [t for t in sources if t is not None and t.requires_grad]
    present = [i for i, g in enumerate(grads) if g is not None]
    if not sources or not present:
        return grads
    wrapped = _OnceDifferentiable.apply(len(present), *(grads[i] for i in present), *sources)
    for i, g in zip(present, wrapped):
        grads[i] = g
    return grads


def _gathered_setup_context(ctx, inputs, output):
    x, weight_c, bias_c, row_idx, col_idx, out_features = inputs
    g = ctx.needs_input_grad
    ctx.save_for_backward(x if g[1] else None, weight_c if g[0] else None, row_idx, col_idx)
    ctx.x_shape = x.shape
    ctx.has_bias = bias_c is not None


def _gathered_backward(ctx, grad):
    """An inference op: a plain torch-ops backward (gather, two GEMMs, scatter) is enough."""
    x, weight_c, row_idx, col_idx = ctx.saved_tensors
    g = ctx.needs_input_grad
    tokens = contract.token_count(grad)
    grad_c = grad if row_idx is None else grad.index_select(-1, row_idx)
    grad_c2 = grad_c.reshape(tokens, grad_c.shape[-1])
    dx = dw = db = None
    if g[0]:
        dxc = grad_c @ weight_c
        dx = dxc if col_idx is None else dxc.new_zeros(ctx.x_shape).index_add_(-1, col_idx, dxc)
    if g[1]:
        xc = x if col_idx is None else x.index_select(-1, col_idx)
        dw = grad_c2.t() @ xc.reshape(tokens, xc.shape[-1])
    if g[2] and ctx.has_bias:
        db = grad_c2.sum(0)
    return dx, dw, db, None, None, None


# --------------------------------------------------------------------------------------------
# Autocast: x, the weights, bias and LoRA run in the autocast dtype; gates stay as they are (the
# contract lets a float32 gate serve a lower-precision layer, and keeps its gradient float32).
# --------------------------------------------------------------------------------------------

_CAST_ARGS = {"gated_linear": (0, 1, 2, 5, 6), "gathered_linear": (0, 1, 2)}
_AUTOCAST_DEVICES = ("cpu", "cuda")
_AUTOCAST_LIBS = []  # keeps the IMPL libraries (and so the registrations) alive


def _autocast_kernel(op, device_type: str, cast: Iterable[int]) -> Callable:
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    cast = frozenset(cast)

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        args = [
            a.to(dtype) if i in cast and isinstance(a, torch.Tensor) and a.is_floating_point()
            and a.device.type == device_type else a
            for i, a in enumerate(args)
        ]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args)

    return kernel


def _register_autocast(ns: str, lib: torch.library.Library) -> None:
    ops = getattr(torch.ops, ns)
    for name, cast in _CAST_ARGS.items():
        for device_type in _AUTOCAST_DEVICES:
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            lib.impl(name, _autocast_kernel(getattr(ops, name).default, device_type, cast), key, with_keyset=True)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register_fake_and_autograd(ns: str, lib: Optional[torch.library.Library] = None) -> None:
    """Fake kernels and autograd for ``<ns>::gated_linear``, ``gated_linear_backward`` and
    ``gathered_linear`` (whose schemas must already be defined), and their autocast rule."""
    ops = getattr(torch.ops, ns)
    torch.library.register_fake(f"{ns}::gated_linear", gated_linear_fake, lib=lib)
    torch.library.register_fake(f"{ns}::gated_linear_backward", gated_linear_backward_fake, lib=lib)
    torch.library.register_fake(f"{ns}::gathered_linear", gathered_linear_fake, lib=lib)
    # fg's compiled library registers this glue in C++ (csrc/autograd.cpp: the Python version costs
    # ~65 us per call); a namespace defined from Python (fg_triton) gets the same plan here.
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::gated_linear", "Autograd"):
        torch.library.register_autograd(
            f"{ns}::gated_linear", _gated_backward_for(ops.gated_linear_backward.default),
            setup_context=_gated_setup_context, lib=lib,
        )
    torch.library.register_autograd(
        f"{ns}::gathered_linear", _gathered_backward, setup_context=_gathered_setup_context, lib=lib
    )
    if lib is None:
        lib = torch.library.Library(ns, "IMPL")
        _AUTOCAST_LIBS.append(lib)
    _register_autocast(ns, lib)


def fg_schema(op: str) -> str:
    """The schema of ``fg::<op>`` without its namespace (defined once, in csrc/fg_ops.cpp)."""
    return str(getattr(torch.ops.fg, op).default._schema).split("::", 1)[1]


def define_namespace(ns: str, kernels: Dict[str, Callable], dispatch_keys: Iterable[str]) -> torch.library.Library:
    """A namespace with the ``fg`` schemas whose kernels are ``kernels`` (one per op name) for each
    dispatch key, with the same fake kernels and autograd as ``fg``. Keep the returned Library
    alive: dropping it unregisters the namespace."""
    lib = torch.library.Library(ns, "DEF")
    for op in OP_NAMES:
        lib.define(fg_schema(op))
        for key in dispatch_keys:
            lib.impl(op, kernels[op], key)
    register_fake_and_autograd(ns, lib)
    return lib
