// CPU kernels of fg::gated_linear (training forward and backward) and fg::gathered_linear
// (inference on a compacted layer). Only active rows R = {row_gate != 0} and columns
// C = {col_gate != 0} are read, multiplied or written, in both directions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "compact_gemm.h"

namespace fg {
namespace cpu {
namespace {

// x as (M, K) rows with unit stride in the last dimension (a copy only when a view cannot do).
at::Tensor as_rows(const at::Tensor& x, int64_t K) {
  // Explicit token count: reshape(-1, 0) of an empty tensor is ambiguous.
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({M, K});
  if (K > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  return x2;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

const Active kAllOfOne{{}, 1, true};

// (v * scale)[idx] for a 1-D tensor, contiguous (scale may be empty = 1).
at::Tensor gather_vec(const at::Tensor& v, const Active& a, const std::vector<float>& scale = {}) {
  return gather_block(v.reshape({1, -1}), kAllOfOne, a, {}, scale).reshape({-1}).contiguous();
}

// Per-thread accumulators for column sums over tokens, reduced in double at the end.
class ColumnSums {
 public:
  explicit ColumnSums(int64_t n) : n_(n), acc_(static_cast<size_t>(at::get_num_threads() * n), 0.0) {}
  double* local() { return acc_.data() + at::get_thread_num() * n_; }
  // The sums, each times scale[i] (if given), written into out[idx[i]] of a zero (full,) tensor.
  at::Tensor finish(const Active& idx, const std::vector<float>* divide_by, const at::TensorOptions& opt) const {
    std::vector<double> total(n_, 0.0);
    const int64_t nt = static_cast<int64_t>(acc_.size()) / std::max<int64_t>(n_, 1);
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t i = 0; i < n_; ++i) total[i] += acc_[t * n_ + i];
    at::Tensor full = at::zeros({idx.full}, opt.dtype(at::kDouble));
    double* f = full.data_ptr<double>();
    for (int64_t i = 0; i < n_; ++i) {
      double v = total[i];
      if (divide_by && !divide_by->empty()) v /= (*divide_by)[i];
      f[idx.all ? i : idx.idx[i]] = v;
    }
    return full.to(opt.dtype());
  }

 private:
  int64_t n_;
  std::vector<double> acc_;
};

at::Tensor gated_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& row_gate, const at::Tensor& col_gate,
    const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b,
    double lora_scale) {
  check_gated_linear_args(x, weight, bias, row_gate, col_gate, lora_a, lora_b);
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor x2 = as_rows(x, K);
  // Allocated in its final shape and returned as such (a view would break in-place use of y).
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  at::Tensor out2 = out.view({x2.size(0), N});

  GateSet rg = gate_set(row_gate);
  GateSet cg = gate_set(col_gate);
  pad_for_gemm(rg.active);
  pad_for_gemm(cg.active);
  const bool any = rg.active.size() > 0 && x2.size(0) > 0;
  // The gates are folded into the compact operands as they are gathered:
  // y[:, R] = x[:, C] (g_r W g_c)[R][:, C]^T + g_r b  (+ x[:, C] (A g_c)^T (g_r B)^T s for LoRA).
  CompactLinear p;
  p.cols = &cg.active;
  p.rows = &rg.active;
  if (any) {
    p.weight_c = gather_block(weight, rg.active, cg.active, rg.values, cg.values);
    if (bias.has_value()) p.bias_c = gather_vec(*bias, rg.active, rg.values);
    if (lora_a.has_value()) {
      p.lora_a_c = gather_block(*lora_a, Active{{}, lora_a->size(0), true}, cg.active, {}, cg.values);
      p.lora_b_r = gather_block(*lora_b, rg.active, Active{{}, lora_b->size(1), true}, rg.values, {});
      p.lora_scale = lora_scale;
    }
  }
  compact_linear_forward(x2, p, out2);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_linear_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& x_opt, const at::Tensor& weight,
    const at::Tensor& row_gate, const at::Tensor& col_gate,
    const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b,
    double lora_scale, const c10::optional<at::Tensor>& output, std::array<bool, 7> mask) {
  // The backward is callable directly (torch.ops.fg.gated_linear_backward), so it validates
  // its arguments as the forward does: a mismatch is an error, never an out-of-range read.
  check_float_tensor(grad_out, "grad_out");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  check_same_dtype(weight, grad_out, "weight");
  TORCH_CHECK_VALUE(grad_out.dim() >= 1 && grad_out.size(-1) == N,
                    "grad_out must have last dimension out_features = ", N, ", got shape ", grad_out.sizes());
  check_gated_linear_args(x_opt.has_value() ? *x_opt : at::empty({0, K}, grad_out.options()), weight,
                          c10::nullopt, row_gate, col_gate, lora_a, lora_b);
  if (x_opt.has_value()) {
    TORCH_CHECK_VALUE(x_opt->dim() >= 1 &&
                          c10::multiply_integers(x_opt->sizes().begin(), x_opt->sizes().end() - 1) ==
                              c10::multiply_integers(grad_out.sizes().begin(), grad_out.sizes().end() - 1),
                      "x must have as many tokens as grad_out, got shapes ", x_opt->sizes(), " and ", grad_out.sizes());
  }
  if (output.has_value()) {
    check_same_dtype(*output, grad_out, "output");
    TORCH_CHECK_VALUE(output->sizes() == grad_out.sizes(), "output must have the shape of grad_out ",
                      grad_out.sizes(), ", got ", output->sizes());
  }
  const bool need_dx = mask[0], need_dw = mask[1], need_db = mask[2], need_dgr = mask[3],
             need_dgc = mask[4], need_da = mask[5] && lora_a.has_value(),
             need_dlb = mask[6] && lora_a.has_value();
  const bool need_x = need_dgc || need_dw || need_da || need_dlb;
  TORCH_CHECK_VALUE(!need_x || x_opt.has_value(), "x is required for the gradients of col_gate, weight or LoRA");
  TORCH_CHECK_VALUE(!need_dgr || output.has_value(), "output is required for the gradient of row_gate");

  const at::Tensor dy = as_rows(grad_out, N).contiguous();
  const int64_t M = dy.size(0);
  const at::TensorOptions opt = weight.options();
  const at::Tensor none = at::empty({0}, opt);
  std::vector<int64_t> xshape(grad_out.sizes().begin(), grad_out.sizes().end());
  xshape.back() = K;
  const int64_t r = lora_a.has_value() ? lora_a->size(0) : 0;

  GateSet rg = gate_set(row_gate);
  GateSet cg = gate_set(col_gate);
  pad_for_gemm(rg.active);
  pad_for_gemm(cg.active);
  const Active& rows = rg.active;
  const Active& cols = cg.active;
  const int64_t nR = rows.size(), nC = cols.size(), ldh = rows.padded(), ldc = cols.padded();
  const Active all_r{{}, r, true};

  at::Tensor dx = need_dx ? at::empty(xshape, opt) : none;
  at::Tensor dw = none, db = none, dgr = none, dgc = none, da = none, dlb = none;

  // --- Pass over grad_out: dh = dy[:, R] * g_r[R]; sums for the bias and row-gate gradients. ---
  const bool need_dh = need_dx || need_dgc || need_dw || need_da || need_dlb;
  const bool dh_is_dy = rows.all && rg.values.empty();
  at::Tensor dh = need_dh ? (dh_is_dy ? dy : at::empty({M, ldh}, opt)) : none;
  ColumnSums bias_sums(need_db ? nR : 0), gate_sums(need_dgr ? nR : 0);
  const at::Tensor y2 = need_dgr ? as_rows(*output, N).contiguous() : none;
  if (nR > 0 && M > 0 && ((need_dh && !dh_is_dy) || need_db || need_dgr)) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dy.scalar_type(), "fg_backward_rows", [&] {
      const scalar_t* g = dy.data_ptr<scalar_t>();
      const scalar_t* yv = need_dgr ? y2.data_ptr<scalar_t>() : nullptr;
      scalar_t* h = (need_dh && !dh_is_dy) ? dh.data_ptr<scalar_t>() : nullptr;
      const float* gr = rg.values.empty() ? nullptr : rg.values.data();
      const int64_t* ri = rows.all ? nullptr : rows.idx.data();
      at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        double* sb = need_db ? bias_sums.local() : nullptr;
        double* sg = need_dgr ? gate_sums.local() : nullptr;
        for (int64_t m = begin; m < end; ++m) {
          const scalar_t* grow = g + m * N;
          const scalar_t* yrow = yv ? yv + m * N : nullptr;
          scalar_t* hrow = h ? h + m * ldh : nullptr;
          if (hrow) for (int64_t i = nR; i < ldh; ++i) hrow[i] = scalar_t(0);
          for (int64_t i = 0; i < nR; ++i) {
            const int64_t c = ri ? ri[i] : i;
            const float gv = static_cast<float>(grow[c]);
            const scalar_t hv = static_cast<scalar_t>(gr ? gv * gr[i] : gv);
            if (hrow) hrow[i] = hv;
            if (sb) sb[i] += static_cast<double>(hv);
            if (sg) sg[i] += static_cast<double>(gv) * static_cast<double>(yrow[c]);
          }
        }
      });
    });
  }
  // d(row_gate)[i] = sum_m dy * z with z = y / g_r (the pre-gate output), divided once at the end.
  if (need_db) db = bias_sums.finish(rows, nullptr, opt);
  if (need_dgr) dgr = gate_sums.finish(rows, &rg.values, row_gate.options());

  // --- dx[:, C] = (dh @ W[R][:, C]) * g_c[C], fused with the column-gate gradient. ---
  const at::Tensor x2 = need_x ? as_rows(*x_opt, K) : none;
  at::Tensor a_c, b_r;
  if (lora_a.has_value() && nR > 0 && nC > 0) {
    a_c = gather_block(*lora_a, all_r, cols);
    b_r = gather_block(*lora_b, rows, Active{{}, r, true});
  }
  if (need_dx || need_dgc) {
    ColumnSums col_sums(need_dgc ? nC : 0);
    if (nR == 0 || nC == 0 || M == 0) {
      if (need_dx) dx.zero_();
    } else {
      const at::Tensor wc = gather_block(weight, rows, cols);
      const int64_t bm = token_block(M);
      at::Tensor dxc_buf = at::empty({std::min(bm, M), ldc}, opt);
      at::Tensor dx2 = need_dx ? dx.view({M, K}) : none;
      const int64_t* ci = cols.all ? nullptr : cols.idx.data();
      for (int64_t m0 = 0; m0 < M; m0 += bm) {
        const int64_t mb = std::min(bm, M - m0);
        const at::Tensor dhb = dh.narrow(0, m0, mb);
        at::Tensor dxc = dxc_buf.narrow(0, 0, mb);
        at::mm_out(dxc, dhb, wc);
        if (a_c.defined()) dxc.addmm_(at::mm(dhb, b_r), a_c, 1.0, lora_scale);
        if (need_dx) {
          at::Tensor dxb = dx2.narrow(0, m0, mb);
          scatter_cols(dxc, cols, cg.values, dxb);
        }
        if (need_dgc) {
          AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dy.scalar_type(), "fg_backward_colgate", [&] {
            const scalar_t* d = dxc.data_ptr<scalar_t>();
            const scalar_t* xv = x2.data_ptr<scalar_t>();
            const int64_t ldx = x2.stride(0);
            at::parallel_for(0, mb, 16, [&](int64_t begin, int64_t end) {
              double* s = col_sums.local();
              for (int64_t m = begin; m < end; ++m) {
                const scalar_t* drow = d + m * ldc;
                const scalar_t* xrow = xv + (m0 + m) * ldx;
                for (int64_t j = 0; j < nC; ++j) {
                  const int64_t c = ci ? ci[j] : j;
                  s[j] += static_cast<double>(drow[j]) * static_cast<double>(xrow[c]);
                }
              }
            });
          });
        }
      }
    }
    if (need_dgc) dgc = col_sums.finish(cols, nullptr, col_gate.options());
  }

  // --- Weight and LoRA gradients on the active block only. ---
  if (need_dw || need_da || need_dlb) {
    const at::Tensor xc = (nR > 0 && nC > 0 && M > 0) ? gather_cols(x2, cols, cg.values) : none;
    const bool empty = !xc.defined() || xc.numel() == 0 || nR == 0;
    if (need_dw) {
      if (!empty && rows.all && cols.all) {
        dw = at::mm(dh.t(), xc);
      } else {
        dw = at::zeros({N, K}, opt);
        if (!empty) scatter_rows_cols(at::mm(dh.t(), xc), rows, cols, dw);
      }
    }
    if (need_dlb) {
      dlb = at::zeros({N, r}, opt);
      if (!empty) {
        const at::Tensor dbr = at::mm(dh.t(), at::mm(xc, a_c.t())).mul_(lora_scale);
        scatter_rows_cols(dbr, rows, Active{{}, r, true}, dlb);
      }
    }
    if (need_da) {
      da = at::zeros({r, K}, opt);
      if (!empty) {
        const at::Tensor dac = at::mm(at::mm(dh, b_r).t(), xc).mul_(lora_scale);
        scatter_rows_cols(dac, all_r, cols, da);
      }
    }
  }
  return {dx, dw, db, dgr, dgc, da, dlb};
}

at::Tensor gathered_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight_c, const c10::optional<at::Tensor>& bias_c,
    const c10::optional<at::Tensor>& row_idx, const c10::optional<at::Tensor>& col_idx,
    int64_t out_features) {
  check_float_tensor(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension (..., in_features), got a scalar");
  TORCH_CHECK_VALUE(weight_c.dim() == 2,
                    "weight_c must be 2-D (active rows, active columns), got shape ", weight_c.sizes());
  check_same_dtype(weight_c, x, "weight_c");
  check_same_device(weight_c, x, "weight_c");
  const int64_t nR = weight_c.size(0), nC = weight_c.size(1), Kx = x.size(-1);
  if (bias_c.has_value()) {
    check_same_dtype(*bias_c, x, "bias_c");
    check_same_device(*bias_c, x, "bias_c");
    check_vector(*bias_c, nR, "bias_c", "active rows = weight_c.shape[0]");
  }
  TORCH_CHECK_VALUE(out_features >= 0, "out_features must be >= 0, got ", out_features);
  if (row_idx.has_value()) {
    check_index_meta(*row_idx, "row_idx", x);  // values: checked by index_set below
    TORCH_CHECK_VALUE(row_idx->size(0) == nR, "row_idx must have length weight_c.shape[0] = ", nR,
                      ", got ", row_idx->size(0));
  } else {
    TORCH_CHECK_VALUE(out_features == nR, "out_features must equal weight_c.shape[0] = ", nR,
                      " when row_idx is None (compact output), got ", out_features);
  }
  if (col_idx.has_value()) {
    check_index_meta(*col_idx, "col_idx", x);
    TORCH_CHECK_VALUE(col_idx->size(0) == nC, "col_idx must have length weight_c.shape[1] = ", nC,
                      ", got ", col_idx->size(0));
  } else {
    TORCH_CHECK_VALUE(Kx == nC, "x must have last dimension weight_c.shape[1] = ", nC,
                      " when col_idx is None (compact input), got shape ", x.sizes());
  }
  const at::Tensor x2 = as_rows(x, Kx);
  at::Tensor out = at::empty(out_shape(x, out_features), x.options());
  at::Tensor out2 = x.dim() == 2 ? out : out.view({x2.size(0), out_features});
  const Active rows = index_set(row_idx, out_features, "row_idx", "out_features");
  const Active cols = index_set(col_idx, Kx, "col_idx", "x.shape[-1]");
  CompactLinear p;
  p.cols = &cols;
  p.rows = &rows;
  p.weight_c = weight_c;
  if (bias_c.has_value()) p.bias_c = bias_c->contiguous();
  compact_linear_forward(x2, p, out2);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fg, CPU, m) {
  m.impl("gated_linear", &gated_linear_cpu);
  m.impl("gated_linear_backward", &gated_linear_backward_cpu);
  m.impl("gathered_linear", &gathered_linear_cpu);
}

}  // namespace cpu
}  // namespace fg
