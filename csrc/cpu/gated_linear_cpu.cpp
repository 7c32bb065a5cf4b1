// CPU kernels of fg::gated_linear (training forward) and fg::gathered_linear (inference on a
// compacted layer), and the CPU registration of every fg op. Only active rows R = {row_gate != 0}
// and columns C = {col_gate != 0} are read, multiplied or written, except in a set kept whole
// (gate_set: under 10% closed), whose zero gates zero their rows or columns in the GEMM.
#include <torch/library.h>

#include "../checks.h"
#include "compact_gemm.h"
#include "ops_cpu.h"
#include "trace.h"
#include "weight_cache.h"

namespace fg {
namespace cpu {
namespace {

const Active kAllOfOne{{}, 1, true};

// (v * scale)[idx] for a 1-D tensor, contiguous (scale may be empty = 1).
at::Tensor gather_vec(const at::Tensor& v, const Active& a, const Scale& scale = {}) {
  return gather_block(v.reshape({1, -1}), kAllOfOne, a, {}, scale).reshape({-1}).contiguous();
}

}  // namespace

at::Tensor gated_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& row_gate, const at::Tensor& col_gate,
                            const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b,
                            double lora_scale) {
  check_gated_linear_args(x, weight, bias, row_gate, col_gate, lora_a, lora_b);
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor x2 = as_rows(x, K);
  // Allocated in its final shape and returned as such (a view would break in-place use of y).
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  at::Tensor out2 = out.view({x2.size(0), N});

  FG_TRACE("fg::cpu::forward");
  GateSet rg = gate_set(row_gate);
  GateSet cg = gate_set(col_gate);
  exact_if_nonfinite(cg, col_gate, x2);
  const std::vector<int64_t> closed_rows = closed_in_whole(rg);
  pad_for_gemm(rg.active);
  pad_for_gemm(cg.active);
  // The gates are folded into the compact operands as they are gathered:
  // y[:, R] = x[:, C] (g_r W g_c)[R][:, C]^T + g_r b  (+ x[:, C] (A g_c)^T (g_r B)^T s for LoRA, on the
  // low-rank path or folded into the block: fold_lora).
  CompactLinear p;
  p.cols = &cg.active;
  p.rows = &rg.active;
  if (rg.active.size() > 0 && x2.size(0) > 0) {
    FG_TRACE("fg::cpu::fold");
    const LoraTerm lora = lora_term(lora_a, lora_b, lora_scale, rg, cg, x2.size(0));
    p.weight_c = folded_block(weight, rg, cg, Reuse::kFrozenScopeOnly, lora.fold ? &lora : nullptr);
    if (bias.has_value()) p.bias_c = gather_vec(*bias, rg.active, rg.values);
    if (lora.defined() && !lora.fold) {
      p.lora_a_c = lora.a_f;
      p.lora_b_r = lora.b_f;
      p.lora_scale = lora_scale;
    }
  }
  compact_linear_forward(x2, p, out2);
  // A closed row is exactly 0, also where an inf met its zero gate in the folded block (a few
  // columns: the set is whole only while under 10% of it is closed).
  if (!closed_rows.empty() && x2.size(0) > 0) {
    out2.index_fill_(1, at::tensor(closed_rows, x2.options().dtype(at::kLong)), 0);
  }
  return out;
}

at::Tensor gathered_linear_cpu(const at::Tensor& x, const at::Tensor& weight_c,
                               const c10::optional<at::Tensor>& bias_c, const c10::optional<at::Tensor>& row_idx,
                               const c10::optional<at::Tensor>& col_idx, int64_t out_features) {
  check_gathered_linear_args(x, weight_c, bias_c, row_idx, col_idx, out_features);
  const int64_t Kx = x.size(-1);
  const at::Tensor x2 = as_rows(x, Kx);
  at::Tensor out = at::empty(out_shape(x, out_features), x.options());
  at::Tensor out2 = x.dim() == 2 ? out : out.view({x2.size(0), out_features});
  const Active rows = index_set(row_idx, out_features, "row_idx", "out_features", /*distinct=*/true);
  const Active cols = index_set(col_idx, Kx, "col_idx", "x.shape[-1]");
  CompactLinear p;
  p.cols = &cols;
  p.rows = &rows;
  p.weight_c = weight_c;
  if (bias_c.has_value()) p.bias_c = bias_c->contiguous();
  compact_linear_forward(x2, p, out2);
  return out;
}

int64_t cpu_weight_cache(bool clear) {
  if (clear) clear_weight_cache();
  return weight_cache_bytes();
}

int64_t cpu_weight_reuse(int64_t delta) { return enter_frozen_weights(delta); }

TORCH_LIBRARY_IMPL(fg, CPU, m) {
  m.impl("gated_linear", &gated_linear_cpu);
  m.impl("gated_linear_backward", &gated_linear_backward_cpu);
  m.impl("gathered_linear", &gathered_linear_cpu);
}

}  // namespace cpu
}  // namespace fg
