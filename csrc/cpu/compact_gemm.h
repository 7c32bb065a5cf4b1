// The CPU building blocks shared by fg::gated_linear and fg::gathered_linear.
//
// Both ops reduce to one pattern: gather (and scale) the active columns of x, one GEMM against a
// compact weight block, and an epilogue that adds the bias, scales by the row gate and writes the
// active output columns while zeroing the rest. The GEMM runs per block of tokens so that the
// gathered input and the GEMM result of a block are still in cache when the epilogue reads them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lane_pack.h"
#include "workspace.h"

namespace fg {
namespace cpu {

// Gate values (a scale per row or column), kept in double so that a float64 layer keeps their
// precision, and in float for the other layers' float math: each kernel reads the copy of its
// compute type (`as<acc_t>()`) without converting per call. Empty means all 1.
class Scale {
 public:
  bool empty() const { return d_.empty(); }
  int64_t size() const { return static_cast<int64_t>(d_.size()); }
  double operator[](int64_t i) const { return d_[i]; }
  const std::vector<double>& values() const { return d_; }
  void reserve(int64_t n) {
    d_.reserve(n);
    f_.reserve(n);
  }
  void push_back(double v) {
    d_.push_back(v);
    f_.push_back(static_cast<float>(v));
  }
  void clear() {
    d_.clear();
    f_.clear();
  }
  // The values as float (float, half and bfloat16 layers) or double (float64), nullptr when empty.
  template <typename acc_t>
  const acc_t* as() const;

 private:
  std::vector<double> d_;
  std::vector<float> f_;
};

template <>
inline const float* Scale::as<float>() const {
  return f_.empty() ? nullptr : f_.data();
}
template <>
inline const double* Scale::as<double>() const {
  return d_.empty() ? nullptr : d_.data();
}

// x as (tokens, K) rows with unit stride in the last dimension (a copy only when a view cannot do).
at::Tensor as_rows(const at::Tensor& x, int64_t K);

// The shape of x with its last dimension replaced by `last`.
std::vector<int64_t> out_shape(const at::Tensor& x, int64_t last);

// An active set: indices into a full dimension, or "all of it" (identity, no gather needed).
struct Active {
  std::vector<int64_t> idx;  // sorted, unique when built from a gate
  int64_t full = 0;          // size of the full dimension
  bool all = true;           // idx == 0..full-1
  int64_t pad = 0;           // extra zero entries appended in compact buffers (friendly GEMM widths)
  // lane_map of a sorted partial set when float32 rows can use lane_pack (else empty).
  LaneMap lanes;
  int64_t size() const { return all ? full : static_cast<int64_t>(idx.size()); }
  int64_t padded() const { return size() + pad; }
  bool is_sorted() const;  // strictly increasing: the epilogue may then zero only the gaps
};

// Fills a.lanes when the set is partial, strictly increasing and lane_pack is available.
void build_lanes(Active& a);

// Rounds a partial active set's compact width up to a multiple that the BLAS handles at full speed
// (an odd width was measured to run slower than the whole dense size). The padding is exact: padded
// input columns are zero and padded output columns are never written back.
void pad_for_gemm(Active& a);

// True when rows of scalar_t over this set can be packed / unpacked with lane_pack.
template <typename scalar_t>
inline bool use_lanes(const Active& a) {
  return std::is_same<scalar_t, float>::value && !a.lanes.empty();
}

// dst[i] = src[a.idx[i]] * mul * scale[i] (scale may be null) with lane_pack where it applies
// (float32 rows of a sorted set); false when the caller must take its generic path.
template <typename scalar_t, typename acc_t>
inline bool try_pack_row(const scalar_t* src, const Active& a, acc_t mul, const acc_t* scale, scalar_t* dst) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (use_lanes<scalar_t>(a)) {
      pack_row(src, a.lanes, a.full, mul, scale, dst);
      return true;
    }
  }
  return false;
}

// dst[i] = src[a.idx[i]] for the |a| active entries of a row of a.full elements.
template <typename scalar_t>
inline void pack_cols(const scalar_t* src, const Active& a, scalar_t* dst) {
  using acc_t = at::opmath_type<scalar_t>;
  if (try_pack_row(src, a, acc_t(1), static_cast<const acc_t*>(nullptr), dst)) return;
  const int64_t n = a.size();
  if (a.all) {
    std::memcpy(dst, src, sizeof(scalar_t) * n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = src[a.idx[i]];
}

// The set a kernel runs a gate on: its non-zero entries and the gate values there (empty when
// every value is 1, so that callers can skip the scaling). A nearly complete set is kept whole
// instead: all entries, the few closed ones as zero values, which (folded into the block) zero their
// rows or columns exactly inside the GEMM. Gathering a dimension costs passes over the tokens (x in
// and dx out for columns, the output and dy for rows) and a GEMM of a ragged width, which a few
// closed entries do not pay back: with 2.5% of the rows and of the columns closed, a training step
// took 1.10x a LoRA step gathered and 1.02x whole on MiniLM (0.97x with every gate open), 1.02x and
// 0.95x on LLaMA-60M. One layer's forward + backward (528 tokens, LoRA r=8, 384x384, 1536x384 and
// 384x1536) broke even between 5% and 20% closed, so a set stays whole while under
// FG_CPU_WHOLE_BELOW (env, default 0.1; 0 always gathers) of it is closed. Forward and backward
// both take their sets from here, so the backward finds its forward's block.
struct GateSet {
  Active active;
  Scale values;  // gate values over `active`, or empty when they are all exactly 1
};
GateSet gate_set(const at::Tensor& gate, bool allow_whole = true);
// The closed entries of a set kept whole (value 0), in order; empty for a set that is not whole.
std::vector<int64_t> closed_in_whole(const GateSet& s);
// A set kept whole multiplies its closed entries by their zero gate, and 0 * inf is NaN where a
// closed row or column must contribute nothing: when `t` (tokens x the set's dimension) holds a NaN
// or inf at a closed entry, `s` becomes the exact set of `gate` instead (one read of those entries).
void exact_if_nonfinite(GateSet& s, const at::Tensor& gate, const at::Tensor& t);

// Active set from a user-supplied index tensor; undefined -> all. Values must lie in [0, full):
// checked while they are copied (one pass, no reductions dispatched), the error names `name`
// and `what` (the bound's meaning). With `distinct`, no value may repeat (row_idx: each output is
// written once); a strictly increasing list passes without the extra pass.
Active index_set(const c10::optional<at::Tensor>& idx, int64_t full, const char* name = "index",
                 const char* what = "size", bool distinct = false);

// diag(row_scale) W[rows][:, cols] diag(col_scale) as a new contiguous (rows.padded(),
// cols.padded()) tensor, zero in the padding (a scale may be empty = 1). Returns `weight` itself
// when both sets are complete and there is nothing to scale. Folding the gates into the weight
// here is free (the gather writes the block anyway) and leaves the GEMM's epilogue only the bias
// and the scatter; with every row and column active it costs one pass over the weight, where
// scaling x and the output would cost passes over (M, K) and (M, N).
at::Tensor gather_block(const at::Tensor& weight, const Active& rows, const Active& cols,
                        const Scale& row_scale = {}, const Scale& col_scale = {});

// x2[:, cols] * scale (scale may be empty = 1) as a contiguous (M, cols.padded()) tensor, zero in
// the padding, parallel over rows, in `ws` when given. x2 must have unit stride in its last dimension.
at::Tensor gather_cols(const at::Tensor& x2, const Active& cols, const Scale& scale, Workspace* ws = nullptr);

// Writes the first |cols| columns of `src` (compact, (n, >= |cols|), unit inner stride) into the columns `cols` of `dst` rows (n, full), times
// `scale` (may be empty = 1), zeroing every other column; parallel over rows.
void scatter_cols(const at::Tensor& src, const Active& cols, const Scale& scale,
                  at::Tensor& dst);

// dst[rows[i], cols[j]] = src[i, j] for a zero-initialised, contiguous dst (weight gradients).
void scatter_rows_cols(const at::Tensor& src, const Active& rows, const Active& cols, at::Tensor& dst);

// The fused forward: out[:, rows] = gather(x2, cols) @ weight_c.T
//                                   + lora_scale * (gather(x2, cols) @ lora_a_c.T) @ lora_b_r.T + bias_c,
// other columns of out are 0 (gates, if any, are already folded into the compact operands).
// out is (M, rows.full) and contiguous; weight_c is (rows.padded(), cols.padded()) with any
// strides; bias_c is compact (>= |rows| long) or undefined; lora_* compact or undefined.
struct CompactLinear {
  const Active* cols;
  const Active* rows;
  at::Tensor weight_c;
  at::Tensor bias_c;
  at::Tensor lora_a_c;  // (r, cols.padded())
  at::Tensor lora_b_r;  // (rows.padded(), r)
  double lora_scale = 1.0;
};
void compact_linear_forward(const at::Tensor& x2, const CompactLinear& p, at::Tensor& out);

// Whether a LoRA term runs folded into the weight block (W_f + s B_f A_f: one GEMM per direction)
// rather than on the low-rank path (x A_f^T B_f^T: two skinny GEMMs and a pass over the output
// columns in the forward, and again over dx in the backward). Folding costs one |R| x |C| x r GEMM
// into the block, which a frozen_weights() scope reuses; the low-rank path costs about
// M (|R| + |C|) r multiply-adds and a pass over M x |R| (M x |C|) per direction. Only float32 and
// float64: a half-precision block would round the small adapter delta away against W's entries.
bool fold_lora(at::ScalarType dtype, int64_t M, const Active& rows, const Active& cols, bool reused);

// Rows per at::parallel_for task in a memory-bound pass over rows of `row_elems` elements: enough
// that a pass too small to pay for a parallel region runs on the calling thread alone (env
// FG_CPU_TASK_ELEMS overrides the elements per task).
int64_t row_grain(int64_t row_elems);

// Token-block size for the blocked GEMM + scatter epilogue (env FG_CPU_BLOCK_M overrides; 0 = one
// block).
int64_t token_block(int64_t M);

// Runs f(m0, mb) over the blocks [m0, m0 + mb) of `block` tokens out of M. Several blocks run in
// one parallel region whose threads each take the next block from a shared counter: a thread that
// the OS deschedules (another process on its core) then does fewer blocks instead of holding the
// others at a barrier, and the op pays for one region instead of one per pass per block; inside a
// block everything (gathers, scatters, BLAS) runs on its thread alone. One block runs on the
// calling thread, with the BLAS and the passes parallel inside it.
template <typename F>
void for_token_blocks(int64_t M, int64_t block, const F& f) {
  const int64_t n = (M + block - 1) / block;
  const int64_t threads = at::get_num_threads();
  if (n <= 1 || threads == 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i * block, std::min(block, M - i * block));
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) f(i * block, std::min(block, M - i * block));
  });
}

}  // namespace cpu
}  // namespace fg
