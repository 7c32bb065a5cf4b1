// Argument checks shared by every backend's entry points.
//
// Each failure names the argument and what was expected, and is raised as the matching Python
// exception (ValueError for shapes and values, TypeError for dtypes, IndexError for indices).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fg {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16;
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(
      is_supported_float(t.scalar_type()), name, " must have dtype float32 or bfloat16, got ",
      t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(),
      "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(
      t.device() == x.device(), name, " must be on the device of x (", x.device(), "), got ",
      t.device());
}

inline void check_vector(const at::Tensor& t, int64_t len, const char* name, const char* what) {
  TORCH_CHECK_VALUE(
      t.dim() == 1 && t.size(0) == len, name, " must be 1-D of length ", len, " (", what,
      "), got shape ", t.sizes());
}

// A gate may be kept in float32 while the layer computes in bfloat16.
inline void check_gate(const at::Tensor& g, const at::Tensor& x, int64_t len, const char* name,
                       const char* what) {
  check_same_device(g, x, name);
  TORCH_CHECK_TYPE(
      g.scalar_type() == x.scalar_type() || g.scalar_type() == at::kFloat, name,
      " must have the dtype of x (", x.scalar_type(), ") or float32, got ", g.scalar_type());
  check_vector(g, len, name, what);
}

// Validates the arguments of fg::gated_linear (forward and backward share them).
inline void check_gated_linear_args(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& row_gate, const at::Tensor& col_gate,
    const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b) {
  check_float_tensor(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension (..., in_features), got a scalar");
  TORCH_CHECK_VALUE(
      weight.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ", weight.sizes());
  check_same_dtype(weight, x, "weight");
  check_same_device(weight, x, "weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(
      x.size(-1) == K, "x must have last dimension in_features = weight.shape[1] = ", K,
      ", got shape ", x.sizes());
  if (bias.has_value()) {
    check_same_dtype(*bias, x, "bias");
    check_same_device(*bias, x, "bias");
    check_vector(*bias, N, "bias", "out_features = weight.shape[0]");
  }
  check_gate(row_gate, x, N, "row_gate", "out_features = weight.shape[0]");
  check_gate(col_gate, x, K, "col_gate", "in_features = weight.shape[1]");
  TORCH_CHECK_VALUE(
      lora_a.has_value() == lora_b.has_value(),
      "lora_a and lora_b must be given together (got only ", lora_a.has_value() ? "lora_a" : "lora_b",
      ")");
  if (lora_a.has_value()) {
    check_same_dtype(*lora_a, x, "lora_a");
    check_same_dtype(*lora_b, x, "lora_b");
    check_same_device(*lora_a, x, "lora_a");
    check_same_device(*lora_b, x, "lora_b");
    TORCH_CHECK_VALUE(
        lora_a->dim() == 2 && lora_a->size(1) == K, "lora_a must be 2-D (rank, in_features=", K,
        "), got shape ", lora_a->sizes());
    TORCH_CHECK_VALUE(
        lora_b->dim() == 2 && lora_b->size(0) == N && lora_b->size(1) == lora_a->size(0),
        "lora_b must be 2-D (out_features=", N, ", rank=", lora_a->size(0), "), got shape ",
        lora_b->sizes());
  }
}

// Device, dtype and rank of an index tensor (its values are checked by the caller: the CPU
// gathered path checks them while copying them, without dispatching min/max reductions).
inline void check_index_meta(const at::Tensor& idx, const char* name, const at::Tensor& x) {
  check_same_device(idx, x, name);
  TORCH_CHECK_TYPE(
      idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, name,
      " must be an int64 or int32 index tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1, name, " must be 1-D, got shape ", idx.sizes());
}

// Validates an index list: 1-D integer tensor with every value in [0, bound).
inline void check_index(const at::Tensor& idx, int64_t bound, const char* name, const char* what,
                        const at::Tensor& x) {
  check_index_meta(idx, name, x);
  if (idx.numel() > 0) {
    const int64_t lo = idx.min().item<int64_t>();
    const int64_t hi = idx.max().item<int64_t>();
    TORCH_CHECK_INDEX(
        lo >= 0 && hi < bound, name, " values must lie in [0, ", bound, ") (", what, "), got range [",
        lo, ", ", hi, "]");
  }
}

}  // namespace fg
