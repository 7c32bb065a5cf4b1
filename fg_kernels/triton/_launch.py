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
from typing import Dict, Optional, Set, Tuple

import torch
import triton
from torch import Tensor
from triton.runtime.autotuner import Autotuner

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


def kernel_module(interpret: bool) -> ModuleType:
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
            yield kernel_module(True)
    else:
        if _stdlib_is_interpreted():
            raise RuntimeError(
                "fg_kernels.triton: triton was imported with TRITON_INTERPRET=1, so this process can "
                "only run the interpreter; unset TRITON_INTERPRET to run compiled kernels on CUDA"
            )
        with torch.cuda.device(device):
            yield kernel_module(False)


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


# --------------------------------------------------------------------------------------------
# Routes: which gate pattern a launch serves, decided on the device
# --------------------------------------------------------------------------------------------

ALWAYS, FULL, COMPACT = 0, 1, 2


@dataclass(frozen=True)
class Route:
    """The device-side condition of a launch (kernels.py, ``_route_taken``): ``ALWAYS``; ``FULL``,
    only when both gates of the op call are all-open; ``COMPACT``, only when one is not. An op
    call launches each step once per route; exactly one of the pair does the work."""

    kind: int
    gates: tuple = ()  # (GateMeta, GateMeta) for FULL / COMPACT

    def args(self, dummy: Tensor) -> dict:
        if self.kind == ALWAYS:
            return dict(route0_cnt_ptr=dummy, route0_n=0, route1_cnt_ptr=dummy, route1_n=0, ROUTE=ALWAYS)
        g0, g1 = self.gates
        return dict(route0_cnt_ptr=g0.cnt, route0_n=g0.n, route1_cnt_ptr=g1.cnt, route1_n=g1.n, ROUTE=self.kind)


def routes(rmeta: GateMeta, cmeta: GateMeta) -> Tuple[Route, Route]:
    """(full route, compact route) of an op call with these row and column gates."""
    return Route(FULL, (rmeta, cmeta)), Route(COMPACT, (rmeta, cmeta))


# --------------------------------------------------------------------------------------------
# Block configurations and one-off tuning
# --------------------------------------------------------------------------------------------


# float64 multiplies as broadcast products in registers (kernels._dot): small tiles, no autotuning.
# The compile check builds exactly these (no spill on sm_90).
F64_GMM_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=8, GROUP_M=8, num_warps=4, num_stages=1)
F64_MTM_CONFIG = dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_K=4, GROUP_P=8, num_warps=4, num_stages=1)
# Bandwidth-bound packing: one fixed tile (rows x columns).
PACK_CONFIG = dict(BLOCK_R=32, BLOCK_C=128, num_warps=8)
# The pattern every autotuned key is tuned on: 60% of each dimension active (sparsity 0.4).
TUNE_ACTIVE_FRACTION = 0.6


def _gmm_fixed_config(km: ModuleType, M: int, dtype: torch.dtype) -> dict:
    if km.INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    if dtype == torch.float64:
        return dict(F64_GMM_CONFIG)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
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


def _autotuned(km: ModuleType, dtype: torch.dtype) -> bool:
    """Whether launches of this dtype autotune (float64 has a fixed configuration)."""
    return km.AUTOTUNE and dtype != torch.float64


_TUNED: Set[tuple] = set()


def _launch(kernel, grid, args: dict, fixed_config: Optional[dict], tuning: Dict[str, object]) -> None:
    """Launches ``kernel`` with keyword ``args``: with ``fixed_config``, or autotuned. The first
    launch of an autotuning key first runs the kernel once on ``tuning``'s replacements (counts of a
    representative sparse pattern, scratch outputs), so the configuration fits the route's work
    rather than whatever pattern the first real call has (an all-open call would leave the compact
    kernels nothing to time)."""
    if fixed_config is not None:
        if isinstance(kernel, Autotuner):
            kernel = kernel.fn  # the JIT function under the autotuner (float64, FG_TRITON_AUTOTUNE=0)
        kernel[grid](**args, **fixed_config)
        return
    key = (id(kernel),) + tuple(args[k] for k in kernel.keys)
    key += tuple(str(v.dtype) for v in args.values() if isinstance(v, Tensor))
    if key not in _TUNED:
        dev = next(v.device for v in args.values() if isinstance(v, Tensor))
        synthetic = {}
        for name, value in tuning.items():
            if isinstance(value, Tensor):
                synthetic[name] = torch.zeros_like(value) if name == "part_ptr" else torch.empty_like(value)
            else:
                synthetic[name] = torch.full((1,), int(value), dtype=torch.int32, device=dev)
        kernel[grid](**{**args, **synthetic})
        _TUNED.add(key)
    kernel[grid](**args)


def _route_tuning(route: Route) -> Dict[str, object]:
    """Route counts that take ``route`` during tuning: full counts (FULL) or 60% of each (COMPACT)."""
    if route.kind == ALWAYS:
        return {}
    g0, g1 = route.gates
    frac = 1.0 if route.kind == FULL else TUNE_ACTIVE_FRACTION
    return {"route0_cnt_ptr": round(frac * g0.n), "route1_cnt_ptr": round(frac * g1.n)}


_SCRATCH: Dict[torch.device, Tensor] = {}


def _scratch(device: torch.device) -> Tensor:
    t = _SCRATCH.get(device)
    if t is None:
        t = _SCRATCH[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return t


# --------------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gather:
    """One gathered dimension of a launch: the positions ``order`` lists (device int32), each
    scaled by ``vals`` (None: no scale), the first ``cnt`` of them active (a device count; None:
    all of them). ``rows`` (gmm output dimension only): the row of ``b`` that each position
    reads (None: position p reads row p)."""

    order: Tensor
    vals: Optional[Tensor] = None
    cnt: Optional[Tensor] = None
    rows: Optional[Tensor] = None

    @classmethod
    def of_gate(cls, meta: GateMeta, scaled: bool = True) -> "Gather":
        """The active entries of a gate, scaled by the gate values (``scaled``) or not."""
        return cls(meta.order, meta.vals if scaled else None, meta.cnt)


def pack(*, src: Tensor, dst: Tensor, route: Route, rows: Optional[Gather] = None,
         cols: Optional[Gather] = None) -> Tensor:
    """Launches pack_kernel: ``dst[i, j] = src[rows[i], cols[j]] * row vals * col vals`` for the
    active ``i``, ``j`` (direct where a dimension has no Gather). ``dst`` has the full shape."""
    n_rows, n_cols = dst.shape
    if n_rows == 0 or n_cols == 0:
        return dst
    dummy = src
    with launch_context(src.device) as km:
        cfg = dict(BLOCK_R=16, BLOCK_C=16) if km.INTERPRET else dict(PACK_CONFIG)
        grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]), triton.cdiv(n_cols, cfg["BLOCK_C"]))
        km.pack_kernel[grid](
            src_ptr=src, stride_sr=src.stride(0), stride_sc=src.stride(1),
            dst_ptr=dst, stride_dr=dst.stride(0), stride_dc=dst.stride(1),
            **_pack_side("row", rows, n_rows, dummy), **_pack_side("col", cols, n_cols, dummy),
            **route.args(dummy), IDX64=needs_int64(src, dst), **cfg,
        )
    return dst


def _pack_side(side: str, g: Optional[Gather], n: int, dummy: Tensor) -> dict:
    name = "ROW" if side == "row" else "COL"
    return {
        f"{side}_order_ptr": g.order if g is not None else dummy,
        f"{side}_val_ptr": g.vals if g is not None and g.vals is not None else dummy,
        f"{side}_cnt_ptr": g.cnt if g is not None and g.cnt is not None else dummy,
        f"n_{side}s": n,
        f"{name}_GATHER": g is not None,
        f"{name}_DYN": g is not None and g.cnt is not None,
        f"HAS_{name[0]}VAL": g is not None and g.vals is not None,
    }


def partial_sums(M: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The zeroed buffer of the column-gate partial sums (``aux``) of a gmm pair: one row per
    possible row tile; the sum over rows is the result."""
    with launch_context(device) as km:
        min_bm = km.GMM_MIN_BLOCK_M if _autotuned(km, dtype) else _gmm_fixed_config(km, M, dtype)["BLOCK_M"]
    return torch.zeros((triton.cdiv(M, min_bm), max(n, 1)), dtype=acc_dtype(dtype), device=device)


def _epilogue_args(a: Tensor, out: Optional[Tensor], bias, lora_t, lora_b, aux, part, alpha) -> dict:
    """Arguments of the gmm epilogue (kernels._epilogue); absent tensors are replaced by ``a``."""
    has_lora, has_aux, store = lora_t is not None, aux is not None, out is not None
    r = lora_t.shape[1] if has_lora else 0
    t_, lb, x_ = (lora_t if has_lora else a), (lora_b if has_lora else a), (aux if has_aux else a)
    o = out if store else a
    part = part if has_aux else _scratch(a.device)  # never written without HAS_AUX
    return dict(
        out_ptr=o, stride_om=o.stride(0) if store else 0, stride_on=o.stride(1) if store else 0,
        bias_ptr=bias if bias is not None else a,
        t_ptr=t_, stride_tm=t_.stride(0) if has_lora else 0, stride_tr=t_.stride(1) if has_lora else 0,
        lb_ptr=lb, stride_lbn=lb.stride(0) if has_lora else 0, stride_lbr=lb.stride(1) if has_lora else 0,
        r_lora=r, aux_ptr=x_, stride_xm=x_.stride(0) if has_aux else 0, stride_xk=x_.stride(1) if has_aux else 0,
        part_ptr=part, stride_pm=part.stride(0), alpha=float(alpha),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_AUX=has_aux, STORE_OUT=store,
        BLOCK_R=max(16, triton.next_power_of_2(max(r, 1))),
    )


def _launch_gmm(name: str, args: dict, tuning: Dict[str, object]) -> None:
    """Launches the gmm kernel ``name`` over cdiv(M, BLOCK_M) * cdiv(N_FULL, BLOCK_N) programs, with
    the fixed configuration or autotuned (see ``_launch``)."""
    a, M, n_full = args["a_ptr"], args["M"], args["N_FULL"]
    with launch_context(a.device) as km:
        fixed = None if _autotuned(km, a.dtype) else _gmm_fixed_config(km, M, a.dtype)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_full, meta["BLOCK_N"]),)

        _launch(getattr(km, name), grid, args, fixed, tuning)


def _outputs_for_tuning(args: dict) -> Dict[str, object]:
    tuning = {}
    if args["STORE_OUT"]:
        tuning["out_ptr"] = args["out_ptr"]
    if args["HAS_AUX"]:
        tuning["part_ptr"] = args["part_ptr"]
    return tuning


def gmm_full(*, route: Route, a: Tensor, b: Tensor, out: Optional[Tensor], n_full: int,
             k_vals: Optional[Tensor] = None, n_vals: Optional[Tensor] = None, bias: Optional[Tensor] = None,
             lora_t: Optional[Tensor] = None, lora_b: Optional[Tensor] = None, aux: Optional[Tensor] = None,
             part: Optional[Tensor] = None, alpha: float = 1.0) -> None:
    """Launches gmm_full_kernel: ``out = alpha * n_vals * ((a * k_vals) @ b.T + t @ lora_b.T + bias)``
    with direct indexing; ``a`` (M, K), ``b`` (n_full, K) 2-D strided, ``lora_b`` (n_full, r).
    ``aux`` (M, n_full): adds ``sum_m pre * aux`` into ``part`` (see ``partial_sums``)."""
    M, K = a.shape
    args = dict(
        a_ptr=a, stride_am=a.stride(0), stride_ak=a.stride(1),
        b_ptr=b, stride_bn=b.stride(0), stride_bk=b.stride(1),
        k_val_ptr=k_vals if k_vals is not None else a, n_val_ptr=n_vals if n_vals is not None else a,
        **_epilogue_args(a, out, bias, lora_t, lora_b, aux, part, alpha), **route.args(a),
        M=M, N_FULL=n_full, K_FULL=K, M_BUCKET=_bucket(M),
        HAS_KVAL=k_vals is not None, HAS_NVAL=n_vals is not None,
        IDX64=needs_int64(a, b, out, lora_t, lora_b, aux, part), DOT_PREC=dot_precision(a.dtype),
    )
    _launch_gmm("gmm_full_kernel", args, {**_route_tuning(route), **_outputs_for_tuning(args)})


def gmm_compact(*, route: Route, a: Tensor, b: Tensor, out: Optional[Tensor], n_full: int, k_key: int,
                k_len: int, k_cnt: Optional[Tensor] = None, n: Optional[Gather] = None,
                bias: Optional[Tensor] = None, lora_t: Optional[Tensor] = None, lora_b: Optional[Tensor] = None,
                aux: Optional[Tensor] = None, part: Optional[Tensor] = None, alpha: float = 1.0) -> None:
    """Launches gmm_compact_kernel on compact operands: ``pre = a[:, :k] @ b[rows][:, :k].T + ...``
    with ``k = *k_cnt`` (a device count; else ``k_len``), scattered to the output columns
    ``n.order`` (the first ``n.cnt`` positions active, scaled by ``n.vals``; else all n_full,
    directly). ``bias`` and ``lora_b`` are indexed by the layer row that produces a position:
    ``n.rows[p]`` when given (a compact layer), else the output column. ``k_key``: the layer's
    full reduction size (autotuning key)."""
    M = a.shape[0]
    scatter = n is not None
    args = dict(
        a_ptr=a, stride_am=a.stride(0), stride_ak=a.stride(1),
        b_ptr=b, stride_bn=b.stride(0), stride_bk=b.stride(1),
        k_cnt_ptr=k_cnt if k_cnt is not None else a, k_len=int(k_len),
        n_order_ptr=n.order if scatter else a, n_brow_ptr=n.rows if scatter and n.rows is not None else a,
        n_val_ptr=n.vals if scatter and n.vals is not None else a, n_cnt_ptr=n.cnt if scatter else a,
        **_epilogue_args(a, out, bias, lora_t, lora_b, aux, part, alpha), **route.args(a),
        M=M, N_FULL=n_full, M_BUCKET=_bucket(M), K_KEY=int(k_key),
        K_DYN=k_cnt is not None, N_SCATTER=scatter, B_ROW_GATHER=scatter and n.rows is not None,
        HAS_NVAL=scatter and n.vals is not None,
        IDX64=needs_int64(a, b, out, lora_t, lora_b, aux, part), DOT_PREC=dot_precision(a.dtype),
    )
    tuning = {**_route_tuning(route), **_outputs_for_tuning(args)}
    if k_cnt is not None:
        tuning["k_cnt_ptr"] = round(TUNE_ACTIVE_FRACTION * k_len)
    if scatter and route.kind != ALWAYS:
        tuning["n_cnt_ptr"] = round(TUNE_ACTIVE_FRACTION * n_full)
    _launch_gmm("gmm_compact_kernel", args, tuning)


def mtm(*, route: Route, a: Tensor, b: Tensor, out: Tensor, p: Optional[Gather] = None,
        q: Optional[Gather] = None, p_vals: Optional[Tensor] = None, q_vals: Optional[Tensor] = None,
        alpha: float = 1.0) -> Tensor:
    """Launches mtm_kernel: ``out[P, Q] = alpha * p_vals * q_vals * a[:, :p].T @ b[:, :q]`` on the
    active block, scattered through the orders of ``p`` / ``q`` (direct where None; the counts
    bound the active block), zeros elsewhere. ``a`` (M, P_FULL), ``b`` (M, Q_FULL), ``out``
    (P_FULL, Q_FULL)."""
    M = a.shape[0]
    P_FULL, Q_FULL = out.shape
    if P_FULL == 0 or Q_FULL == 0:
        return out
    args = dict(
        a_ptr=a, stride_am=a.stride(0), stride_ap=a.stride(1),
        b_ptr=b, stride_bm=b.stride(0), stride_bq=b.stride(1),
        out_ptr=out, stride_op=out.stride(0), stride_oq=out.stride(1),
        p_order_ptr=p.order if p is not None else a, p_val_ptr=p_vals if p_vals is not None else a,
        p_cnt_ptr=p.cnt if p is not None else a,
        q_order_ptr=q.order if q is not None else a, q_val_ptr=q_vals if q_vals is not None else a,
        q_cnt_ptr=q.cnt if q is not None else a,
        **route.args(a), M=M, P_FULL=P_FULL, Q_FULL=Q_FULL, alpha=float(alpha), M_BUCKET=_bucket(M),
        P_SCATTER=p is not None, Q_SCATTER=q is not None, HAS_PVAL=p_vals is not None, HAS_QVAL=q_vals is not None,
        IDX64=needs_int64(a, b, out), DOT_PREC=dot_precision(a.dtype),
    )
    tuning = {**_route_tuning(route), "out_ptr": out}
    for name, g, full in (("p_cnt_ptr", p, P_FULL), ("q_cnt_ptr", q, Q_FULL)):
        if g is not None:
            tuning[name] = round(TUNE_ACTIVE_FRACTION * full)
    with launch_context(a.device) as km:
        fixed = None if _autotuned(km, a.dtype) else _mtm_fixed_config(km, a.dtype)

        def grid(meta):
            return (triton.cdiv(P_FULL, meta["BLOCK_P"]) * triton.cdiv(Q_FULL, meta["BLOCK_Q"]),)

        _launch(km.mtm_kernel, grid, args, fixed, tuning)
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
