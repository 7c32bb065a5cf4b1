// The CPU kernels of the fg ops, registered for the CPU key in gated_linear_cpu.cpp. Each checks its
// arguments with checks.h (the C++ mirror of fg_kernels/contract.py) before touching any data.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace fg {
namespace cpu {

at::Tensor gated_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& row_gate, const at::Tensor& col_gate,
                            const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b,
                            double lora_scale);

// The gradients of (x, weight, bias, row_gate, col_gate, lora_a, lora_b) selected by `mask`; an
// unselected one is an empty (0,) tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_linear_backward_cpu(const at::Tensor& grad_out, const c10::optional<at::Tensor>& x,
                          const at::Tensor& weight, const at::Tensor& row_gate, const at::Tensor& col_gate,
                          const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b,
                          double lora_scale, const c10::optional<at::Tensor>& output, std::array<bool, 7> mask);

at::Tensor gathered_linear_cpu(const at::Tensor& x, const at::Tensor& weight_c,
                               const c10::optional<at::Tensor>& bias_c, const c10::optional<at::Tensor>& row_idx,
                               const c10::optional<at::Tensor>& col_idx, int64_t out_features);

// Bytes held by the folded-weight cache of the CPU kernels (weight_cache.h), after dropping every
// block when `clear`.
int64_t cpu_weight_cache(bool clear);

// Opens (1) or closes (-1) a scope in which a forward may reuse an earlier call's folded block.
int64_t cpu_weight_reuse(int64_t delta);

}  // namespace cpu
}  // namespace fg
