// Argument checks of the fg ops: the C++ mirror of fg_kernels/contract.py (same rules, same
// exception types, same words), used by the CPU kernels. tests/test_bad_input.py runs one table of
// bad inputs through every backend, so the two cannot drift apart unnoticed.
//
// Each failure names the argument and what was expected, and is raised as the matching Python
// exception (ValueError for shapes and values, TypeError for dtypes, IndexError for indices).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>

namespace fg {

// float32, float16, bfloat16 and float64, on every device (float64 is for gradcheck).
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), name,
                   " must have dtype float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
                    "), got ", t.device());
}

inline void check_vector(const at::Tensor& t, int64_t len, const char* name, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, name, " must be 1-D of length ", len, " (", what,
                    "), got shape ", t.sizes());
}

// A gate may stay float32 under a layer of another dtype.
inline void check_gate(const at::Tensor& g, const at::Tensor& ref, int64_t len, const char* name,
                       const char* ref_name, const char* what) {
  TORCH_CHECK_VALUE(g.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
                    "), got ", g.device());
  TORCH_CHECK_TYPE(g.scalar_type() == ref.scalar_type() || g.scalar_type() == at::kFloat, name,
                   " must have the dtype of ", ref_name, " (", ref.scalar_type(), ") or float32, got ",
                   g.scalar_type());
  check_vector(g, len, name, what);
}

inline void check_weight(const at::Tensor& weight, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ",
                    weight.sizes());
  check_like(weight, ref, "weight", ref_name);
}

// Everything sized by the weight: both gates and the LoRA factors.
inline void check_gates_and_lora(const at::Tensor& ref, const char* ref_name, const at::Tensor& weight,
                                 const at::Tensor& row_gate, const at::Tensor& col_gate,
                                 const c10::optional<at::Tensor>& lora_a,
                                 const c10::optional<at::Tensor>& lora_b) {
  const int64_t N = weight.size(0), K = weight.size(1);
  check_gate(row_gate, ref, N, "row_gate", ref_name, "out_features = weight.shape[0]");
  check_gate(col_gate, ref, K, "col_gate", ref_name, "in_features = weight.shape[1]");
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(), "lora_a and lora_b must be given together (got only ",
                    lora_a.has_value() ? "lora_a" : "lora_b", ")");
  if (!lora_a.has_value()) return;
  check_like(*lora_a, ref, "lora_a", ref_name);
  check_like(*lora_b, ref, "lora_b", ref_name);
  TORCH_CHECK_VALUE(lora_a->dim() == 2 && lora_a->size(1) == K, "lora_a must be 2-D (rank, in_features=", K,
                    "), got shape ", lora_a->sizes());
  TORCH_CHECK_VALUE(lora_b->dim() == 2 && lora_b->size(0) == N && lora_b->size(1) == lora_a->size(0),
                    "lora_b must be 2-D (out_features=", N, ", rank=", lora_a->size(0), "), got shape ",
                    lora_b->sizes());
}

// fg::gated_linear.
inline void check_gated_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, const at::Tensor& row_gate,
                                    const at::Tensor& col_gate, const c10::optional<at::Tensor>& lora_a,
                                    const c10::optional<at::Tensor>& lora_b) {
  check_float_tensor(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension (..., in_features), got a scalar");
  check_weight(weight, x, "x");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == K, "x must have last dimension in_features = weight.shape[1] = ", K,
                    ", got shape ", x.sizes());
  if (bias.has_value()) {
    check_like(*bias, x, "bias", "x");
    check_vector(*bias, N, "bias", "out_features = weight.shape[0]");
  }
  check_gates_and_lora(x, "x", weight, row_gate, col_gate, lora_a, lora_b);
}

// fg::gated_linear_backward (callable directly: a mismatch is an error, never a read past the end).
// The order of output_mask: x, weight, bias, row_gate, col_gate, lora_a, lora_b.
inline void check_gated_linear_backward_args(const at::Tensor& grad_out, const c10::optional<at::Tensor>& x,
                                             const at::Tensor& weight, const at::Tensor& row_gate,
                                             const at::Tensor& col_gate,
                                             const c10::optional<at::Tensor>& lora_a,
                                             const c10::optional<at::Tensor>& lora_b,
                                             const c10::optional<at::Tensor>& output,
                                             const std::array<bool, 7>& mask) {
  check_float_tensor(grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() >= 1,
                    "grad_out must have at least 1 dimension (..., out_features), got a scalar");
  check_weight(weight, grad_out, "grad_out");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(grad_out.size(-1) == N, "grad_out must have last dimension out_features = weight.shape[0] = ",
                    N, ", got shape ", grad_out.sizes());
  check_gates_and_lora(grad_out, "grad_out", weight, row_gate, col_gate, lora_a, lora_b);
  const bool lora = lora_a.has_value();
  const bool needs_x = mask[1] || mask[4] || (lora && (mask[5] || mask[6]));
  TORCH_CHECK_VALUE(!needs_x || x.has_value(), "x is required for the gradients of col_gate, weight or LoRA");
  TORCH_CHECK_VALUE(!mask[3] || output.has_value(), "output is required for the gradient of row_gate");
  if (x.has_value()) {
    check_like(*x, grad_out, "x", "grad_out");
    std::vector<int64_t> want(grad_out.sizes().begin(), grad_out.sizes().end());
    want.back() = K;
    TORCH_CHECK_VALUE(x->sizes() == at::IntArrayRef(want), "x must have shape ", at::IntArrayRef(want),
                      " (the tokens of grad_out, in_features), got ", x->sizes());
  }
  if (output.has_value()) {
    check_like(*output, grad_out, "output", "grad_out");
    TORCH_CHECK_VALUE(output->sizes() == grad_out.sizes(), "output must have the shape of grad_out ",
                      grad_out.sizes(), ", got ", output->sizes());
  }
}

// Device, dtype and rank of an index list (its values are checked by the kernel while it copies them).
inline void check_index_meta(const at::Tensor& idx, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(idx.device() == x.device(), name, " must be on the device of x (", x.device(), "), got ",
                    idx.device());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, name,
                   " must be an int64 or int32 index tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1, name, " must be 1-D, got shape ", idx.sizes());
}

// fg::gathered_linear, all but the index values.
inline void check_gathered_linear_args(const at::Tensor& x, const at::Tensor& weight_c,
                                       const c10::optional<at::Tensor>& bias_c,
                                       const c10::optional<at::Tensor>& row_idx,
                                       const c10::optional<at::Tensor>& col_idx, int64_t out_features) {
  check_float_tensor(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension (..., in_features), got a scalar");
  TORCH_CHECK_VALUE(weight_c.dim() == 2, "weight_c must be 2-D (active rows, active columns), got shape ",
                    weight_c.sizes());
  check_like(weight_c, x, "weight_c", "x");
  const int64_t n_rows = weight_c.size(0), n_cols = weight_c.size(1);
  if (bias_c.has_value()) {
    check_like(*bias_c, x, "bias_c", "x");
    check_vector(*bias_c, n_rows, "bias_c", "active rows = weight_c.shape[0]");
  }
  TORCH_CHECK_VALUE(out_features >= 0, "out_features must be >= 0, got ", out_features);
  if (row_idx.has_value()) {
    check_index_meta(*row_idx, x, "row_idx");
    TORCH_CHECK_VALUE(row_idx->size(0) == n_rows, "row_idx must have length weight_c.shape[0] = ", n_rows,
                      ", got ", row_idx->size(0));
  } else {
    TORCH_CHECK_VALUE(out_features == n_rows, "out_features must equal weight_c.shape[0] = ", n_rows,
                      " when row_idx is None (compact output), got ", out_features);
  }
  if (col_idx.has_value()) {
    check_index_meta(*col_idx, x, "col_idx");
    TORCH_CHECK_VALUE(col_idx->size(0) == n_cols, "col_idx must have length weight_c.shape[1] = ", n_cols,
                      ", got ", col_idx->size(0));
  } else {
    TORCH_CHECK_VALUE(x.size(-1) == n_cols, "x must have last dimension weight_c.shape[1] = ", n_cols,
                      " when col_idx is None (compact input), got shape ", x.sizes());
  }
}

}  // namespace fg
