// Vectorised gather and scatter of a sorted index set along a row, for float32 on AVX-512 CPUs.
//
// Random gates leave an active column every one or two positions, so a scalar gather or scatter
// costs about a cycle per element, which measured slower than the GEMM's own share of the work at
// 128 tokens and 4x slower than a memset of the output at 2048. AVX-512 packs (compress) and
// unpacks (expand) 16 lanes per instruction under a bit mask, which is exactly this pattern: the
// mask of each 16-column chunk says which of its columns are active, in order.
//
// No ATen here: AVX-512 is enabled for the kernel functions only (target attribute). pack_row and
// unpack_row must only be called where lane_pack_available() is true; elsewhere callers take their
// generic scalar path (also used for other dtypes, strided rows and unsorted index lists).
#pragma once

#include <cstdint>
#include <vector>

namespace fg {
namespace cpu {

// True when the CPU has AVX-512F and the environment variable FG_CPU_SIMD is not "0" (which forces
// the generic paths, so that tests cover them on any machine).
bool lane_pack_available();

// An index set over a full dimension, 16 columns per chunk: bit j of masks[c] is set when column
// 16c + j is in the (strictly increasing) index list, and offsets[c] is the number of indices
// before chunk c (where its columns start in the packed row; precomputed so that the chunks of a
// row are independent of each other).
struct LaneMap {
  std::vector<uint16_t> masks;
  std::vector<int32_t> offsets;
  bool empty() const { return masks.empty(); }
};
LaneMap lane_map(const int64_t* idx, int64_t n_idx, int64_t full);

// dst[i] = src[idx[i]] * mul * (scale ? scale[i] : 1) for the n_idx active columns of a row of
// `full` elements, where `map` = lane_map(idx, n_idx, full). Writes exactly n_idx values.
void pack_row(const float* src, const LaneMap& map, int64_t full, float mul, const float* scale, float* dst);

// dst[c] = src[i] * (mul ? mul[c] : 1) + (add ? add[c] : 0) for c = idx[i], and 0 for every other
// c in [0, full): the inverse of pack_row. `mul` and `add` are full-width; their values outside the
// active set are never used.
void unpack_row(const float* src, const LaneMap& map, int64_t full, const float* mul, const float* add,
                float* dst);

}  // namespace cpu
}  // namespace fg
