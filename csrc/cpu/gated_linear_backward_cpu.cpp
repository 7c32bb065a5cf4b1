// CPU kernel of fg::gated_linear_backward. With dyr = dy[:, R], the gate-folded block
// Wf = g_r W[R][:, C] g_c that the forward used (weight_cache.h: usually still cached), and the
// LoRA factors folded the same way, Af = A[:, C] g_c and Bf = g_r B[R], v = dyr Bf:
//   db[R] = g_r sum_m dyr,  dgr[R] = sum_m dyr y[:, R] / g_r                     (one pass over dy)
//   dx[:, C] = dyr @ Wf + s v Af,  dgc[C] = sum_m dx[:, C] x[:, C] / g_c
//   dW[R][:, C] = g_r dyr^T (x[:, C] g_c),  dB[R] = s g_r dyr^T (x[:, C] Af^T),  dA[:, C] = s v^T x[:, C] g_c
// (where the forward folded the LoRA term into its block, fold_lora, dx reads Wf + s Bf Af as one.)
// (dh = dy[:, R] g_r in the usual notation: the gates move onto the small operands). Removed rows
// and columns are never read, multiplied or written except as zeros of the result (or, in a set kept
// whole, as zero gates: gate_set).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "../checks.h"
#include "column_sums.h"
#include "compact_gemm.h"
#include "ops_cpu.h"
#include "trace.h"
#include "weight_cache.h"

namespace fg {
namespace cpu {
namespace {

// Runs body(begin, end) over rows [0, n) in parallel, or inline when already inside a parallel
// region (for_token_blocks): a nested at::parallel_for runs with thread number 0 on every thread
// of the region, so ColumnSums::local() would hand them all the same slot.
template <typename F>
void for_rows(int64_t n, int64_t grain, const F& body) {
  if (at::in_parallel_region()) {
    body(0, n);
  } else {
    at::parallel_for(0, n, grain, body);
  }
}

// Per-thread accumulators for column sums over tokens, reduced in double at the end. Fill them
// from for_rows (each thread's slot is picked by its thread number). Float rows go through a float
// stage flushed every kFlushRows rows (column_sums.h); other dtypes add in double directly.
class ColumnSums {
 public:
  explicit ColumnSums(int64_t n)
      : n_(n),
        threads_(at::get_num_threads()),
        acc_(static_cast<size_t>(threads_ * n), 0.0),
        stage_(static_cast<size_t>(threads_ * n), 0.0f),
        staged_(static_cast<size_t>(threads_), 0) {}

  // acc[j] += a[j] * b[j] (b may be null: acc[j] += a[j]) on the calling thread's slot.
  template <typename scalar_t>
  void add(const scalar_t* a, const scalar_t* b) {
    const int64_t t = at::get_thread_num();
    double* acc = acc_.data() + t * n_;
    if constexpr (std::is_same<scalar_t, float>::value) {
      float* stage = stage_.data() + t * n_;
      add_products(stage, a, b, n_);
      if (++staged_[t] == kFlushRows) {
        flush_stage(acc, stage, n_);
        staged_[t] = 0;
      }
    } else {
      for (int64_t j = 0; j < n_; ++j)
        acc[j] += b ? static_cast<double>(a[j]) * static_cast<double>(b[j]) : static_cast<double>(a[j]);
    }
  }

  // The sums, each multiplied (or divided, with `divide`) by gate[i] when `gate` is non-empty,
  // written into out[idx[i]] of a zero (full,) tensor of dtype `opt`. The sums are over the active
  // entries, or over the whole dimension when they were built `full_width` (then only the active
  // ones are read).
  at::Tensor finish(const Active& idx, const Scale& gate, bool divide, const at::TensorOptions& opt,
                    bool full_width = false) {
    std::vector<double> total(n_, 0.0);
    for (int64_t t = 0; t < threads_; ++t) {
      flush_stage(acc_.data() + t * n_, stage_.data() + t * n_, n_);
      for (int64_t i = 0; i < n_; ++i) total[i] += acc_[t * n_ + i];
    }
    at::Tensor full = at::zeros({idx.full}, opt.dtype(at::kDouble));
    double* f = full.data_ptr<double>();
    for (int64_t i = 0; i < idx.size(); ++i) {
      const int64_t at = idx.all ? i : idx.idx[i];
      double v = total[full_width ? at : i];
      // A zero gate (a closed entry of a set kept whole) gets no gradient, and its sum is 0 / 0.
      if (!gate.empty()) v = gate[i] == 0.0 ? 0.0 : divide ? v / gate[i] : v * gate[i];
      f[at] = v;
    }
    return full.to(opt.dtype());
  }

 private:
  int64_t n_, threads_;
  std::vector<double> acc_;
  std::vector<float> stage_;
  std::vector<int64_t> staged_;
};

// What every gradient reads, prepared once per call.
struct Inputs {
  at::Tensor dy;  // (M, N), contiguous
  at::Tensor x2;  // (M, K) with unit inner stride, or undefined when no gradient reads x
  GateSet rows, cols;
  LoraTerm lora;  // gate-folded LoRA factors (undefined without LoRA or active block), folded as the forward's
  at::Tensor v;   // dyr B_f (M, r): what dx and dA read of the LoRA term
  // x[:, C] (M, |C| padded, zero padding) for the weight and LoRA gradients, written by the
  // column-gate pass as it reads those columns anyway (undefined when nothing needs it or every
  // column is active: x2 itself serves then).
  at::Tensor xu;
  bool xu_filled = false;
  int64_t M = 0, r = 0;
  at::TensorOptions opt;
  Workspace* ws = nullptr;  // where the call's temporaries live (dyr, xu, the compact dx)
  int64_t n_rows() const { return rows.active.size(); }
  int64_t n_cols() const { return cols.active.size(); }
  bool empty_block() const { return n_rows() == 0 || n_cols() == 0 || M == 0; }
};

// One pass over dy: dyr = dy[:, R] in a compact (M, |R| padded) buffer (dy itself when every row
// is open), and the column sums of the bias and row-gate gradients.
struct RowPass {
  at::Tensor dyr, db, dgr;
};

RowPass row_pass(const Inputs& in, const c10::optional<at::Tensor>& output, const at::Tensor& row_gate,
                 bool need_dyr, bool need_db, bool need_dgr) {
  const Active& rows = in.rows.active;
  const int64_t N = rows.full, nR = in.n_rows(), ldh = rows.padded(), M = in.M;
  FG_TRACE("fg::cpu::row_pass");
  const bool pack = need_dyr && !rows.all;
  RowPass out;
  if (need_dyr) out.dyr = rows.all ? in.dy : in.ws->empty({M, ldh}, in.opt);
  // The row-gate sums run over all N columns of dy and y as they lie: a contiguous pass reads the
  // same cache lines as a gather of the active ones and skips packing y's active entries.
  ColumnSums bias_sums(need_db ? nR : 0), gate_sums(need_dgr ? N : 0);
  const at::Tensor y2 = need_dgr ? as_rows(*output, N).contiguous() : at::Tensor();
  if (nR > 0 && M > 0 && (pack || need_db || need_dgr)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.dy.scalar_type(), "fg_backward_rows", [&] {
      const scalar_t* dy = in.dy.data_ptr<scalar_t>();
      const scalar_t* y = need_dgr ? y2.data_ptr<scalar_t>() : nullptr;
      scalar_t* dyr_out = pack ? out.dyr.data_ptr<scalar_t>() : nullptr;
      for_rows(M, row_grain(N), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> dy_buf(rows.all || pack || !need_db ? 0 : nR);
        for (int64_t m = begin; m < end; ++m) {
          if (need_dgr) gate_sums.add<scalar_t>(dy + m * N, y + m * N);
          if (!pack && !need_db) continue;
          // dy[m, R] as a contiguous row.
          const scalar_t* dyr = dy + m * N;
          if (!rows.all) {
            scalar_t* dst = pack ? dyr_out + m * ldh : dy_buf.data();
            pack_cols(dyr, rows, dst);
            if (pack) std::fill(dst + nR, dst + ldh, scalar_t(0));
            dyr = dst;
          }
          if (need_db) bias_sums.add<scalar_t>(dyr, nullptr);
        }
      });
    });
  }
  // d(row_gate)[i] = sum_m dy * z with z = y / g_r (the pre-gate output), divided once at the end.
  if (need_db) out.db = bias_sums.finish(rows, in.rows.values, /*divide=*/false, in.opt);
  if (need_dgr)
    out.dgr = gate_sums.finish(rows, in.rows.values, /*divide=*/true, row_gate.options(), /*full_width=*/true);
  return out;
}

// sum_m dx[m, C[j]] * x[m, C[j]] of one block of tokens starting at m0 into `sums` (dxs compact);
// the gathered rows of x go into in.xu where it is defined.
void add_col_gate_sums(const at::Tensor& dxs, const Inputs& in, int64_t m0, ColumnSums& sums) {
  FG_TRACE("fg::cpu::col_gate_sums");
  const Active& cols = in.cols.active;
  const int64_t nC = in.n_cols(), ldc = dxs.stride(0), mb = dxs.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.dy.scalar_type(), "fg_backward_colgate", [&] {
    const scalar_t* d = dxs.data_ptr<scalar_t>();
    const scalar_t* xv = in.x2.data_ptr<scalar_t>();
    const int64_t ldx = in.x2.stride(0), ldu = cols.padded();
    scalar_t* xu = in.xu.defined() ? in.xu.data_ptr<scalar_t>() : nullptr;
    for_rows(mb, row_grain(cols.full), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> x_buf(cols.all || xu ? 0 : static_cast<size_t>(nC));
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* xrow = xv + (m0 + m) * ldx;
        if (!cols.all) {
          scalar_t* dst = xu ? xu + (m0 + m) * ldu : x_buf.data();
          pack_cols(xrow, cols, dst);
          if (xu) std::fill(dst + nC, dst + ldu, scalar_t(0));
          xrow = dst;
        }
        sums.add<scalar_t>(d + m * ldc, xrow);
      }
    });
  });
}

// dx[:, C] = dyr @ Wf + s (dyr Bf) Af, zeros elsewhere, per block of tokens (for_token_blocks) so
// that the compact block is still in cache for the scatter; fused with the column-gate sums.
void input_and_col_gate_grads(const Inputs& in, const at::Tensor& weight, const at::Tensor& dyr, at::Tensor* dx,
                              at::Tensor* dgc, const at::Tensor& col_gate) {
  const Active& cols = in.cols.active;
  ColumnSums col_sums(dgc ? in.n_cols() : 0);
  if (in.empty_block()) {
    if (dx) dx->zero_();
  } else {
    FG_TRACE("fg::cpu::dx");
    const at::Tensor wf = folded_block(weight, in.rows, in.cols, Reuse::kSameStep, in.lora.fold ? &in.lora : nullptr);
    const int64_t M = in.M;
    at::Tensor dx2 = dx ? dx->view({M, cols.full}) : at::Tensor();
    const bool low_rank = in.lora.defined() && !in.lora.fold;
    for_token_blocks(M, token_block(M), [&](int64_t m0, int64_t mb) {
      const at::Tensor dyb = mb == M ? dyr : dyr.narrow(0, m0, mb);
      // Every column active: the GEMM writes dx itself, there is nothing to scatter.
      const bool direct = dx && cols.all;
      at::Tensor dxb = dx ? (mb == M ? dx2 : dx2.narrow(0, m0, mb)) : at::Tensor();
      Workspace block_ws;  // the compact dx of this block, reused by the thread's next block
      at::Tensor dxs = direct ? dxb : block_ws.empty({mb, wf.size(1)}, in.opt);
      at::mm_out(dxs, dyb, wf);
      if (low_rank) dxs.addmm_(mb == M ? in.v : in.v.narrow(0, m0, mb), in.lora.a_f, 1.0, in.lora.scale);
      if (dx && !direct) {
        FG_TRACE("fg::cpu::scatter_dx");
        scatter_cols(dxs, cols, {}, dxb);
      }
      if (dgc) add_col_gate_sums(dxs, in, m0, col_sums);
    });
  }
  if (dgc) *dgc = col_sums.finish(cols, in.cols.values, /*divide=*/true, col_gate.options());
}

// Whether the weight and LoRA gradients read a gathered x[:, C] that the column-gate pass can write
// on its way (it reads those columns of every token anyway).
bool share_x_gather(const Inputs& in, bool need_dgc, bool need_wl) {
  return need_dgc && need_wl && !in.empty_block() && !in.cols.active.all;
}

// diag(row) t diag(col) in place on the leading block of the 2-D t (an empty scale = 1).
void scale_block_(const at::Tensor& t, const Scale& row, const Scale& col) {
  auto as_tensor = [&](const Scale& g) {
    return at::tensor(g.values(), t.options().dtype(at::kDouble)).to(t.scalar_type());
  };
  if (!row.empty()) t.narrow(0, 0, row.size()).mul_(as_tensor(row).unsqueeze(1));
  if (!col.empty()) t.narrow(1, 0, col.size()).mul_(as_tensor(col).unsqueeze(0));
}

// dW, dA and dB on the active block only (zeros elsewhere), all from one x_u = x[:, C] (x itself
// when every column is active), the gates applied to the small results:
// dW = g_r (dyr^T x_u) g_c, dA = s (v^T x_u) g_c, dB = s g_r dyr^T (x_u A_f^T).
void weight_and_lora_grads(const Inputs& in, const at::Tensor& dyr, int64_t N, int64_t K, at::Tensor* dw,
                           at::Tensor* da, at::Tensor* dlb) {
  const Active& rows = in.rows.active;
  const Active& cols = in.cols.active;
  FG_TRACE("fg::cpu::weight_lora_grads");
  const Active all_r{{}, in.r, true};
  const bool empty = in.empty_block();
  const at::Tensor xu = empty         ? at::Tensor()
                        : cols.all    ? in.x2
                        : in.xu_filled ? in.xu
                                       : gather_cols(in.x2, cols, {}, in.ws);
  if (dw) {
    at::Tensor block = empty ? at::Tensor() : at::mm(dyr.t(), xu);
    if (!empty) scale_block_(block, in.rows.values, in.cols.values);
    if (!empty && rows.all && cols.all) {
      *dw = block;
    } else {
      *dw = at::zeros({N, K}, in.opt);
      if (!empty) scatter_rows_cols(block, rows, cols, *dw);
    }
  }
  if (dlb) {
    *dlb = at::zeros({N, in.r}, in.opt);
    if (!empty) {
      // (t^T dyr)^T rather than dyr^T t: the BLAS runs the skinny product 2.5-4x faster this way
      // round (the reduction over tokens on the long side of both operands).
      const at::Tensor t = at::mm(xu, in.lora.a_f.t());
      at::Tensor block = at::mm(t.t(), dyr).mul_(in.lora.scale).t();
      scale_block_(block, in.rows.values, {});
      scatter_rows_cols(block, rows, all_r, *dlb);
    }
  }
  if (da) {
    *da = at::zeros({in.r, K}, in.opt);
    if (!empty) {
      at::Tensor block = at::mm(in.v.t(), xu).mul_(in.lora.scale);
      scale_block_(block, {}, in.cols.values);
      scatter_rows_cols(block, all_r, cols, *da);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_linear_backward_cpu(const at::Tensor& grad_out, const c10::optional<at::Tensor>& x_opt,
                          const at::Tensor& weight, const at::Tensor& row_gate, const at::Tensor& col_gate,
                          const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b,
                          double lora_scale, const c10::optional<at::Tensor>& output, std::array<bool, 7> mask) {
  check_gated_linear_backward_args(grad_out, x_opt, weight, row_gate, col_gate, lora_a, lora_b, output, mask);
  const int64_t N = weight.size(0), K = weight.size(1);
  const bool lora = lora_a.has_value();
  const bool need_dx = mask[0], need_dw = mask[1], need_db = mask[2], need_dgr = mask[3], need_dgc = mask[4],
             need_da = mask[5] && lora, need_dlb = mask[6] && lora;

  FG_TRACE("fg::cpu::backward");
  Workspace ws;  // outlives every temporary below
  Inputs in;
  in.ws = &ws;
  in.opt = weight.options();
  in.dy = as_rows(grad_out, N).contiguous();
  in.M = in.dy.size(0);
  if (need_dgc || need_dw || need_da || need_dlb) in.x2 = as_rows(*x_opt, K);
  in.rows = gate_set(row_gate);
  in.cols = gate_set(col_gate);
  exact_if_nonfinite(in.rows, row_gate, in.dy);  // closed rows and columns pass no gradient, inf or not
  exact_if_nonfinite(in.cols, col_gate, in.x2);
  pad_for_gemm(in.rows.active);
  pad_for_gemm(in.cols.active);
  in.r = lora ? lora_a->size(0) : 0;
  in.lora = lora_term(lora_a, lora_b, lora_scale, in.rows, in.cols, in.M);

  // An unselected gradient is an empty (0,) tensor of its slot's dtype (as the fake kernel says).
  at::Tensor dx = at::empty({0}, in.opt), dw = dx, db = dx, da = dx, dlb = dx;
  at::Tensor dgr = at::empty({0}, row_gate.options()), dgc = at::empty({0}, col_gate.options());
  const bool need_dyr = need_dx || need_dgc || need_dw || need_da || need_dlb;
  RowPass rp = row_pass(in, output, row_gate, need_dyr, need_db, need_dgr);
  if (in.lora.defined() && in.M > 0 && ((!in.lora.fold && (need_dx || need_dgc)) || need_da))
    in.v = at::mm(rp.dyr, in.lora.b_f);
  if (need_db) db = rp.db;
  if (need_dgr) dgr = rp.dgr;
  if (need_dx) dx = at::empty(out_shape(grad_out, K), in.opt);
  const bool need_wl = need_dw || need_da || need_dlb;
  if (share_x_gather(in, need_dgc, need_wl)) in.xu = ws.empty({in.M, in.cols.active.padded()}, in.opt);
  if (need_dx || need_dgc)
    input_and_col_gate_grads(in, weight, rp.dyr, need_dx ? &dx : nullptr, need_dgc ? &dgc : nullptr, col_gate);
  in.xu_filled = in.xu.defined();
  if (need_wl)
    weight_and_lora_grads(in, rp.dyr, N, K, need_dw ? &dw : nullptr, need_da ? &da : nullptr,
                          need_dlb ? &dlb : nullptr);
  return {dx, dw, db, dgr, dgc, da, dlb};
}

}  // namespace cpu
}  // namespace fg
