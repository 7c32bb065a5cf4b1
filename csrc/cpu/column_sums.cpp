// Vectorised column sums (see column_sums.h). Each function is compiled for AVX-512, AVX2 and the
// baseline, and the loader picks the best the CPU has.
#include "column_sums.h"

namespace fg {
namespace cpu {

#define FG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

FG_CLONES void add_products(float* __restrict acc, const float* __restrict a, const float* __restrict b, int64_t n) {
  if (b) {
    for (int64_t j = 0; j < n; ++j) acc[j] += a[j] * b[j];
  } else {
    for (int64_t j = 0; j < n; ++j) acc[j] += a[j];
  }
}

FG_CLONES void flush_stage(double* __restrict total, float* __restrict stage, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    total[j] += static_cast<double>(stage[j]);
    stage[j] = 0.0f;
  }
}

}  // namespace cpu
}  // namespace fg
