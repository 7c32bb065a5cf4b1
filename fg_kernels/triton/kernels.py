"""Triton kernels of the ``fg`` ops. Never imported directly: ``_launch.kernel_module(interpret)`` loads
this file as a module instance, compiled (``@triton.jit`` -> JITFunction) or for the interpreter
(``TRITON_INTERPRET=1`` -> InterpretedFunction), because ``triton.jit`` decides which at
decoration time. (triton's own ``tl.*`` helpers are decorated once, when triton is imported, so a
process can in practice run only the mode it imported triton in; ``_launch`` checks that.)

Design: **compact first, then a dense loop.** Gathering single columns inside a GEMM's reduction
loop is issue-bound (scalar loads, no cp.async / TMA); instead

* ``gate_meta_kernel`` turns each gate into a *gate order* on the device: a permutation of
  ``0..n-1`` listing the active (non-zero) entries first, ascending, then the inactive ones; its
  *count* (a 1-element int32 device tensor) and its *values* (float32, float64 in a float64
  computation; 0 for inactive entries) in that order.
* ``pack_kernel`` (bandwidth-bound) copies the active block of an operand into a compact buffer,
  gate values folded in: ``x[:, C] * g_c[C]``, ``W[R][:, C]``, ``dy[:, R] * g_r[R]``. It writes only
  the tiles below the device-side counts.
* ``gmm_compact_kernel`` / ``mtm_kernel`` run dense-tile loops over the compact buffers, bounded by
  the counts (whole tiles unmasked and vectorised, one masked tail tile), and scatter through the
  gate orders in the epilogue, where the row gate, the bias and the LoRA term are applied too.
  Their grids cover the *full* output: a tile whose positions are all inactive writes zeros, so
  inactive outputs are written exactly once, by the same launch.
* ``gmm_full_kernel`` / ``mtm_kernel`` with direct indexing serve the all-open pattern (every gate
  non-zero: the first steps of training) without any copy; the gates scale the operand tiles.

The host never knows which pattern it launches for: every launch carries a *route* (``ROUTE``
1: run only if both gates are all-open; 2: only if some gate is closed; 0: always) and the two
gate counts, and a program whose route is not taken does no work and writes nothing (it leaves at
once, or, in ``gmm_compact_kernel``, runs its loops zero times: a branch around that loop would
make the accumulator a join of two values and cost ~70 registers). So the full and compact kernels
are separate compilations (neither carries the other's registers), a new pattern never compiles,
autotunes or synchronises anything, and CUDA graphs capture both routes.

Further conventions:

* Rows past M are clamped to M - 1 (valid memory) and discarded in the epilogue; positions past a
  count read valid memory and are discarded (``tl.where``, never multiplied by 0).
* Accumulation is float32 (float64 for float64 operands, whose products run on the FMA units:
  ``tl.dot`` has no float64 tensor-core path); ``tl.dot`` takes ``DOT_PREC`` ("ieee" or "tf32")
  for float32 inputs. A gate applied to an operand is multiplied in the gate values' precision
  and rounded once to the operand's dtype.
* Offsets are int32 unless IDX64 (the host sets it when a tensor spans 2**31 elements or more).
"""

import os

import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
# Autotune only compiled kernels, and let users switch it off (fixed heuristic configs instead).
AUTOTUNE = (not INTERPRET) and os.environ.get("FG_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no")


# --------------------------------------------------------------------------------------------
# Shared helpers: offsets, accumulators, products, the route, tile order.
# --------------------------------------------------------------------------------------------


@triton.jit
def _off(i, IDX64: tl.constexpr):
    if IDX64:
        o = i.to(tl.int64)
    else:
        o = i
    return o


@triton.jit
def _load_tile(ptrs, mask, GATHERED: tl.constexpr):
    """A 2-D tile (row-major, unit stride along a row); ``GATHERED``: its columns are gathered, and
    it is loaded as one 1-D block of pointers.

    Triton cannot prove a gathered row contiguous, so it chooses the lanes of a 2-D pointer tile by
    version: one lane per row under 3.6 (32 cache lines per warp access), along the rows under 3.9.
    A 1-D block in row-major order puts consecutive lanes on consecutive columns of a row under
    every version. Contiguous tiles stay 2-D (their vectorised access is provable)."""
    if GATHERED:
        mask = tl.broadcast_to(mask, ptrs.shape)
        flat = tl.load(tl.reshape(ptrs, [ptrs.numel]), mask=tl.reshape(mask, [ptrs.numel]), other=0.0)
        tile = tl.reshape(flat, ptrs.shape)
    else:
        tile = tl.load(ptrs, mask=mask, other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, values, mask, SCATTERED: tl.constexpr):
    """The store twin of :func:`_load_tile`: ``SCATTERED`` columns are written as one 1-D block."""
    if SCATTERED:
        mask = tl.broadcast_to(mask, ptrs.shape)
        values = tl.broadcast_to(values, ptrs.shape)
        tl.store(tl.reshape(ptrs, [ptrs.numel]), tl.reshape(values, [ptrs.numel]),
                 mask=tl.reshape(mask, [ptrs.numel]))
    else:
        tl.store(ptrs, values, mask=mask)


@triton.jit
def _acc_zeros(ROWS: tl.constexpr, COLS: tl.constexpr, operand_ptr):
    """A zero accumulator: float64 for float64 operands, float32 otherwise."""
    if operand_ptr.dtype.element_ty == tl.float64:
        z = tl.zeros((ROWS, COLS), dtype=tl.float64)
    else:
        z = tl.zeros((ROWS, COLS), dtype=tl.float32)
    return z


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b. float64 runs as broadcast products and a sum (FMA units): tl.dot has no
    float64 path on sm_90; the launcher gives float64 small tiles so this stays in registers."""
    if a.dtype == tl.float64:
        acc = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _route_taken(route0_cnt_ptr, route0_n, route1_cnt_ptr, route1_n, ROUTE: tl.constexpr):
    """Whether this launch's route runs: 0 always; 1 when both counts are full (all gates open);
    2 when either is not."""
    if ROUTE == 0:
        taken = tl.full((), 1, tl.int1)
    elif ROUTE == 1:
        taken = (tl.load(route0_cnt_ptr) == route0_n) & (tl.load(route1_cnt_ptr) == route1_n)
    else:
        taken = (tl.load(route0_cnt_ptr) != route0_n) | (tl.load(route1_cnt_ptr) != route1_n)
    return taken


@triton.jit
def _scatter_positions(order_ptr, offs, valid, SCATTER: tl.constexpr, IDX64: tl.constexpr):
    """Where positions offs go: order[offs] (SCATTER; 0 past the valid ones) or offs itself."""
    if SCATTER:
        pos = _off(tl.load(order_ptr + offs, mask=valid, other=0), IDX64)
    else:
        pos = _off(offs, IDX64)
    return pos


@triton.jit
def _count(cnt_ptr, full, DYN: tl.constexpr):
    """The active count: *cnt_ptr (a gate order's device count) when DYN, else the full size."""
    if DYN:
        c = tl.load(cnt_ptr)
    else:
        c = full
    return c


@triton.jit
def _grouped_tile(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles side by side (L2 reuse of B)."""
    pid = tl.program_id(0)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size
    return pid_m, pid_n


# --------------------------------------------------------------------------------------------
# Gate metadata: order (active first), values, count; one program per gate.
# --------------------------------------------------------------------------------------------


@triton.jit
def _compact_one(g_ptr, n, order_ptr, vals_ptr, cnt_ptr, BLOCK: tl.constexpr):
    offs0 = tl.arange(0, BLOCK)
    n_act = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for start in range(0, n, BLOCK):
        offs = start + offs0
        inb = offs < n
        g = tl.load(g_ptr + offs, mask=inb, other=0).to(vals_ptr.dtype.element_ty)
        act = (g != 0.0) & inb
        a = act.to(tl.int32)
        pos = n_act + tl.cumsum(a, axis=0) - 1
        tl.store(order_ptr + pos, offs, mask=act)
        tl.store(vals_ptr + pos, g, mask=act)
        n_act += tl.sum(a, axis=0)
    tl.store(cnt_ptr, n_act)
    n_pos = n_act
    for start in range(0, n, BLOCK):
        offs = start + offs0
        inb = offs < n
        g = tl.load(g_ptr + offs, mask=inb, other=0).to(vals_ptr.dtype.element_ty)
        off = (g == 0.0) & inb
        a = off.to(tl.int32)
        pos = n_pos + tl.cumsum(a, axis=0) - 1
        tl.store(order_ptr + pos, offs, mask=off)
        tl.store(vals_ptr + pos, tl.zeros([BLOCK], dtype=vals_ptr.dtype.element_ty), mask=off)
        n_pos += tl.sum(a, axis=0)


@triton.jit(do_not_specialize=["n0", "n1"])
def gate_meta_kernel(
    g0_ptr, n0, order0_ptr, vals0_ptr, cnt0_ptr,
    g1_ptr, n1, order1_ptr, vals1_ptr, cnt1_ptr,
    BLOCK: tl.constexpr,
):
    """Program 0 compacts gate 0, program 1 gate 1 (launch a grid of 1 for a single gate)."""
    if tl.program_id(0) == 0:
        _compact_one(g0_ptr, n0, order0_ptr, vals0_ptr, cnt0_ptr, BLOCK)
    else:
        _compact_one(g1_ptr, n1, order1_ptr, vals1_ptr, cnt1_ptr, BLOCK)


# --------------------------------------------------------------------------------------------
# Packing: the active block of an operand into a compact buffer (bandwidth-bound).
#   dst[i, j] = src[row(i), col(j)] * rval[i] * cval[j]   for i < row count, j < col count
#   row(i) = row_order[i] (ROW_GATHER) or i; col(j) likewise. Counts come from a pointer
#   (*_DYN) or are the full sizes. Tiles past a count are not written; in the tiles that straddle
#   one, the positions past it (inside dst) get zeros.
# --------------------------------------------------------------------------------------------


@triton.jit
def pack_kernel(
    src_ptr, stride_sr, stride_sc,
    dst_ptr, stride_dr, stride_dc,
    row_order_ptr, row_val_ptr, row_cnt_ptr, n_rows,
    col_order_ptr, col_val_ptr, col_cnt_ptr, n_cols,
    route0_cnt_ptr, route0_n, route1_cnt_ptr, route1_n,
    ROUTE: tl.constexpr, ROW_GATHER: tl.constexpr, ROW_DYN: tl.constexpr, HAS_RVAL: tl.constexpr,
    COL_GATHER: tl.constexpr, COL_DYN: tl.constexpr, HAS_CVAL: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid: (cdiv(n_rows, BLOCK_R), cdiv(n_cols, BLOCK_C)); dst is (n_rows, n_cols)."""
    if _route_taken(route0_cnt_ptr, route0_n, route1_cnt_ptr, route1_n, ROUTE):
        r_cnt = _count(row_cnt_ptr, n_rows, ROW_DYN)
        c_cnt = _count(col_cnt_ptr, n_cols, COL_DYN)
        offs_i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        if (tl.program_id(0) * BLOCK_R < r_cnt) & (tl.program_id(1) * BLOCK_C < c_cnt):
            act_i = offs_i < r_cnt
            act_j = offs_j < c_cnt
            if ROW_GATHER:
                srow = _off(tl.load(row_order_ptr + offs_i, mask=act_i, other=0), IDX64)
            else:
                srow = _off(offs_i, IDX64)
            if COL_GATHER:
                scol = _off(tl.load(col_order_ptr + offs_j, mask=act_j, other=0), IDX64)
            else:
                scol = _off(offs_j, IDX64)
            act = act_i[:, None] & act_j[None, :]
            v = _load_tile(src_ptr + (srow[:, None] * stride_sr + scol[None, :] * stride_sc), act, COL_GATHER)
            # Gate products in the gate values' precision, rounded once by the store.
            if HAS_RVAL:
                rv = tl.load(row_val_ptr + offs_i, mask=act_i, other=0.0)
                v = v.to(rv.dtype) * rv[:, None]
            if HAS_CVAL:
                cv = tl.load(col_val_ptr + offs_j, mask=act_j, other=0.0)
                v = v.to(cv.dtype) * cv[None, :]
            dst = dst_ptr + (_off(offs_i, IDX64)[:, None] * stride_dr + _off(offs_j, IDX64)[None, :] * stride_dc)
            tl.store(dst, v.to(dst_ptr.dtype.element_ty), mask=(offs_i < n_rows)[:, None] & (offs_j < n_cols)[None, :])


# --------------------------------------------------------------------------------------------
# GEMM with fused epilogue, over output positions p (columns of out) and tokens m:
#   pre[m, p] = sum_{k < k_len} A'[m, k] * B[brow(p), k]
#               + T[m, :] @ LB[erow(p), :]                  (HAS_LORA)
#               + bias[erow(p)]                             (HAS_BIAS)
#   out[m, ocol(p)] = alpha * nval[p] * pre[m, p]            (STORE_OUT; 0 for inactive p)
#   part[pid_m, ocol(p)] = sum_m pre[m, p] * X[m, ocol(p)]   (HAS_AUX; the column-gate gradient)
# gmm_full_kernel: every position is active, ocol = erow = brow = p, A' = A * kval[k].
# gmm_compact_kernel: A, B compact (gates folded in by pack_kernel), positions p < n_cnt are
#   active; ocol = n_order[p] (N_SCATTER) or p; brow = n_brow[p] (B_ROW_GATHER) or p; erow, the
#   layer row that produces p: brow with B_ROW_GATHER (a compacted layer's own rows), else ocol.
# --------------------------------------------------------------------------------------------


@triton.jit
def _k_tile(a_ptr, a_row, stride_ak, b_ptr, b_row, b_ok, stride_bk, k_val_ptr, k0, k_len,
            MASK_K: tl.constexpr, B_MASK: tl.constexpr, HAS_KVAL: tl.constexpr, IDX64: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """The A (rows x BLOCK_K) and B (BLOCK_K x positions) tiles of reduction steps k0..k0+BLOCK_K.
    MASK_K: the tail tile (zeros past k_len); B_MASK: B's positions past its rows are masked."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ok = _off(offs_k, IDX64)
    a_ptrs = a_ptr + (a_row[:, None] + ok[None, :] * stride_ak)
    b_ptrs = b_ptr + (b_row[None, :] + ok[:, None] * stride_bk)
    if MASK_K:
        mk = offs_k < k_len
        a = tl.load(a_ptrs, mask=mk[None, :], other=0.0)
        if B_MASK:
            b = tl.load(b_ptrs, mask=mk[:, None] & b_ok[None, :], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=mk[:, None], other=0.0)
        if HAS_KVAL:
            kv = tl.load(k_val_ptr + offs_k, mask=mk, other=0.0)
    else:
        a = tl.load(a_ptrs)
        if B_MASK:
            b = tl.load(b_ptrs, mask=b_ok[None, :], other=0.0)
        else:
            b = tl.load(b_ptrs)
        if HAS_KVAL:
            kv = tl.load(k_val_ptr + offs_k)
    if HAS_KVAL:
        a = (a.to(kv.dtype) * kv[None, :]).to(a.dtype)
    return a, b


@triton.jit
def _k_loop(acc, a_ptr, a_row, stride_ak, b_ptr, b_row, b_ok, stride_bk, k_val_ptr, k_len,
            B_MASK: tl.constexpr, HAS_KVAL: tl.constexpr, IDX64: tl.constexpr, DOT_PREC: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """acc + A' @ B over k < k_len: whole tiles unmasked (vectorised, pipelined), then one masked
    tail tile. k_len is a runtime value (an active count) in the compact kernels."""
    k_main = (k_len // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_main, BLOCK_K):
        a, b = _k_tile(a_ptr, a_row, stride_ak, b_ptr, b_row, b_ok, stride_bk, k_val_ptr, k0, k_len,
                       False, B_MASK, HAS_KVAL, IDX64, BLOCK_K)
        acc = _dot(a, b, acc, DOT_PREC)
    if k_main < k_len:
        a, b = _k_tile(a_ptr, a_row, stride_ak, b_ptr, b_row, b_ok, stride_bk, k_val_ptr, k_main, k_len,
                       True, B_MASK, HAS_KVAL, IDX64, BLOCK_K)
        acc = _dot(a, b, acc, DOT_PREC)
    return acc


@triton.jit
def _epilogue(
    acc, pid_m, offs_m, M, offs_p, act_p, valid_p, ocol, erow,
    out_ptr, stride_om, stride_on, n_val_ptr, bias_ptr,
    t_ptr, stride_tm, stride_tr, lb_ptr, stride_lbn, stride_lbr, r_lora,
    aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm, alpha,
    HAS_NVAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_AUX: tl.constexpr,
    STORE_OUT: tl.constexpr, IDX64: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_R: tl.constexpr,
    SCATTERED: tl.constexpr,
):
    """LoRA term, bias, column-gate partial sums, row gate and the store of one tile; ``SCATTERED``:
    the output columns ``ocol`` are a gate order (not contiguous)."""
    mask_m = offs_m < M
    if HAS_LORA:
        rows = _off(tl.minimum(offs_m, M - 1), IDX64)
        offs_r = tl.arange(0, BLOCK_R)
        mr = offs_r < r_lora
        t = tl.load(t_ptr + (rows[:, None] * stride_tm + offs_r[None, :] * stride_tr), mask=mr[None, :], other=0.0)
        lb = tl.load(lb_ptr + (erow[None, :] * stride_lbn + offs_r[:, None] * stride_lbr),
                     mask=mr[:, None] & act_p[None, :], other=0.0)
        acc = _dot(t, lb, acc, DOT_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + erow, mask=act_p, other=0.0).to(acc.dtype)
        acc = acc + bias[None, :]
    orow = _off(offs_m, IDX64)
    if HAS_AUX:
        xa = _load_tile(aux_ptr + (orow[:, None] * stride_xm + ocol[None, :] * stride_xk),
                        mask_m[:, None] & act_p[None, :], SCATTERED).to(acc.dtype)
        part = tl.sum(tl.where(mask_m[:, None] & act_p[None, :], acc * xa, 0.0), axis=0)
        tl.store(part_ptr + (pid_m * stride_pm + ocol), part, mask=valid_p)
    if STORE_OUT:
        res = acc * alpha
        if HAS_NVAL:
            nv = tl.load(n_val_ptr + offs_p, mask=act_p, other=0.0)
            res = res * nv[None, :]
        res = tl.where(act_p[None, :], res, 0.0).to(out_ptr.dtype.element_ty)
        _store_tile(out_ptr + (orow[:, None] * stride_om + ocol[None, :] * stride_on), res,
                    mask_m[:, None] & valid_p[None, :], SCATTERED)


@triton.jit(do_not_specialize=["r_lora", "alpha"])
def gmm_full_kernel(
    a_ptr, stride_am, stride_ak,
    b_ptr, stride_bn, stride_bk,
    out_ptr, stride_om, stride_on,
    k_val_ptr, n_val_ptr, bias_ptr,
    t_ptr, stride_tm, stride_tr,
    lb_ptr, stride_lbn, stride_lbr, r_lora,
    aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm,
    route0_cnt_ptr, route0_n, route1_cnt_ptr, route1_n,
    M, N_FULL, K_FULL, alpha, M_BUCKET,
    ROUTE: tl.constexpr, HAS_KVAL: tl.constexpr, HAS_NVAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_AUX: tl.constexpr, STORE_OUT: tl.constexpr,
    IDX64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """All positions active, direct indexing. Grid: cdiv(M, BLOCK_M) * cdiv(N_FULL, BLOCK_N)."""
    if _route_taken(route0_cnt_ptr, route0_n, route1_cnt_ptr, route1_n, ROUTE):
        pid_m, pid_n = _grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N_FULL, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_p = offs_p < N_FULL
        rows = _off(tl.minimum(offs_m, M - 1), IDX64)
        pos = _off(offs_p, IDX64)
        acc = _acc_zeros(BLOCK_M, BLOCK_N, a_ptr)
        acc = _k_loop(acc, a_ptr, rows * stride_am, stride_ak, b_ptr, pos * stride_bn, valid_p, stride_bk,
                      k_val_ptr, K_FULL, True, HAS_KVAL, IDX64, DOT_PREC, BLOCK_K)
        _epilogue(acc, pid_m, offs_m, M, offs_p, valid_p, valid_p, pos, pos,
                  out_ptr, stride_om, stride_on, n_val_ptr, bias_ptr,
                  t_ptr, stride_tm, stride_tr, lb_ptr, stride_lbn, stride_lbr, r_lora,
                  aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm, alpha,
                  HAS_NVAL, HAS_BIAS, HAS_LORA, HAS_AUX, STORE_OUT, IDX64, DOT_PREC, BLOCK_R, False)


@triton.jit(do_not_specialize=["k_len", "r_lora", "alpha"])
def gmm_compact_kernel(
    a_ptr, stride_am, stride_ak,
    b_ptr, stride_bn, stride_bk,
    out_ptr, stride_om, stride_on,
    k_cnt_ptr, k_len,
    n_order_ptr, n_brow_ptr, n_val_ptr, n_cnt_ptr,
    bias_ptr,
    t_ptr, stride_tm, stride_tr,
    lb_ptr, stride_lbn, stride_lbr, r_lora,
    aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm,
    route0_cnt_ptr, route0_n, route1_cnt_ptr, route1_n,
    M, N_FULL, alpha, M_BUCKET, K_KEY,
    ROUTE: tl.constexpr, K_DYN: tl.constexpr, N_SCATTER: tl.constexpr, B_ROW_GATHER: tl.constexpr,
    HAS_NVAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_AUX: tl.constexpr,
    STORE_OUT: tl.constexpr, IDX64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Dense tiles over compact operands. Grid: cdiv(M, BLOCK_M) * cdiv(N_FULL, BLOCK_N) over
    *all* output positions. The reduction length is *k_cnt_ptr (K_DYN) or k_len; the active
    positions are the first *n_cnt_ptr of n_order (N_SCATTER) or all N_FULL. K_KEY (the layer's
    full reduction size) only keys autotuning."""
    pid_m, pid_n = _grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N_FULL, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # A program whose route is not taken writes nothing: no position is valid for it (bounds, not
    # a branch around the loop: the accumulator stays one value for the tensor cores).
    if ROUTE == 0:
        n_valid = N_FULL
    else:
        n_valid = tl.where(_route_taken(route0_cnt_ptr, route0_n, route1_cnt_ptr, route1_n, ROUTE), N_FULL, 0)
    valid_p = offs_p < n_valid
    n_cnt = tl.minimum(_count(n_cnt_ptr, N_FULL, N_SCATTER), n_valid)
    act_p = offs_p < n_cnt
    k_cnt = _count(k_cnt_ptr, k_len, K_DYN)
    # A tile of inactive positions runs no reduction step and is written as zeros below.
    k_cnt = tl.where(pid_n * BLOCK_N < n_cnt, k_cnt, 0)
    if B_ROW_GATHER:
        # Inactive positions read row 0 (valid memory) and are discarded in the epilogue.
        brow = _off(tl.load(n_brow_ptr + offs_p, mask=act_p, other=0), IDX64)
    else:
        brow = _off(offs_p, IDX64)
    rows = _off(tl.minimum(offs_m, M - 1), IDX64)
    acc = _acc_zeros(BLOCK_M, BLOCK_N, a_ptr)
    acc = _k_loop(acc, a_ptr, rows * stride_am, stride_ak, b_ptr, brow * stride_bn, offs_p < N_FULL, stride_bk,
                  k_cnt_ptr, k_cnt, not B_ROW_GATHER, False, IDX64, DOT_PREC, BLOCK_K)
    # Positions are read after the loop (live across it they cost registers); one epilogue serves
    # active and inactive tiles (act_p all False: zeros). A program of the route not taken has no
    # valid position and skips the epilogue's loads, LoRA product and stores (its loop ran no step).
    if pid_n * BLOCK_N < n_valid:
        ocol = _scatter_positions(n_order_ptr, offs_p, valid_p, N_SCATTER, IDX64)
        if B_ROW_GATHER:
            erow = _off(tl.load(n_brow_ptr + offs_p, mask=act_p, other=0), IDX64)
        else:
            erow = ocol
        _epilogue(acc, pid_m, offs_m, M, offs_p, act_p, valid_p, ocol, erow,
                  out_ptr, stride_om, stride_on, n_val_ptr, bias_ptr,
                  t_ptr, stride_tm, stride_tr, lb_ptr, stride_lbn, stride_lbr, r_lora,
                  aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm, alpha,
                  HAS_NVAL, HAS_BIAS, HAS_LORA, HAS_AUX, STORE_OUT, IDX64, DOT_PREC, BLOCK_R, N_SCATTER)


# --------------------------------------------------------------------------------------------
# Token-reduction GEMM (weight-type gradients), full (P_FULL, Q_FULL) output with zeros:
#   out[opos_p(p), opos_q(q)] = alpha * pval[p] * qval[q] * sum_m A[m, p] * B[m, q]
#   for p < p_cnt and q < q_cnt, 0 at the other positions. A and B are read directly (compact
#   buffers on the compact route); opos = the gate order (P_SCATTER / Q_SCATTER) or the identity.
# --------------------------------------------------------------------------------------------


@triton.jit
def _mtm_acc(a_ptr, stride_am, stride_ap, b_ptr, stride_bm, stride_bq, offs_p, valid_p, offs_q, valid_q, M,
             IDX64: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """sum_m A[m, p] * B[m, q] for one (p, q) tile; tokens past M are masked."""
    a_col = _off(offs_p, IDX64) * stride_ap
    b_col = _off(offs_q, IDX64) * stride_bq
    acc = _acc_zeros(BLOCK_P, BLOCK_Q, a_ptr)
    for m0 in range(0, M, BLOCK_K):
        offs_k = m0 + tl.arange(0, BLOCK_K)
        mk = offs_k < M
        ok = _off(offs_k, IDX64)
        a = tl.load(a_ptr + (a_col[:, None] + ok[None, :] * stride_am), mask=valid_p[:, None] & mk[None, :], other=0.0)
        b = tl.load(b_ptr + (b_col[None, :] + ok[:, None] * stride_bm), mask=mk[:, None] & valid_q[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_PREC)
    return acc


@triton.jit(do_not_specialize=["alpha"])
def mtm_kernel(
    a_ptr, stride_am, stride_ap,
    b_ptr, stride_bm, stride_bq,
    out_ptr, stride_op, stride_oq,
    p_order_ptr, p_val_ptr, p_cnt_ptr,
    q_order_ptr, q_val_ptr, q_cnt_ptr,
    route0_cnt_ptr, route0_n, route1_cnt_ptr, route1_n,
    M, P_FULL, Q_FULL, alpha, M_BUCKET,
    ROUTE: tl.constexpr, P_SCATTER: tl.constexpr, Q_SCATTER: tl.constexpr, HAS_PVAL: tl.constexpr,
    HAS_QVAL: tl.constexpr, IDX64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_P: tl.constexpr,
):
    """Grid: cdiv(P_FULL, BLOCK_P) * cdiv(Q_FULL, BLOCK_Q) programs over all output positions."""
    if _route_taken(route0_cnt_ptr, route0_n, route1_cnt_ptr, route1_n, ROUTE):
        pid_p, pid_q = _grouped_tile(tl.cdiv(P_FULL, BLOCK_P), tl.cdiv(Q_FULL, BLOCK_Q), GROUP_P)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        valid_p = offs_p < P_FULL
        valid_q = offs_q < Q_FULL
        p_cnt = _count(p_cnt_ptr, P_FULL, P_SCATTER)
        q_cnt = _count(q_cnt_ptr, Q_FULL, Q_SCATTER)
        out_mask = valid_p[:, None] & valid_q[None, :]
        if (pid_p * BLOCK_P < p_cnt) & (pid_q * BLOCK_Q < q_cnt):
            acc = _mtm_acc(a_ptr, stride_am, stride_ap, b_ptr, stride_bm, stride_bq, offs_p, valid_p, offs_q,
                           valid_q, M, IDX64, DOT_PREC, BLOCK_P, BLOCK_Q, BLOCK_K)
            act_p = offs_p < p_cnt
            act_q = offs_q < q_cnt
            acc = acc * alpha
            if HAS_PVAL:
                pv = tl.load(p_val_ptr + offs_p, mask=act_p, other=0.0)
                acc = acc * pv[:, None]
            if HAS_QVAL:
                qv = tl.load(q_val_ptr + offs_q, mask=act_q, other=0.0)
                acc = acc * qv[None, :]
            acc = tl.where(act_p[:, None] & act_q[None, :], acc, 0.0).to(out_ptr.dtype.element_ty)
        else:
            acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=out_ptr.dtype.element_ty)
        # Output positions are read after the loop: kept live across it they cost registers.
        opos_p = _scatter_positions(p_order_ptr, offs_p, valid_p, P_SCATTER, IDX64)
        opos_q = _scatter_positions(q_order_ptr, offs_q, valid_q, Q_SCATTER, IDX64)
        _store_tile(out_ptr + (opos_p[:, None] * stride_op + opos_q[None, :] * stride_oq), acc, out_mask, Q_SCATTER)


# --------------------------------------------------------------------------------------------
# Column sums over tokens of the active output columns (bias and row-gate gradients):
#   part_b[s, c] = sum_{m in split s} dy[m, c],  part_g[s, c] = sum_{m in split s} dy[m, c] * y[m, c]
#   for active c (from a gate order), 0 for inactive c. Grid: (cdiv(N, BLOCK_N), splits).
# --------------------------------------------------------------------------------------------


@triton.jit
def colsum_kernel(
    dy_ptr, stride_dm, stride_dn,
    y_ptr, stride_ym, stride_yn,
    idx_ptr, cnt_ptr,
    part_b_ptr, part_g_ptr, stride_ps,
    M, N_FULL, rows_per_split,
    NEED_B: tl.constexpr, NEED_G: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_cnt = tl.load(cnt_ptr)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_p = offs_p < N_FULL
    act_p = offs_p < n_cnt
    col = _off(tl.load(idx_ptr + offs_p, mask=valid_p, other=0), IDX64)
    acc_b = tl.sum(_acc_zeros(1, BLOCK_N, part_b_ptr), axis=0)
    acc_g = tl.sum(_acc_zeros(1, BLOCK_N, part_g_ptr), axis=0)
    if pid_n * BLOCK_N < n_cnt:
        m_start = pid_s * rows_per_split
        m_end = tl.minimum(m_start + rows_per_split, M)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            msk = (offs_m < m_end)[:, None] & act_p[None, :]
            om = _off(offs_m, IDX64)
            d = _load_tile(dy_ptr + (om[:, None] * stride_dm + col[None, :] * stride_dn), msk, True)
            d = d.to(acc_b.dtype)
            if NEED_B:
                acc_b += tl.sum(d, axis=0)
            if NEED_G:
                yv = _load_tile(y_ptr + (om[:, None] * stride_ym + col[None, :] * stride_yn), msk, True)
                acc_g += tl.sum(d * yv.to(acc_g.dtype), axis=0)
    if NEED_B:
        tl.store(part_b_ptr + (pid_s * stride_ps + col), acc_b, mask=valid_p)
    if NEED_G:
        tl.store(part_g_ptr + (pid_s * stride_ps + col), acc_g, mask=valid_p)


# --------------------------------------------------------------------------------------------
# Autotuning (compiled kernels only). Keys are the *full* sizes, a power-of-two bucket of the
# token count, the route and the specialisation flags: never an active count, never a pattern.
# The launcher tunes each key once on a representative sparse pattern (``_launch``), so the
# configuration is not chosen on whatever pattern the first call happens to have.
# --------------------------------------------------------------------------------------------

GMM_FULL_KEY = ["M_BUCKET", "N_FULL", "K_FULL", "ROUTE", "HAS_LORA", "HAS_AUX", "DOT_PREC"]
GMM_COMPACT_KEY = ["M_BUCKET", "N_FULL", "K_KEY", "ROUTE", "N_SCATTER", "B_ROW_GATHER", "HAS_LORA", "HAS_AUX",
                   "DOT_PREC"]
MTM_KEY = ["M_BUCKET", "P_FULL", "Q_FULL", "ROUTE", "P_SCATTER", "Q_SCATTER", "DOT_PREC"]

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The compile check builds every one
# (--all-configs): 128x128 tiles need 8 warps and 128x256 tiles are left out, because the scattered
# epilogue (one 64-bit address per output element) then spills on sm_90.
GMM_CONFIGS = (
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
)
MTM_CONFIGS = (
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
)


# Estimated operand staging (num_stages x both tiles) allowed per config: within the A100's 164 KiB
# of shared memory per block (Hopper: 227 KiB); larger float32 stagings also spill registers on sm_90.
SHARED_BUDGET = 160 * 1024


def _configs(block_names, table, group_name):
    return [triton.Config({block_names[0]: b0, block_names[1]: b1, block_names[2]: bk, group_name: 8},
                          num_warps=w, num_stages=s) for b0, b1, bk, w, s in table]


def fits_shared(b0: int, b1: int, bk: int, stages: int, elem_bytes: int) -> bool:
    """Whether a config's operand staging (stages x both tiles) stays within SHARED_BUDGET."""
    return stages * (b0 + b1) * bk * elem_bytes <= SHARED_BUDGET


def _fitting(block_names):
    """early_config_prune: drops the configs that do not fit ``fits_shared`` for the launch's
    element size (float32 tiles are twice the bytes of bfloat16 ones)."""

    def prune(configs, nargs, **kwargs):
        a = kwargs.get("a_ptr", nargs.get("a_ptr"))
        elem = a.element_size() if hasattr(a, "element_size") else 2
        fit = [c for c in configs if fits_shared(c.kwargs[block_names[0]], c.kwargs[block_names[1]],
                                                 c.kwargs[block_names[2]], c.num_stages, elem)]
        return fit or configs[-1:]

    return prune


# Smallest BLOCK_M of any gmm config: sizes the column-gate partial-sum buffer.
GMM_MIN_BLOCK_M = min(c[0] for c in GMM_CONFIGS) if AUTOTUNE else 16

if AUTOTUNE:
    # part_ptr collects per-tile partial sums; benchmarking several BLOCK_M must not leave rows of
    # another config behind, hence reset_to_zero (our kernels never read what they write, so the
    # repeated benchmark launches are otherwise harmless).
    _gmm_blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    _mtm_blocks = ("BLOCK_P", "BLOCK_Q", "BLOCK_K")
    _gmm_tuning = dict(configs=_configs(_gmm_blocks, GMM_CONFIGS, "GROUP_M"),
                       prune_configs_by={"early_config_prune": _fitting(_gmm_blocks)}, reset_to_zero=["part_ptr"])
    gmm_full_kernel = triton.autotune(key=GMM_FULL_KEY, **_gmm_tuning)(gmm_full_kernel)
    gmm_compact_kernel = triton.autotune(key=GMM_COMPACT_KEY, **_gmm_tuning)(gmm_compact_kernel)
    mtm_kernel = triton.autotune(configs=_configs(_mtm_blocks, MTM_CONFIGS, "GROUP_P"), key=MTM_KEY,
                                 prune_configs_by={"early_config_prune": _fitting(_mtm_blocks)})(mtm_kernel)
