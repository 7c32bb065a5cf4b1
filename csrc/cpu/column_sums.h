// Column sums over tokens, as the backward's gate and bias gradients need them:
// acc[j] += a[j] * b[j] (or a[j]) for one token's row, many rows in a row.
//
// A scalar double accumulation measured about a third of the backward's non-GEMM time at 528
// tokens. Rows are summed in float in a per-thread stage, vectorised for the CPU at hand
// (function multiversioning), and the stage is added into the double totals every kFlushRows
// rows, so a sum over M tokens carries the rounding of at most kFlushRows float additions.
// No ATen here, as in lane_pack.h.
#pragma once

#include <cstdint>

namespace fg {
namespace cpu {

constexpr int64_t kFlushRows = 32;

// acc[j] += a[j] * b[j] for j < n, or acc[j] += a[j] when b is null.
void add_products(float* acc, const float* a, const float* b, int64_t n);

// total[j] += stage[j], stage[j] = 0 for j < n.
void flush_stage(double* total, float* stage, int64_t n);

}  // namespace cpu
}  // namespace fg
