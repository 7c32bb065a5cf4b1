"""Triton kernels of the ``fg`` ops. Never imported directly: ``_launch.kernels(interpret)`` loads
this file as a module instance, compiled (``@triton.jit`` -> JITFunction) or for the interpreter
(``TRITON_INTERPRET=1`` -> InterpretedFunction), because ``triton.jit`` decides which at
decoration time. (triton's own ``tl.*`` helpers are decorated once, when triton is imported, so a
process can in practice run only the mode it imported triton in; ``_launch`` checks that.)

Conventions shared by every kernel:

* A *gate order* is a permutation of ``0..n-1`` listing the active (non-zero) entries first, in
  increasing order, then the inactive ones; its *count* (a 1-element int32 device tensor) is the
  number of active entries and its *values* (float32) are the gate values in that order, 0 for the
  inactive ones. ``gate_meta_kernel`` builds them on the device, so nothing here ever waits for the
  host: the sparsity pattern, the counts and the orders are runtime data, never ``tl.constexpr``,
  and a new pattern never compiles anything.
* Grids cover the *full* output (every position of a gate order, active or not). A tile whose
  positions are all inactive only writes zeros; a tile that straddles the count masks. Inactive
  outputs are therefore written exactly once, as zeros, by the same launch, without a separate
  memset pass.
* When a count equals the full size (no gate is zero), the order is the identity: the kernels
  check that at runtime and then run a copy of the main loop that indexes directly (contiguous,
  vectorisable loads, which the compiler pipelines with cp.async on sm_80/sm_90) instead of
  through the index list. Loads through an index list are scalar (cp.async and TMA cannot gather
  single columns), so the gathered copy software-pipelines by hand: indices two steps ahead,
  data one step ahead, in half-depth steps to stay within the register file.
* Only the reduction dimension is masked inside the main loops: rows past M are clamped and
  inactive gathered positions read index 0 (valid memory); both are discarded in the epilogue.
* Accumulation is float32 (float64 for float64 operands, whose products run on the FMA units:
  ``tl.dot`` has no float64 tensor-core path); ``tl.dot`` takes ``DOT_PREC`` ("ieee" or "tf32")
  for float32 inputs. Gate values are float32 (float64 in a float64 computation).
"""

import os

import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
# Autotune only compiled kernels, and let users switch it off (fixed heuristic configs instead).
AUTOTUNE = (not INTERPRET) and os.environ.get("FG_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no")


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
# Gathered GEMM with fused epilogue:
#   for output positions p < n_cnt (n-order) and tokens m:
#     pre[m, p] = sum_{k < k_cnt} (A[m, acol(k)] * kval[k]) * B[brow(p), bcol(k)]
#                 + (T[m, :] @ LB[brow(p), :])          (HAS_LORA)
#                 + bias[brow(p)]                       (HAS_BIAS)
#     out[m, ocol(p)] = alpha * nval[p] * pre[m, p]      (STORE_OUT; 0 for p >= n_cnt)
#     part[pid_m, ocol(p)] = sum_m pre[m, p] * X[m, ocol(p)]   (HAS_AUX; column-gate gradient)
#   acol/bcol = k_idx[k] or k, brow = n_brow[p] or p, ocol = n_out[p] or p.
# Offsets are int32 unless IDX64 (the host sets it when a tensor spans 2**31 elements or more).
# Rows past M and inactive positions read a valid row (clamped / index 0) instead of being
# masked, and are discarded in the epilogue: only the reduction dimension is masked in the loop.
# --------------------------------------------------------------------------------------------


@triton.jit
def _off(i, IDX64: tl.constexpr):
    if IDX64:
        o = i.to(tl.int64)
    else:
        o = i
    return o


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
def _gmm_kidx(k_idx_ptr, k_cnt, k0, GATHER: tl.constexpr, BLOCK_K: tl.constexpr):
    """Column indices of reduction positions k0 .. k0 + BLOCK_K (0 past k_cnt)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if GATHER:
        kidx = tl.load(k_idx_ptr + offs_k, mask=offs_k < k_cnt, other=0)
    else:
        kidx = offs_k
    return kidx


@triton.jit
def _gmm_load(a_ptr, a_row, stride_ak, b_ptr, b_row, b_row_ok, stride_bk, kidx, k_val_ptr, k_cnt, k0,
              A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, B_ROW_MASK: tl.constexpr, HAS_KVAL: tl.constexpr,
              IDX64: tl.constexpr, BLOCK_K: tl.constexpr):
    """Raw (A, gate values, B) tiles of reduction positions k0 .. k0 + BLOCK_K (zeros past
    k_cnt). a_row / b_row: row offsets of the A rows / B rows of the tile."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mk = offs_k < k_cnt
    if A_GATHER:
        acol = _off(kidx, IDX64)
    else:
        acol = _off(offs_k, IDX64)
    if B_GATHER:
        bcol = _off(kidx, IDX64)
    else:
        bcol = _off(offs_k, IDX64)
    a = tl.load(a_ptr + (a_row[:, None] + acol[None, :] * stride_ak), mask=mk[None, :], other=0.0)
    if HAS_KVAL:
        kv = tl.load(k_val_ptr + offs_k, mask=mk, other=0.0)
    else:
        kv = tl.full((BLOCK_K,), 1.0, dtype=tl.float32)
    if B_ROW_MASK:
        b = tl.load(b_ptr + (b_row[None, :] + bcol[:, None] * stride_bk), mask=mk[:, None] & b_row_ok[None, :],
                    other=0.0)
    else:
        b = tl.load(b_ptr + (b_row[None, :] + bcol[:, None] * stride_bk), mask=mk[:, None], other=0.0)
    return a, kv, b


@triton.jit
def _scale_cols(a, kv, HAS_KVAL: tl.constexpr):
    """The column gate on the A tile (product in the gate values' precision, rounded once to A's dtype)."""
    if HAS_KVAL:
        a = (a.to(kv.dtype) * kv[None, :]).to(a.dtype)
    return a


@triton.jit
def _gmm_tile(
    pid_m, pid_n,
    a_ptr, stride_am, stride_ak,
    b_ptr, stride_bn, stride_bk,
    out_ptr, stride_om, stride_on,
    k_idx_ptr, k_val_ptr, k_cnt,
    n_out_ptr, n_brow_ptr, n_val_ptr, n_cnt,
    bias_ptr,
    t_ptr, stride_tm, stride_tr,
    lb_ptr, stride_lbn, stride_lbr, r_lora,
    aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm,
    M, N_FULL, alpha,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, N_GATHER: tl.constexpr,
    HAS_KVAL: tl.constexpr, HAS_NVAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_AUX: tl.constexpr, STORE_OUT: tl.constexpr,
    IDX64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    act_p = offs_p < n_cnt
    valid_p = offs_p < N_FULL
    if N_GATHER:
        # Inactive positions read row 0 (valid memory) and are discarded in the epilogue.
        brow = tl.load(n_brow_ptr + offs_p, mask=act_p, other=0)
    else:
        # Direct rows keep their contiguity (B may be a transposed view): masked instead.
        brow = offs_p
    rows = _off(tl.minimum(offs_m, M - 1), IDX64)
    a_row = rows * stride_am
    b_row = _off(brow, IDX64) * stride_bn
    acc = _acc_zeros(BLOCK_M, BLOCK_N, a_ptr)
    if A_GATHER or B_GATHER:
        # Loads through an index list are scalar (no cp.async / TMA), so the compiler's pipeliner
        # does not stage them; software-pipeline by hand instead: the indices of tile i+2 and the
        # data of tile i+1 are in flight while tile i multiplies, in half-depth steps (the
        # per-element pointers and prefetched tiles of a full step spill registers on sm_90).
        BK_G: tl.constexpr = BLOCK_K // 2 if BLOCK_K >= 32 else BLOCK_K
        kidx = _gmm_kidx(k_idx_ptr, k_cnt, 0, True, BK_G)
        a, kv, b = _gmm_load(a_ptr, a_row, stride_ak, b_ptr, b_row, act_p, stride_bk, kidx, k_val_ptr, k_cnt, 0,
                             A_GATHER, B_GATHER, not N_GATHER, HAS_KVAL, IDX64, BK_G)
        kidx = _gmm_kidx(k_idx_ptr, k_cnt, BK_G, True, BK_G)
        for k0 in range(0, k_cnt, BK_G):
            a_nxt, kv_nxt, b_nxt = _gmm_load(a_ptr, a_row, stride_ak, b_ptr, b_row, act_p, stride_bk, kidx,
                                             k_val_ptr, k_cnt, k0 + BK_G, A_GATHER, B_GATHER, not N_GATHER,
                                             HAS_KVAL, IDX64, BK_G)
            kidx = _gmm_kidx(k_idx_ptr, k_cnt, k0 + 2 * BK_G, True, BK_G)
            acc = _dot(_scale_cols(a, kv, HAS_KVAL), b, acc, DOT_PREC)
            a = a_nxt
            kv = kv_nxt
            b = b_nxt
    else:
        # Direct indexing (contiguous, vectorised loads): the compiler pipelines this loop. In the
        # identity case the caller passes k_cnt = K_FULL, whose divisibility the compiler knows,
        # so the mask stays uniform over vectors.
        for k0 in range(0, k_cnt, BLOCK_K):
            kidx = _gmm_kidx(k_idx_ptr, k_cnt, k0, False, BLOCK_K)
            a, kv, b = _gmm_load(a_ptr, a_row, stride_ak, b_ptr, b_row, act_p, stride_bk, kidx, k_val_ptr, k_cnt,
                                 k0, False, False, not N_GATHER, HAS_KVAL, IDX64, BLOCK_K)
            acc = _dot(_scale_cols(a, kv, HAS_KVAL), b, acc, DOT_PREC)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        mr = offs_r < r_lora
        t = tl.load(t_ptr + (rows[:, None] * stride_tm + offs_r[None, :] * stride_tr), mask=mr[None, :], other=0.0)
        lb = tl.load(lb_ptr + (_off(brow, IDX64)[None, :] * stride_lbn + offs_r[:, None] * stride_lbr),
                     mask=mr[:, None] & act_p[None, :], other=0.0)
        acc = _dot(t, lb, acc, DOT_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + brow, mask=act_p, other=0.0).to(acc.dtype)
        acc = acc + bias[None, :]
    if N_GATHER:
        ocol = _off(tl.load(n_out_ptr + offs_p, mask=valid_p, other=0), IDX64)
    else:
        ocol = _off(offs_p, IDX64)
    orow = _off(offs_m, IDX64)
    if HAS_AUX:
        xa = tl.load(aux_ptr + (orow[:, None] * stride_xm + ocol[None, :] * stride_xk),
                     mask=mask_m[:, None] & act_p[None, :], other=0.0).to(acc.dtype)
        part = tl.sum(tl.where(mask_m[:, None] & act_p[None, :], acc * xa, 0.0), axis=0)
        tl.store(part_ptr + (pid_m * stride_pm + ocol), part, mask=valid_p)
    if STORE_OUT:
        res = acc * alpha
        if HAS_NVAL:
            nv = tl.load(n_val_ptr + offs_p, mask=act_p, other=0.0)
            res = res * nv[None, :]
        res = tl.where(act_p[None, :], res, 0.0)
        tl.store(out_ptr + (orow[:, None] * stride_om + ocol[None, :] * stride_on),
                 res.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & valid_p[None, :])


@triton.jit
def _gmm_zero_tile(
    pid_m, pid_n, out_ptr, stride_om, stride_on, n_out_ptr, part_ptr, stride_pm, M, N_FULL,
    N_GATHER: tl.constexpr, HAS_AUX: tl.constexpr, STORE_OUT: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_p = offs_p < N_FULL
    if N_GATHER:
        ocol = _off(tl.load(n_out_ptr + offs_p, mask=valid_p, other=0), IDX64)
    else:
        ocol = _off(offs_p, IDX64)
    if HAS_AUX:
        tl.store(part_ptr + (pid_m * stride_pm + ocol), tl.zeros([BLOCK_N], dtype=part_ptr.dtype.element_ty),
                 mask=valid_p)
    if STORE_OUT:
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + (_off(offs_m, IDX64)[:, None] * stride_om + ocol[None, :] * stride_on), zero,
                 mask=(offs_m < M)[:, None] & valid_p[None, :])


@triton.jit(do_not_specialize=["r_lora", "alpha"])
def gmm_kernel(
    a_ptr, stride_am, stride_ak,
    b_ptr, stride_bn, stride_bk,
    out_ptr, stride_om, stride_on,
    k_idx_ptr, k_val_ptr, k_cnt_ptr,
    n_out_ptr, n_brow_ptr, n_val_ptr, n_cnt_ptr,
    bias_ptr,
    t_ptr, stride_tm, stride_tr,
    lb_ptr, stride_lbn, stride_lbr, r_lora,
    aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm,
    M, N_FULL, K_FULL, alpha, M_BUCKET,
    K_GATHER_A: tl.constexpr, K_GATHER_B: tl.constexpr, K_DYN: tl.constexpr, K_IDENT_CHECK: tl.constexpr,
    N_GATHER: tl.constexpr, N_IDENT_CHECK: tl.constexpr,
    HAS_KVAL: tl.constexpr, HAS_NVAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_AUX: tl.constexpr, STORE_OUT: tl.constexpr,
    IDX64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid: cdiv(M, BLOCK_M) * cdiv(N_FULL, BLOCK_N) programs over *all* output positions.

    The reduction length k_cnt is read from k_cnt_ptr when K_DYN (a gate order's count), else it
    is K_FULL. n_cnt is read from n_cnt_ptr when N_GATHER, else every position is active.
    K_IDENT_CHECK / N_IDENT_CHECK: the order is a gate order, so count == full means identity,
    and the tile runs its direct-indexing copy (decided at runtime, compiled once).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_FULL, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    if N_GATHER:
        n_cnt = tl.load(n_cnt_ptr)
    else:
        n_cnt = N_FULL
    if K_DYN:
        k_cnt = tl.load(k_cnt_ptr)
    else:
        k_cnt = K_FULL

    if pid_n * BLOCK_N >= n_cnt:
        _gmm_zero_tile(pid_m, pid_n, out_ptr, stride_om, stride_on, n_out_ptr, part_ptr, stride_pm, M, N_FULL,
                       N_GATHER, HAS_AUX, STORE_OUT, IDX64, BLOCK_M, BLOCK_N)
    else:
        k_ident = False
        n_ident = False
        if K_IDENT_CHECK:
            k_ident = k_cnt == K_FULL
        if N_IDENT_CHECK:
            n_ident = n_cnt == N_FULL
        if k_ident and n_ident:
            _gmm_tile(pid_m, pid_n, a_ptr, stride_am, stride_ak, b_ptr, stride_bn, stride_bk,
                      out_ptr, stride_om, stride_on, k_idx_ptr, k_val_ptr, K_FULL,
                      n_out_ptr, n_brow_ptr, n_val_ptr, N_FULL, bias_ptr,
                      t_ptr, stride_tm, stride_tr, lb_ptr, stride_lbn, stride_lbr, r_lora,
                      aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm, M, N_FULL, alpha,
                      False, False, False,
                      HAS_KVAL, HAS_NVAL, HAS_BIAS, HAS_LORA, HAS_AUX, STORE_OUT, IDX64, DOT_PREC,
                      BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        elif k_ident:
            _gmm_tile(pid_m, pid_n, a_ptr, stride_am, stride_ak, b_ptr, stride_bn, stride_bk,
                      out_ptr, stride_om, stride_on, k_idx_ptr, k_val_ptr, K_FULL,
                      n_out_ptr, n_brow_ptr, n_val_ptr, n_cnt, bias_ptr,
                      t_ptr, stride_tm, stride_tr, lb_ptr, stride_lbn, stride_lbr, r_lora,
                      aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm, M, N_FULL, alpha,
                      False, False, N_GATHER,
                      HAS_KVAL, HAS_NVAL, HAS_BIAS, HAS_LORA, HAS_AUX, STORE_OUT, IDX64, DOT_PREC,
                      BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        elif n_ident:
            _gmm_tile(pid_m, pid_n, a_ptr, stride_am, stride_ak, b_ptr, stride_bn, stride_bk,
                      out_ptr, stride_om, stride_on, k_idx_ptr, k_val_ptr, k_cnt,
                      n_out_ptr, n_brow_ptr, n_val_ptr, N_FULL, bias_ptr,
                      t_ptr, stride_tm, stride_tr, lb_ptr, stride_lbn, stride_lbr, r_lora,
                      aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm, M, N_FULL, alpha,
                      K_GATHER_A, K_GATHER_B, False,
                      HAS_KVAL, HAS_NVAL, HAS_BIAS, HAS_LORA, HAS_AUX, STORE_OUT, IDX64, DOT_PREC,
                      BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        else:
            _gmm_tile(pid_m, pid_n, a_ptr, stride_am, stride_ak, b_ptr, stride_bn, stride_bk,
                      out_ptr, stride_om, stride_on, k_idx_ptr, k_val_ptr, k_cnt,
                      n_out_ptr, n_brow_ptr, n_val_ptr, n_cnt, bias_ptr,
                      t_ptr, stride_tm, stride_tr, lb_ptr, stride_lbn, stride_lbr, r_lora,
                      aux_ptr, stride_xm, stride_xk, part_ptr, stride_pm, M, N_FULL, alpha,
                      K_GATHER_A, K_GATHER_B, N_GATHER,
                      HAS_KVAL, HAS_NVAL, HAS_BIAS, HAS_LORA, HAS_AUX, STORE_OUT, IDX64, DOT_PREC,
                      BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)


# --------------------------------------------------------------------------------------------
# Token-reduction GEMM (weight-type gradients), full (P_FULL, Q_FULL) output with zeros:
#   out[pidx(p), qidx(q)] = alpha * pval[p] * qval[q] * sum_m A[m, pidx(p)] * B[m, qidx(q)]
#   for p < p_cnt and q < q_cnt, 0 for the other positions.
# --------------------------------------------------------------------------------------------


@triton.jit
def _mtm_load(a_ptr, a_col, a_ok, stride_am, b_ptr, b_col, b_ok, stride_bm, m0, M,
              A_MASK: tl.constexpr, B_MASK: tl.constexpr, IDX64: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile (positions x tokens) and B tile (tokens x positions); directly indexed positions are
    masked (a_ok / b_ok), gathered ones read a valid index and are discarded later."""
    offs_k = m0 + tl.arange(0, BLOCK_K)
    mk = offs_k < M
    ok = _off(offs_k, IDX64)
    if A_MASK:
        a = tl.load(a_ptr + (a_col[:, None] + ok[None, :] * stride_am), mask=a_ok[:, None] & mk[None, :], other=0.0)
    else:
        a = tl.load(a_ptr + (a_col[:, None] + ok[None, :] * stride_am), mask=mk[None, :], other=0.0)
    if B_MASK:
        b = tl.load(b_ptr + (b_col[None, :] + ok[:, None] * stride_bm), mask=mk[:, None] & b_ok[None, :], other=0.0)
    else:
        b = tl.load(b_ptr + (b_col[None, :] + ok[:, None] * stride_bm), mask=mk[:, None], other=0.0)
    return a, b


@triton.jit
def _mtm_tile(
    pid_p, pid_q,
    a_ptr, stride_am, stride_ap,
    b_ptr, stride_bm, stride_bq,
    out_ptr, stride_op, stride_oq,
    p_idx_ptr, p_val_ptr, p_cnt,
    q_idx_ptr, q_val_ptr, q_cnt,
    M, P_FULL, Q_FULL, alpha,
    P_GATHER: tl.constexpr, Q_GATHER: tl.constexpr, HAS_PVAL: tl.constexpr, HAS_QVAL: tl.constexpr,
    IDX64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    act_p = offs_p < p_cnt
    act_q = offs_q < q_cnt
    valid_p = offs_p < P_FULL
    valid_q = offs_q < Q_FULL
    if P_GATHER:
        pidx = _off(tl.load(p_idx_ptr + offs_p, mask=valid_p, other=0), IDX64)
    else:
        pidx = _off(offs_p, IDX64)
    if Q_GATHER:
        qidx = _off(tl.load(q_idx_ptr + offs_q, mask=valid_q, other=0), IDX64)
    else:
        qidx = _off(offs_q, IDX64)
    a_col = pidx * stride_ap
    b_col = qidx * stride_bq
    acc = _acc_zeros(BLOCK_P, BLOCK_Q, a_ptr)
    if P_GATHER or Q_GATHER:
        # Gathered (scalar) loads: prefetch the next tile into registers by hand, half-depth steps
        # (see _gmm_tile).
        BK_G: tl.constexpr = BLOCK_K // 2 if BLOCK_K >= 32 else BLOCK_K
        a, b = _mtm_load(a_ptr, a_col, act_p, stride_am, b_ptr, b_col, act_q, stride_bm, 0, M,
                         not P_GATHER, not Q_GATHER, IDX64, BK_G)
        for m0 in range(0, M, BK_G):
            a_nxt, b_nxt = _mtm_load(a_ptr, a_col, act_p, stride_am, b_ptr, b_col, act_q, stride_bm, m0 + BK_G,
                                     M, not P_GATHER, not Q_GATHER, IDX64, BK_G)
            acc = _dot(a, b, acc, DOT_PREC)
            a = a_nxt
            b = b_nxt
    else:
        for m0 in range(0, M, BLOCK_K):
            a, b = _mtm_load(a_ptr, a_col, act_p, stride_am, b_ptr, b_col, act_q, stride_bm, m0, M,
                             True, True, IDX64, BLOCK_K)
            acc = _dot(a, b, acc, DOT_PREC)
    acc = acc * alpha
    if HAS_PVAL:
        pv = tl.load(p_val_ptr + offs_p, mask=act_p, other=0.0)
        acc = acc * pv[:, None]
    if HAS_QVAL:
        qv = tl.load(q_val_ptr + offs_q, mask=act_q, other=0.0)
        acc = acc * qv[None, :]
    acc = tl.where(act_p[:, None] & act_q[None, :], acc, 0.0)
    tl.store(out_ptr + (pidx[:, None] * stride_op + qidx[None, :] * stride_oq),
             acc.to(out_ptr.dtype.element_ty), mask=valid_p[:, None] & valid_q[None, :])


@triton.jit(do_not_specialize=["alpha"])
def mtm_kernel(
    a_ptr, stride_am, stride_ap,
    b_ptr, stride_bm, stride_bq,
    out_ptr, stride_op, stride_oq,
    p_idx_ptr, p_val_ptr, p_cnt_ptr,
    q_idx_ptr, q_val_ptr, q_cnt_ptr,
    M, P_FULL, Q_FULL, alpha, M_BUCKET,
    P_GATHER: tl.constexpr, Q_GATHER: tl.constexpr, HAS_PVAL: tl.constexpr, HAS_QVAL: tl.constexpr,
    IDX64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_P: tl.constexpr,
):
    """Grid: cdiv(P_FULL, BLOCK_P) * cdiv(Q_FULL, BLOCK_Q) programs. A gathered side's order is a
    gate order (count from *_cnt_ptr, identity when the count is full: direct-indexing copy);
    a side that is not gathered is all active."""
    pid = tl.program_id(0)
    num_pid_p = tl.cdiv(P_FULL, BLOCK_P)
    num_pid_q = tl.cdiv(Q_FULL, BLOCK_Q)
    num_in_group = GROUP_P * num_pid_q
    group_id = pid // num_in_group
    first_p = group_id * GROUP_P
    group_size = tl.minimum(num_pid_p - first_p, GROUP_P)
    pid_p = first_p + ((pid % num_in_group) % group_size)
    pid_q = (pid % num_in_group) // group_size

    if P_GATHER:
        p_cnt = tl.load(p_cnt_ptr)
    else:
        p_cnt = P_FULL
    if Q_GATHER:
        q_cnt = tl.load(q_cnt_ptr)
    else:
        q_cnt = Q_FULL

    if (pid_p * BLOCK_P >= p_cnt) | (pid_q * BLOCK_Q >= q_cnt):
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        valid_p = offs_p < P_FULL
        valid_q = offs_q < Q_FULL
        if P_GATHER:
            pidx = _off(tl.load(p_idx_ptr + offs_p, mask=valid_p, other=0), IDX64)
        else:
            pidx = _off(offs_p, IDX64)
        if Q_GATHER:
            qidx = _off(tl.load(q_idx_ptr + offs_q, mask=valid_q, other=0), IDX64)
        else:
            qidx = _off(offs_q, IDX64)
        zero = tl.zeros((BLOCK_P, BLOCK_Q), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + (pidx[:, None] * stride_op + qidx[None, :] * stride_oq), zero,
                 mask=valid_p[:, None] & valid_q[None, :])
    else:
        p_ident = False
        q_ident = False
        if P_GATHER:
            p_ident = p_cnt == P_FULL
        if Q_GATHER:
            q_ident = q_cnt == Q_FULL
        if p_ident and q_ident:
            _mtm_tile(pid_p, pid_q, a_ptr, stride_am, stride_ap, b_ptr, stride_bm, stride_bq,
                      out_ptr, stride_op, stride_oq, p_idx_ptr, p_val_ptr, P_FULL,
                      q_idx_ptr, q_val_ptr, Q_FULL, M, P_FULL, Q_FULL, alpha,
                      False, False, HAS_PVAL, HAS_QVAL, IDX64, DOT_PREC, BLOCK_P, BLOCK_Q, BLOCK_K)
        elif p_ident:
            _mtm_tile(pid_p, pid_q, a_ptr, stride_am, stride_ap, b_ptr, stride_bm, stride_bq,
                      out_ptr, stride_op, stride_oq, p_idx_ptr, p_val_ptr, P_FULL,
                      q_idx_ptr, q_val_ptr, q_cnt, M, P_FULL, Q_FULL, alpha,
                      False, Q_GATHER, HAS_PVAL, HAS_QVAL, IDX64, DOT_PREC, BLOCK_P, BLOCK_Q, BLOCK_K)
        elif q_ident:
            _mtm_tile(pid_p, pid_q, a_ptr, stride_am, stride_ap, b_ptr, stride_bm, stride_bq,
                      out_ptr, stride_op, stride_oq, p_idx_ptr, p_val_ptr, p_cnt,
                      q_idx_ptr, q_val_ptr, Q_FULL, M, P_FULL, Q_FULL, alpha,
                      P_GATHER, False, HAS_PVAL, HAS_QVAL, IDX64, DOT_PREC, BLOCK_P, BLOCK_Q, BLOCK_K)
        else:
            _mtm_tile(pid_p, pid_q, a_ptr, stride_am, stride_ap, b_ptr, stride_bm, stride_bq,
                      out_ptr, stride_op, stride_oq, p_idx_ptr, p_val_ptr, p_cnt,
                      q_idx_ptr, q_val_ptr, q_cnt, M, P_FULL, Q_FULL, alpha,
                      P_GATHER, Q_GATHER, HAS_PVAL, HAS_QVAL, IDX64, DOT_PREC, BLOCK_P, BLOCK_Q, BLOCK_K)


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
            d = tl.load(dy_ptr + (om[:, None] * stride_dm + col[None, :] * stride_dn), mask=msk, other=0.0)
            d = d.to(acc_b.dtype)
            if NEED_B:
                acc_b += tl.sum(d, axis=0)
            if NEED_G:
                yv = tl.load(y_ptr + (om[:, None] * stride_ym + col[None, :] * stride_yn), mask=msk, other=0.0)
                acc_g += tl.sum(d * yv.to(acc_g.dtype), axis=0)
    if NEED_B:
        tl.store(part_b_ptr + (pid_s * stride_ps + col), acc_b, mask=valid_p)
    if NEED_G:
        tl.store(part_g_ptr + (pid_s * stride_ps + col), acc_g, mask=valid_p)


# --------------------------------------------------------------------------------------------
# Autotuning (compiled kernels only). Keys are the *full* sizes, a power-of-two bucket of the
# token count and the specialisation flags: never an active count, never a pattern.
# --------------------------------------------------------------------------------------------

GMM_KEY = ["M_BUCKET", "N_FULL", "K_FULL", "K_GATHER_A", "K_GATHER_B", "N_GATHER", "HAS_LORA", "HAS_AUX",
           "DOT_PREC"]
MTM_KEY = ["M_BUCKET", "P_FULL", "Q_FULL", "P_GATHER", "Q_GATHER", "DOT_PREC"]


def _gmm_configs():
    out = []
    for bm, bn, bk, w, s in (
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (128, 128, 32, 4, 4),
    ):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_warps=w, num_stages=s))
    return out


def _mtm_configs():
    out = []
    for bp, bq, bk, w, s in (
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (128, 128, 32, 4, 4),
    ):
        out.append(triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_K": bk, "GROUP_P": 8},
                                 num_warps=w, num_stages=s))
    return out


# Smallest BLOCK_M of any gmm config: sizes the column-gate partial-sum buffer.
GMM_MIN_BLOCK_M = 64 if AUTOTUNE else 16

if AUTOTUNE:
    # part_ptr collects per-tile partial sums; benchmarking several BLOCK_M must not leave rows of
    # another config behind, hence reset_to_zero (our kernels never read what they write, so the
    # repeated benchmark launches are otherwise harmless).
    gmm_kernel = triton.autotune(configs=_gmm_configs(), key=GMM_KEY, reset_to_zero=["part_ptr"])(gmm_kernel)
    mtm_kernel = triton.autotune(configs=_mtm_configs(), key=MTM_KEY)(mtm_kernel)
