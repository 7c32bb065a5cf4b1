// CPU kernel of fg::gated_linear_backward. With dyr = dy[:, R], the gate-folded block
// Wf = g_r W[R][:, C] g_c that the forward used (weight_cache.h: usually still cached), and the
// LoRA factors folded the same way, Af = A[:, C] g_c and Bf = g_r B[R]:
//   db[R] = g_r sum_m dyr,  dgr[R] = sum_m dyr y[:, R] / g_r                     (one pass over dy)
//   dx[:, C] = dyr @ Wf + s (dyr Bf) Af,  dgc[C] = sum_m dx[:, C] x[:, C] / g_c
//   dW[R][:, C] = g_r dyr^T (x[:, C] g_c),  dB[R] = s g_r dyr^T (x[:, C] Af^T),  dA[:, C] = s (dyr Bf)^T x[:, C] g_c
// (dh = dy[:, R] g_r in the usual notation: the gates move onto the small operands). Removed rows
// and columns are never read, multiplied or written except as zeros of the result.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../checks.h"
#include "compact_gemm.h"
#include "ops_cpu.h"
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
// from for_rows (each thread's slot is picked by its thread number).
class ColumnSums {
 public:
  explicit ColumnSums(int64_t n) : n_(n), acc_(static_cast<size_t>(at::get_num_threads() * n), 0.0) {}
  double* local() { return acc_.data() + at::get_thread_num() * n_; }
  // The sums, each multiplied (or divided, with `divide`) by gate[i] when `gate` is non-empty,
  // written into out[idx[i]] of a zero (full,) tensor of dtype `opt`.
  at::Tensor finish(const Active& idx, const Scale& gate, bool divide, const at::TensorOptions& opt) const {
    std::vector<double> total(n_, 0.0);
    const int64_t nt = static_cast<int64_t>(acc_.size()) / std::max<int64_t>(n_, 1);
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t i = 0; i < n_; ++i) total[i] += acc_[t * n_ + i];
    at::Tensor full = at::zeros({idx.full}, opt.dtype(at::kDouble));
    double* f = full.data_ptr<double>();
    for (int64_t i = 0; i < n_; ++i) {
      double v = total[i];
      if (!gate.empty()) v = divide ? v / gate[i] : v * gate[i];
      f[idx.all ? i : idx.idx[i]] = v;
    }
    return full.to(opt.dtype());
  }

 private:
  int64_t n_;
  std::vector<double> acc_;
};

// What every gradient reads, prepared once per call.
struct Inputs {
  at::Tensor dy;  // (M, N), contiguous
  at::Tensor x2;  // (M, K) with unit inner stride, or undefined when no gradient reads x
  GateSet rows, cols;
  at::Tensor a_f, b_f;  // folded LoRA factors (undefined without LoRA or active block)
  int64_t M = 0, r = 0;
  double lora_scale = 1.0;
  at::TensorOptions opt;
  int64_t n_rows() const { return rows.active.size(); }
  int64_t n_cols() const { return cols.active.size(); }
  bool empty_block() const { return n_rows() == 0 || n_cols() == 0 || M == 0; }
};

// t[i, :] *= gate[i] for the first gate.size() rows of the 2-D t, in place (nothing for an empty gate).
void scale_rows_(const at::Tensor& t, const Scale& gate) {
  if (gate.empty()) return;
  const at::Tensor g = at::tensor(gate.values(), t.options().dtype(at::kDouble)).to(t.scalar_type());
  t.narrow(0, 0, gate.size()).mul_(g.unsqueeze(1));
}

// One pass over dy: dyr = dy[:, R] in a compact (M, |R| padded) buffer (dy itself when every row
// is open), and the column sums of the bias and row-gate gradients.
struct RowPass {
  at::Tensor dyr, db, dgr;
};

RowPass row_pass(const Inputs& in, const c10::optional<at::Tensor>& output, const at::Tensor& row_gate,
                 bool need_dyr, bool need_db, bool need_dgr) {
  const Active& rows = in.rows.active;
  const int64_t N = rows.full, nR = in.n_rows(), ldh = rows.padded(), M = in.M;
  const bool pack = need_dyr && !rows.all;
  RowPass out;
  if (need_dyr) out.dyr = rows.all ? in.dy : at::empty({M, ldh}, in.opt);
  ColumnSums bias_sums(need_db ? nR : 0), gate_sums(need_dgr ? nR : 0);
  const at::Tensor y2 = need_dgr ? as_rows(*output, N).contiguous() : at::Tensor();
  if (nR > 0 && M > 0 && (pack || need_db || need_dgr)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.dy.scalar_type(), "fg_backward_rows", [&] {
      const scalar_t* dy = in.dy.data_ptr<scalar_t>();
      const scalar_t* y = need_dgr ? y2.data_ptr<scalar_t>() : nullptr;
      scalar_t* dyr_out = pack ? out.dyr.data_ptr<scalar_t>() : nullptr;
      for_rows(M, row_grain(N), [&](int64_t begin, int64_t end) {
        double* sb = need_db ? bias_sums.local() : nullptr;
        double* sg = need_dgr ? gate_sums.local() : nullptr;
        std::vector<scalar_t> dy_buf(rows.all || pack ? 0 : nR), y_buf(need_dgr && !rows.all ? nR : 0);
        for (int64_t m = begin; m < end; ++m) {
          // dy[m, R] and y[m, R] as contiguous rows.
          const scalar_t* dyr = dy + m * N;
          if (!rows.all) {
            scalar_t* dst = pack ? dyr_out + m * ldh : dy_buf.data();
            pack_cols(dyr, rows, dst);
            if (pack) std::fill(dst + nR, dst + ldh, scalar_t(0));
            dyr = dst;
          }
          if (sb) {
            for (int64_t i = 0; i < nR; ++i) sb[i] += static_cast<double>(dyr[i]);
          }
          if (sg) {
            const scalar_t* yr = y + m * N;
            if (!rows.all) {
              pack_cols(yr, rows, y_buf.data());
              yr = y_buf.data();
            }
            for (int64_t i = 0; i < nR; ++i) sg[i] += static_cast<double>(dyr[i]) * static_cast<double>(yr[i]);
          }
        }
      });
    });
  }
  // d(row_gate)[i] = sum_m dy * z with z = y / g_r (the pre-gate output), divided once at the end.
  if (need_db) out.db = bias_sums.finish(rows, in.rows.values, /*divide=*/false, in.opt);
  if (need_dgr) out.dgr = gate_sums.finish(rows, in.rows.values, /*divide=*/true, row_gate.options());
  return out;
}

// sum_m dx[m, C[j]] * x[m, C[j]] of one block of tokens starting at m0 into `sums` (dxs compact).
void add_col_gate_sums(const at::Tensor& dxs, const Inputs& in, int64_t m0, ColumnSums& sums) {
  const Active& cols = in.cols.active;
  const int64_t nC = in.n_cols(), ldc = dxs.stride(0), mb = dxs.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.dy.scalar_type(), "fg_backward_colgate", [&] {
    const scalar_t* d = dxs.data_ptr<scalar_t>();
    const scalar_t* xv = in.x2.data_ptr<scalar_t>();
    const int64_t ldx = in.x2.stride(0);
    for_rows(mb, row_grain(cols.full), [&](int64_t begin, int64_t end) {
      double* s = sums.local();
      std::vector<scalar_t> x_buf(static_cast<size_t>(nC));
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* drow = d + m * ldc;
        pack_cols(xv + (m0 + m) * ldx, cols, x_buf.data());
        for (int64_t j = 0; j < nC; ++j) s[j] += static_cast<double>(drow[j]) * static_cast<double>(x_buf[j]);
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
    const at::Tensor wf = folded_block(weight, in.rows, in.cols, Reuse::kSameStep);
    const int64_t M = in.M;
    at::Tensor dx2 = dx ? dx->view({M, cols.full}) : at::Tensor();
    for_token_blocks(M, token_block(M), [&](int64_t m0, int64_t mb) {
      const at::Tensor dyb = mb == M ? dyr : dyr.narrow(0, m0, mb);
      at::Tensor dxs = at::mm(dyb, wf);
      if (in.a_f.defined()) dxs.addmm_(at::mm(dyb, in.b_f), in.a_f, 1.0, in.lora_scale);
      if (dx) {
        at::Tensor dxb = mb == M ? dx2 : dx2.narrow(0, m0, mb);
        scatter_cols(dxs, cols, {}, dxb);
      }
      if (dgc) add_col_gate_sums(dxs, in, m0, col_sums);
    });
  }
  if (dgc) *dgc = col_sums.finish(cols, in.cols.values, /*divide=*/true, col_gate.options());
}

// dW, dA and dB on the active block only (zeros elsewhere), from x_c = x[:, C] g_c.
void weight_and_lora_grads(const Inputs& in, const at::Tensor& dyr, int64_t N, int64_t K, at::Tensor* dw,
                           at::Tensor* da, at::Tensor* dlb) {
  const Active& rows = in.rows.active;
  const Active& cols = in.cols.active;
  const Active all_r{{}, in.r, true};
  const bool empty = in.empty_block();
  const at::Tensor xc = empty ? at::Tensor() : gather_cols(in.x2, cols, in.cols.values);
  if (dw) {
    if (!empty && rows.all && cols.all) {
      *dw = at::mm(dyr.t(), xc);
      scale_rows_(*dw, in.rows.values);
    } else {
      *dw = at::zeros({N, K}, in.opt);
      if (!empty) {
        at::Tensor block = at::mm(dyr.t(), xc);
        scale_rows_(block, in.rows.values);
        scatter_rows_cols(block, rows, cols, *dw);
      }
    }
  }
  if (dlb) {
    *dlb = at::zeros({N, in.r}, in.opt);
    if (!empty) {
      // x_c A^T[C] = x[:, C] Af^T (g_c is inside Af).
      at::Tensor block = at::mm(dyr.t(), at::mm(gather_cols(in.x2, cols, {}), in.a_f.t())).mul_(in.lora_scale);
      scale_rows_(block, in.rows.values);
      scatter_rows_cols(block, rows, all_r, *dlb);
    }
  }
  if (da) {
    *da = at::zeros({in.r, K}, in.opt);
    if (!empty) scatter_rows_cols(at::mm(at::mm(dyr, in.b_f).t(), xc).mul_(in.lora_scale), all_r, cols, *da);
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

  Inputs in;
  in.opt = weight.options();
  in.dy = as_rows(grad_out, N).contiguous();
  in.M = in.dy.size(0);
  if (need_dgc || need_dw || need_da || need_dlb) in.x2 = as_rows(*x_opt, K);
  in.rows = gate_set(row_gate);
  in.cols = gate_set(col_gate);
  pad_for_gemm(in.rows.active);
  pad_for_gemm(in.cols.active);
  in.r = lora ? lora_a->size(0) : 0;
  in.lora_scale = lora_scale;
  if (lora && in.n_rows() > 0 && in.n_cols() > 0) {
    in.a_f = gather_block(*lora_a, Active{{}, in.r, true}, in.cols.active, {}, in.cols.values);
    in.b_f = gather_block(*lora_b, in.rows.active, Active{{}, in.r, true}, in.rows.values, {});
  }

  // An unselected gradient is an empty (0,) tensor of its slot's dtype (as the fake kernel says).
  at::Tensor dx = at::empty({0}, in.opt), dw = dx, db = dx, da = dx, dlb = dx;
  at::Tensor dgr = at::empty({0}, row_gate.options()), dgc = at::empty({0}, col_gate.options());
  const bool need_dyr = need_dx || need_dgc || need_dw || need_da || need_dlb;
  RowPass rp = row_pass(in, output, row_gate, need_dyr, need_db, need_dgr);
  if (need_db) db = rp.db;
  if (need_dgr) dgr = rp.dgr;
  if (need_dx) dx = at::empty(out_shape(grad_out, K), in.opt);
  if (need_dx || need_dgc)
    input_and_col_gate_grads(in, weight, rp.dyr, need_dx ? &dx : nullptr, need_dgc ? &dgc : nullptr, col_gate);
  if (need_dw || need_da || need_dlb)
    weight_and_lora_grads(in, rp.dyr, N, K, need_dw ? &dw : nullptr, need_da ? &da : nullptr,
                          need_dlb ? &dlb : nullptr);
  return {dx, dw, db, dgr, dgc, da, dlb};
}

}  // namespace cpu
}  // namespace fg
