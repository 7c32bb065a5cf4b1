"""Host side of the Triton kernels: which kernel instance runs (compiled or interpreted), the gate
metadata, block configurations and the launch wrappers. Nothing here synchronises with the
device: counts and orders stay on the device and are read by the kernels.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional

import torch
import triton
from torch import Tensor

_KERNEL_FILE = Path(__file__).with_name("kernels.py")
_MODULES: Dict[bool, ModuleType] = {}
_LOCK = threading.RLock()
_MISSING = object()


@contextlib.contextmanager
def _interpret_mode(on: bool):
    """Makes triton see TRITON_INTERPRET=1 (on) or unset it (off) while the block runs."""
    rt = triton.knobs.runtime
    saved_knob = rt.__dict__.get("interpret", _MISSING)
    saved_env = os.environ.get("TRITON_INTERPRET")
    rt.__dict__.pop("interpret", None)
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        if saved_knob is not _MISSING:
            rt.__dict__["interpret"] = saved_knob


def kernels(interpret: bool) -> ModuleType:
    """The kernel module, compiled (``interpret=False``) or interpreted, loaded once each."""
    interpret = bool(interpret)
    with _LOCK:
        mod = _MODULES.get(interpret)
        if mod is None:
            name = "fg_kernels.triton._kernels_" + ("interp" if interpret else "jit")
            spec = importlib.util.spec_from_file_location(name, _KERNEL_FILE)
            mod = importlib.util.module_from_spec(spec)
            with _interpret_mode(interpret):
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
            assert mod.INTERPRET == interpret
            _MODULES[interpret] = mod
        return mod


def interpreter_requested() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _stdlib_is_interpreted() -> bool:
    """triton.language's own jit functions (tl.zeros, tl.sum, ...) are decorated once, when triton
    is first imported: interpreted if TRITON_INTERPRET=1 was set then, compiled otherwise."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def interpreter_usable() -> bool:
    """True when this process can run Triton kernels in the interpreter (TRITON_INTERPRET=1 was
    set before triton was first imported)."""
    return _stdlib_is_interpreted()


def use_interpreter(device: torch.device) -> bool:
    """CUDA tensors run compiled kernels unless TRITON_INTERPRET=1; any other device (the CPU in
    CI) runs the interpreter."""
    return device.type != "cuda" or interpreter_requested()


@contextlib.contextmanager
def launch_context(device: torch.device):
    """Device guard (compiled) or interpreter mode (interpreted) around kernel launches."""
    if use_interpreter(device):
        if not _stdlib_is_interpreted():
            raise RuntimeError(
                f"fg_kernels.triton: tensors on {device} run in the Triton interpreter, which needs "
                "TRITON_INTERPRET=1 in the environment before triton is first imported (this process "
                "imported triton without it); use CUDA tensors, or set TRITON_INTERPRET=1 at start-up"
            )
        with _interpret_mode(True):
            yield kernels(True)
    else:
        if _stdlib_is_interpreted():
            raise RuntimeError(
                "fg_kernels.triton: triton was imported with TRITON_INTERPRET=1, so this process can "
                "only run the interpreter; unset TRITON_INTERPRET to run compiled kernels on CUDA"
            )
        with torch.cuda.device(device):
            yield kernels(False)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots use TF32 exactly when torch's own float32 matmuls may (allow_tf32 /
    set_float32_matmul_precision); otherwise full IEEE float32."""
    if dtype != torch.float32:
        return "ieee"
    try:
        tf32 = torch.backends.cuda.matmul.allow_tf32
    except Exception:  # pragma: no cover - API drift
        tf32 = False
    tf32 = tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def needs_int64(*tensors: Optional[Tensor]) -> bool:
    """Whether element offsets into any of the tensors (with a tile of slack past each edge) can
    reach 2**31, so that the kernels must compute offsets in int64."""
    for t in tensors:
        if t is None:
            continue
        span = sum((s + 256) * abs(st) for s, st in zip(t.shape, t.stride()))
        if span >= 2**31:
            return True
    return False


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation (and gate value) dtype for operands of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bucket(m: int) -> int:
    return triton.next_power_of_2(max(int(m), 1))


# --------------------------------------------------------------------------------------------
# Gate metadata
# --------------------------------------------------------------------------------------------


@dataclass
class GateMeta:
    """A gate (or keep-mask) compacted on the device: ``order`` (int32, active entries first,
    ascending, then the inactive ones), ``vals`` (gate values in that order, 0 for inactive;
    float32, or float64 in a float64 computation), ``cnt`` (int32 tensor of shape (1,), the
    number of active entries), ``n``."""

    order: Tensor
    vals: Tensor
    cnt: Tensor
    n: int


def _meta_block(km: ModuleType, n: int) -> int:
    if km.INTERPRET:
        return 16
    return min(4096, max(128, triton.next_power_of_2(max(n, 1))))


def gate_meta(*gates: Tensor, vals_dtype: torch.dtype = torch.float32) -> tuple:
    """GateMeta of one or two 1-D gates, computed by one launch on the gates' device."""
    assert 1 <= len(gates) <= 2
    dev = gates[0].device
    metas = []
    for g in gates:
        n = g.numel()
        metas.append(GateMeta(
            order=torch.empty(n, dtype=torch.int32, device=dev),
            vals=torch.empty(n, dtype=vals_dtype, device=dev),
            cnt=torch.empty(1, dtype=torch.int32, device=dev),
            n=n,
        ))
    gs = [g.contiguous() for g in gates]
    if len(gates) == 1:
        gs.append(gs[0])
        metas_args = metas + metas
    else:
        metas_args = metas
    with launch_context(dev) as km:
        block = _meta_block(km, max(m.n for m in metas))
        m0, m1 = metas_args
        km.gate_meta_kernel[(len(gates),)](
            gs[0], m0.n, m0.order, m0.vals, m0.cnt,
            gs[1], m1.n, m1.order, m1.vals, m1.cnt,
            BLOCK=block, num_warps=4,
        )
    return tuple(metas)


def identity_meta(n: int, device: torch.device, vals_dtype: torch.dtype = torch.float32) -> GateMeta:
    """All-active metadata of size n (values 1)."""
    return GateMeta(
        order=torch.arange(n, dtype=torch.int32, device=device),
        vals=torch.ones(n, dtype=vals_dtype, device=device),
        cnt=torch.full((1,), n, dtype=torch.int32, device=device),
        n=n,
    )


# --------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------


# float64 multiplies as broadcast products in registers (kernels._dot): small tiles, no autotuning.
# The compile check builds exactly these (no spill on sm_90).
F64_GMM_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=8, GROUP_M=8, num_warps=4, num_stages=1)
F64_MTM_CONFIG = dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_K=4, GROUP_P=8, num_warps=4, num_stages=1)


def _gmm_fixed_config(km: ModuleType, M: int, N: int, dtype: torch.dtype) -> dict:
    if km.INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    if dtype == torch.float64:
        return dict(F64_GMM_CONFIG)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    bm = 128 if M > 64 else 64
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8 if bm == 128 else 4, num_stages=3)


def _mtm_fixed_config(km: ModuleType, dtype: torch.dtype) -> dict:
    if km.INTERPRET:
        return dict(BLOCK_P=16, BLOCK_Q=16, BLOCK_K=16, GROUP_P=2)
    if dtype == torch.float64:
        return dict(F64_MTM_CONFIG)
    if dtype == torch.float32:
        return dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_K=32, GROUP_P=8, num_warps=4, num_stages=3)
    return dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_K=64, GROUP_P=8, num_warps=8, num_stages=3)


def _tuned(km: ModuleType, name: str, dtype: torch.dtype):
    """(kernel, autotuned?): the autotuned kernel, or its plain JIT function when autotuning is
    off or the dtype has a fixed configuration (float64)."""
    kernel = getattr(km, name)
    if not km.AUTOTUNE:
        return kernel, False
    if dtype == torch.float64:
        return kernel.fn, False  # the Autotuner's JIT function
    return kernel, True


_SCRATCH: Dict[torch.device, Tensor] = {}


def _scratch(device: torch.device) -> Tensor:
    t = _SCRATCH.get(device)
    if t is None:
        t = _SCRATCH[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return t


@dataclass(frozen=True)
class Gather:
    """One gathered dimension of a gmm launch: the positions ``order`` lists (device int32), each
    scaled by ``vals`` (None: no scale), the first ``cnt`` of them active (a device count; None:
    all of them). ``ident_check``: the order is a gate order, so a full count means identity and
    the tile indexes directly. ``rows`` (output dimension only): the row of ``b`` that each
    position reads, when it differs from ``order``."""

    order: Tensor
    vals: Optional[Tensor] = None
    cnt: Optional[Tensor] = None
    ident_check: bool = False
    rows: Optional[Tensor] = None

    @classmethod
    def of_gate(cls, meta: GateMeta) -> "Gather":
        """The active entries of a gate, scaled by the gate values."""
        return cls(meta.order, meta.vals, meta.cnt, ident_check=True)


def gmm(
    *,
    a: Tensor,
    b: Tensor,
    out: Optional[Tensor],
    n_full: int,
    k_full: int,
    k: Optional[Gather] = None,
    gather_a: bool = False,
    gather_b: bool = False,
    n: Optional[Gather] = None,
    bias: Optional[Tensor] = None,
    lora_t: Optional[Tensor] = None,
    lora_b: Optional[Tensor] = None,
    aux: Optional[Tensor] = None,
    alpha: float = 1.0,
) -> Optional[Tensor]:
    """Launches gmm_kernel (see kernels.py): ``out[:, n] = alpha * (a[:, k] @ b[n][:, k].T + ...)``.

    ``a`` (M, *), ``b`` (rows, cols) are 2-D strided. ``k``: the reduction dimension's gather, read
    through it by ``a`` (``gather_a``) and/or ``b`` (``gather_b``); ``n``: the output dimension's.
    ``lora_b`` is (rows of b, r) indexed like b's rows; ``aux`` (M, n_full) turns on the partial
    sums ``sum_m pre * aux`` and then the return value is their total, shape (n_full,)."""
    k_idx, k_vals, k_cnt = (k.order, k.vals, k.cnt) if k is not None else (None, None, None)
    n_out = n.order if n is not None else None
    n_brow = (n.rows if n.rows is not None else n.order) if n is not None else None
    n_vals, n_cnt = (n.vals, n.cnt) if n is not None else (None, None)
    M = a.shape[0]
    dev = a.device
    n_gather = n_out is not None
    k_dyn = k_cnt is not None
    has_lora = lora_t is not None
    has_aux = aux is not None
    store_out = out is not None
    r = lora_t.shape[1] if has_lora else 0
    block_r = max(16, triton.next_power_of_2(max(r, 1)))
    dummy = a  # for pointer arguments this launch's variant never reads
    o = out if store_out else dummy
    t_ = lora_t if has_lora else dummy
    lb = lora_b if has_lora else dummy
    x_ = aux if has_aux else dummy
    with launch_context(dev) as km:
        kernel, autotuned = _tuned(km, "gmm_kernel", a.dtype)
        if autotuned:
            cfg = {}
            min_bm = km.GMM_MIN_BLOCK_M
        else:
            cfg = _gmm_fixed_config(km, M, n_full, a.dtype)
            min_bm = cfg["BLOCK_M"]
        if has_aux:
            part = torch.zeros((triton.cdiv(M, min_bm), max(n_full, 1)), dtype=acc_dtype(a.dtype), device=dev)
        else:
            part = _scratch(dev)  # never written; autotuning may zero it (reset_to_zero)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_full, meta["BLOCK_N"]),)

        kernel[grid](
            a, a.stride(0), a.stride(1),
            b, b.stride(0), b.stride(1),
            o, o.stride(0) if store_out else 0, o.stride(1) if store_out else 0,
            k_idx if k_idx is not None else dummy,
            k_vals if k_vals is not None else dummy,
            k_cnt if k_cnt is not None else dummy,
            n_out if n_gather else dummy,
            n_brow if n_gather else dummy,
            n_vals if n_vals is not None else dummy,
            n_cnt if n_gather else dummy,
            bias if bias is not None else dummy,
            t_, t_.stride(0) if has_lora else 0, t_.stride(1) if has_lora else 0,
            lb, lb.stride(0) if has_lora else 0, lb.stride(1) if has_lora else 0, r,
            x_, x_.stride(0) if has_aux else 0, x_.stride(1) if has_aux else 0,
            part, part.stride(0),
            M, n_full, k_full, float(alpha), _bucket(M),
            K_GATHER_A=gather_a, K_GATHER_B=gather_b, K_DYN=k_dyn, K_IDENT_CHECK=k is not None and k.ident_check,
            N_GATHER=n_gather, N_IDENT_CHECK=n is not None and n.ident_check,
            HAS_KVAL=k_vals is not None, HAS_NVAL=n_vals is not None, HAS_BIAS=bias is not None,
            HAS_LORA=has_lora, HAS_AUX=has_aux, STORE_OUT=store_out,
            IDX64=needs_int64(a, b, out, lora_t, lora_b, aux, part),
            DOT_PREC=dot_precision(a.dtype), BLOCK_R=block_r,
            **cfg,
        )
    if has_aux:
        return part.sum(0)[:n_full]
    return None


def mtm(
    *,
    a: Tensor,
    b: Tensor,
    out: Tensor,
    p: GateMeta,
    q: GateMeta,
    p_gather: bool,
    q_gather: bool,
    p_vals: bool,
    q_vals: bool,
    alpha: float = 1.0,
) -> Tensor:
    """Launches mtm_kernel: out[P, Q] = alpha * pv * qv * a[:, P].T @ b[:, Q] on the active block,
    zeros elsewhere. ``a`` (M, P_FULL), ``b`` (M, Q_FULL), ``out`` (P_FULL, Q_FULL)."""
    M = a.shape[0]
    P_FULL, Q_FULL = out.shape
    with launch_context(a.device) as km:
        kernel, autotuned = _tuned(km, "mtm_kernel", a.dtype)
        cfg = {} if autotuned else _mtm_fixed_config(km, a.dtype)

        def grid(meta):
            return (triton.cdiv(P_FULL, meta["BLOCK_P"]) * triton.cdiv(Q_FULL, meta["BLOCK_Q"]),)

        kernel[grid](
            a, a.stride(0), a.stride(1),
            b, b.stride(0), b.stride(1),
            out, out.stride(0), out.stride(1),
            p.order, p.vals, p.cnt,
            q.order, q.vals, q.cnt,
            M, P_FULL, Q_FULL, float(alpha), _bucket(M),
            P_GATHER=p_gather, Q_GATHER=q_gather, HAS_PVAL=p_vals, HAS_QVAL=q_vals,
            IDX64=needs_int64(a, b, out),
            DOT_PREC=dot_precision(a.dtype),
            **cfg,
        )
    return out


def colsums(dy: Tensor, y: Optional[Tensor], rows: GateMeta, need_b: bool, need_g: bool):
    """Per-column sums over tokens on the active columns of dy (M, N), in the accumulation dtype:
    ``sum dy`` and ``sum dy * y``; zeros on inactive columns. Returns (sum_b or None, sum_g or None)."""
    M, N = dy.shape
    dev = dy.device
    with launch_context(dev) as km:
        if km.INTERPRET:
            bm, bn, warps = 16, 16, 4
            target_programs = 4
        else:
            bm, bn, warps = 32, 128, 4
            props = torch.cuda.get_device_properties(dev)
            target_programs = 4 * props.multi_processor_count
        n_tiles = triton.cdiv(N, bn)
        splits = max(1, min(triton.cdiv(M, bm), triton.cdiv(target_programs, n_tiles)))
        rows_per_split = triton.cdiv(triton.cdiv(M, splits), bm) * bm
        splits = triton.cdiv(M, rows_per_split)
        acc = acc_dtype(dy.dtype)
        part_b = torch.empty((splits, N), dtype=acc, device=dev) if need_b else None
        part_g = torch.empty((splits, N), dtype=acc, device=dev) if need_g else None
        pb = part_b if need_b else part_g
        pg = part_g if need_g else part_b
        yy = y if need_g else dy
        km.colsum_kernel[(n_tiles, splits)](
            dy, dy.stride(0), dy.stride(1),
            yy, yy.stride(0), yy.stride(1),
            rows.order, rows.cnt,
            pb, pg, pb.stride(0),
            M, N, rows_per_split,
            NEED_B=need_b, NEED_G=need_g, IDX64=needs_int64(dy, yy, pb, pg), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
        )
    return (part_b.sum(0) if need_b else None, part_g.sum(0) if need_g else None)
