// AVX-512 compress / expand along a row (see lane_pack.h). Only the functions marked with the
// target attribute use AVX-512; callers take their generic path where lane_pack_available() is false.
#include "lane_pack.h"

#include <immintrin.h>

#include <cstdlib>
#include <cstring>

namespace fg {
namespace cpu {

namespace {

#define FG_AVX512 __attribute__((target("avx512f")))

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

FG_AVX512 void pack_row_avx512(const float* src, const uint16_t* masks, const int32_t* offsets, int64_t full,
                               float mul, const float* scale, float* dst) {
  const __m512 vmul = _mm512_set1_ps(mul);
  const int64_t chunks = (full + 15) / 16;
  for (int64_t c = 0; c < chunks; ++c) {
    const __mmask16 m = masks[c];
    const int64_t p = offsets[c];
    const __mmask16 out = tail_mask(__builtin_popcount(m));
    // Masked load: the last chunk may end before 16 columns (its mask has no bits beyond full).
    __m512 v = _mm512_maskz_compress_ps(m, _mm512_maskz_loadu_ps(m, src + c * 16));
    v = _mm512_mul_ps(v, vmul);
    if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(out, scale + p));
    _mm512_mask_storeu_ps(dst + p, out, v);
  }
}

FG_AVX512 void unpack_row_avx512(const float* src, const uint16_t* masks, const int32_t* offsets, int64_t full,
                                 const float* mul, const float* add, float* dst) {
  const int64_t chunks = (full + 15) / 16;
  for (int64_t c = 0; c < chunks; ++c) {
    const __mmask16 m = masks[c];
    const int64_t base = c * 16;
    const __mmask16 lanes = full - base < 16 ? tail_mask(full - base) : static_cast<__mmask16>(0xFFFF);
    __m512 v = _mm512_maskz_expandloadu_ps(m, src + offsets[c]);
    if (mul) v = _mm512_maskz_mul_ps(m, v, _mm512_maskz_loadu_ps(m, mul + base));
    if (add) v = _mm512_maskz_add_ps(m, v, _mm512_maskz_loadu_ps(m, add + base));
    _mm512_mask_storeu_ps(dst + base, lanes, v);
  }
}

}  // namespace

bool lane_pack_available() {
  static const bool available = [] {
    const char* env = std::getenv("FG_CPU_SIMD");
    if (env && std::strcmp(env, "0") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return available;
}

LaneMap lane_map(const int64_t* idx, int64_t n_idx, int64_t full) {
  const size_t chunks = static_cast<size_t>((full + 15) / 16);
  LaneMap map{std::vector<uint16_t>(chunks, 0), std::vector<int32_t>(chunks, 0)};
  for (int64_t i = 0; i < n_idx; ++i) map.masks[idx[i] >> 4] |= static_cast<uint16_t>(1u << (idx[i] & 15));
  int32_t before = 0;
  for (size_t c = 0; c < chunks; ++c) {
    map.offsets[c] = before;
    before += __builtin_popcount(map.masks[c]);
  }
  return map;
}

void pack_row(const float* src, const LaneMap& map, int64_t full, float mul, const float* scale, float* dst) {
  pack_row_avx512(src, map.masks.data(), map.offsets.data(), full, mul, scale, dst);
}

void unpack_row(const float* src, const LaneMap& map, int64_t full, const float* mul, const float* add,
                float* dst) {
  unpack_row_avx512(src, map.masks.data(), map.offsets.data(), full, mul, add, dst);
}

}  // namespace cpu
}  // namespace fg
