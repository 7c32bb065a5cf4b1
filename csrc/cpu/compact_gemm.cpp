// CPU building blocks: gathers, scatters and the blocked GEMM + fused epilogue.
#include "compact_gemm.h"

#include "trace.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace fg {
namespace cpu {

namespace {

bool strictly_increasing(const std::vector<int64_t>& v) {
  for (size_t i = 1; i < v.size(); ++i) {
    if (v[i] <= v[i - 1]) return false;
  }
  return true;
}

// How write_row fills the columns outside the active set.
enum class ZeroFill {
  kNone,  // the active set is the whole row
  kGaps,  // sorted with few gaps: memset only the gaps, each element written once
  kRow,   // memset the whole row first, then scatter: one fast vectorised pass instead of a
          // memset call per gap (random gates leave a gap every few columns, and hundreds of
          // tiny memsets per row cost more than the GEMM's epilogue itself at 128 tokens)
};

ZeroFill zero_fill(const Active& a) {
  if (a.all) return ZeroFill::kNone;
  if (!a.is_sorted()) return ZeroFill::kRow;
  int64_t gaps = 0, prev = 0;
  for (const int64_t c : a.idx) {
    gaps += c > prev;
    prev = c + 1;
  }
  gaps += a.full > prev;
  return gaps <= std::max<int64_t>(8, a.full / 256) ? ZeroFill::kGaps : ZeroFill::kRow;
}

// Writes one output row: dst[idx[i]] = f(i) for the active set, zero elsewhere (the last write
// wins for a repeated index).
template <typename scalar_t, typename F>
inline void write_row(scalar_t* dst, const Active& a, ZeroFill fill, F f) {
  const int64_t n = a.size();
  if (fill == ZeroFill::kNone) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(f(i));
    return;
  }
  const int64_t* idx = a.idx.data();
  if (fill == ZeroFill::kGaps) {
    int64_t prev = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = idx[i];
      if (c > prev) std::memset(dst + prev, 0, sizeof(scalar_t) * (c - prev));
      dst[c] = static_cast<scalar_t>(f(i));
      prev = c + 1;
    }
    if (a.full > prev) std::memset(dst + prev, 0, sizeof(scalar_t) * (a.full - prev));
  } else {
    std::memset(dst, 0, sizeof(scalar_t) * a.full);
    for (int64_t i = 0; i < n; ++i) dst[idx[i]] = static_cast<scalar_t>(f(i));
  }
}

// A compact per-index vector spread to the full width of `a` (zeros elsewhere), the form in which
// unpack_row reads a bias or a scale.
std::vector<float> spread(const float* compact, const Active& a) {
  std::vector<float> full(static_cast<size_t>(a.full), 0.0f);
  for (int64_t i = 0; i < a.size(); ++i) full[a.idx[i]] = compact[i];
  return full;
}

// Rows [0, n) of a compact block (row stride lds, at least |a| columns) written into the full-width
// rows of dst (row stride a.full): dst[m, a.idx[i]] = src[m, i] * mul[i] + add[i] (mul, add compact
// and optional), zeros in every other column; parallel over rows.
template <typename scalar_t>
void scatter_block(const scalar_t* src, int64_t lds, int64_t n, const Active& a,
                   const at::opmath_type<scalar_t>* mul, const scalar_t* add, scalar_t* dst) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (use_lanes<scalar_t>(a)) {
      const std::vector<float> mul_full = mul ? spread(mul, a) : std::vector<float>();
      const std::vector<float> add_full = add ? spread(add, a) : std::vector<float>();
      const float* mf = mul ? mul_full.data() : nullptr;
      const float* af = add ? add_full.data() : nullptr;
      at::parallel_for(0, n, row_grain(a.full), [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) unpack_row(src + m * lds, a.lanes, a.full, mf, af, dst + m * a.full);
      });
      return;
    }
  }
  const ZeroFill fill = zero_fill(a);
  at::parallel_for(0, n, row_grain(a.full), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const scalar_t* srow = src + m * lds;
      scalar_t* drow = dst + m * a.full;
      if (!mul && !add) {
        write_row(drow, a, fill, [&](int64_t i) { return srow[i]; });
      } else {
        write_row(drow, a, fill, [&](int64_t i) {
          const acc_t v = mul ? static_cast<acc_t>(srow[i]) * mul[i] : static_cast<acc_t>(srow[i]);
          return add ? v + static_cast<acc_t>(add[i]) : v;
        });
      }
    }
  });
}

// The closed fraction below which a set stays whole (gate_set).
constexpr double kWholeBelow = 0.1;

// A partial, sorted set of `open` entries made whole: every entry, the closed ones with value 0.
void keep_whole_if_cheaper(GateSet& s) {
  static const double below = [] {
    const char* e = std::getenv("FG_CPU_WHOLE_BELOW");
    return e && *e ? std::max(std::atof(e), 0.0) : kWholeBelow;
  }();
  Active& a = s.active;
  const int64_t open = a.size();
  if (a.all || open == 0 || static_cast<double>(a.full - open) >= below * a.full) return;
  Scale whole;
  whole.reserve(a.full);
  for (int64_t i = 0, j = 0; i < a.full; ++i) {
    const bool on = j < open && a.idx[j] == i;
    whole.push_back(on ? (s.values.empty() ? 1.0 : s.values[j]) : 0.0);
    j += on;
  }
  s.values = std::move(whole);
  a = Active{{}, a.full, true};
}

}  // namespace

void build_lanes(Active& a) {
  a.lanes = LaneMap();
  if (a.all || !lane_pack_available() || !strictly_increasing(a.idx)) return;
  a.lanes = lane_map(a.idx.data(), static_cast<int64_t>(a.idx.size()), a.full);
}

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

void pad_for_gemm(Active& a) {
  static const int64_t multiple = [] {
    const char* s = std::getenv("FG_CPU_PAD");
    return s ? std::max<long long>(std::atoll(s), 1) : 16;
  }();
  if (a.all || a.size() == 0) return;
  a.pad = (multiple - a.size() % multiple) % multiple;
}

std::vector<int64_t> closed_in_whole(const GateSet& s) {
  std::vector<int64_t> closed;
  if (!s.active.all || s.values.empty()) return closed;
  for (int64_t i = 0; i < s.values.size(); ++i) {
    if (s.values[i] == 0.0) closed.push_back(i);
  }
  return closed;
}

void exact_if_nonfinite(GateSet& s, const at::Tensor& gate, const at::Tensor& t) {
  if (!t.defined() || t.size(0) == 0) return;
  const std::vector<int64_t> closed = closed_in_whole(s);
  if (closed.empty()) return;
  const at::Tensor idx = at::tensor(closed, t.options().dtype(at::kLong));
  if (!at::isfinite(t.index_select(1, idx)).all().item<bool>()) s = gate_set(gate, /*allow_whole=*/false);
}

GateSet gate_set(const at::Tensor& gate, bool allow_whole) {
  // Read in the gate's own dtype (a conversion would cost an allocation and a dispatch per call).
  const at::Tensor g = gate.contiguous();
  const int64_t n = g.numel();
  GateSet s;
  s.active.full = n;
  s.active.idx.reserve(n);
  s.values.reserve(n);
  bool all_one = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "fg_gate_set", [&] {
    const scalar_t* p = g.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(p[i]);
      if (v != 0.0) {
        s.active.idx.push_back(i);
        s.values.push_back(v);
        all_one = all_one && v == 1.0;
      }
    }
  });
  s.active.all = static_cast<int64_t>(s.active.idx.size()) == n;
  if (s.active.all) s.active.idx.clear();
  if (all_one) s.values.clear();
  if (allow_whole) keep_whole_if_cheaper(s);
  build_lanes(s.active);
  return s;
}

Active index_set(const c10::optional<at::Tensor>& idx, int64_t full, const char* name, const char* what,
                 bool distinct) {
  Active a;
  a.full = full;
  if (!idx.has_value()) return a;
  const at::Tensor i64 = idx->scalar_type() == at::kLong ? idx->contiguous() : idx->to(at::kLong).contiguous();
  const int64_t* p = i64.data_ptr<int64_t>();
  const int64_t n = i64.numel();
  a.idx.assign(p, p + n);
  a.all = false;
  int64_t lo = 0, hi = 0;
  if (n > 0) {
    lo = hi = p[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
  }
  TORCH_CHECK_INDEX(n == 0 || (lo >= 0 && hi < full), name, " values must lie in [0, ", full, ") (", what,
                    "), got range [", lo, ", ", hi, "]");
  if (distinct && !strictly_increasing(a.idx)) {
    // Sorted, not a bitmap of `full` entries: `full` comes from the caller (out_features) and may be
    // far larger than memory; the list itself is at most the layer's rows.
    std::vector<int64_t> sorted(a.idx);
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    TORCH_CHECK_VALUE(dup == sorted.end(), name, " values must be distinct (each output is written once), got ",
                      *dup, " more than once");
  }
  build_lanes(a);
  return a;
}

bool Active::is_sorted() const { return all || strictly_increasing(idx); }

at::Tensor gather_block(const at::Tensor& weight, const Active& rows, const Active& cols,
                        const Scale& row_scale, const Scale& col_scale) {
  if (rows.all && cols.all && row_scale.empty() && col_scale.empty()) return weight;
  const int64_t nr = rows.size(), nc = cols.size(), ldo = cols.padded();
  at::Tensor out = at::empty({rows.padded(), ldo}, weight.options());
  if (rows.pad > 0) out.narrow(0, nr, rows.pad).zero_();
  if (nr == 0 || nc == 0) {
    out.zero_();
    return out;
  }
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "fg_gather_block", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* rs = row_scale.as<acc_t>();
    const acc_t* cs = col_scale.as<acc_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t* c = cols.all ? nullptr : cols.idx.data();
    at::parallel_for(0, nr, row_grain(s1 == 1 ? nc : 4 * nc), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = rows.all ? i : rows.idx[i];
        const scalar_t* src = w + r * s0;
        scalar_t* dst = o + i * ldo;
        if (cols.pad > 0) std::memset(dst + nc, 0, sizeof(scalar_t) * cols.pad);
        if (!rs && !cs && !c && s1 == 1) {
          std::memcpy(dst, src, sizeof(scalar_t) * nc);
          continue;
        }
        const acc_t ri = rs ? rs[i] : acc_t(1);
        if (s1 == 1 && try_pack_row(src, cols, ri, cs, dst)) continue;
        for (int64_t j = 0; j < nc; ++j) {
          const acc_t v = static_cast<acc_t>(src[(c ? c[j] : j) * s1]);
          dst[j] = static_cast<scalar_t>(cs ? v * ri * cs[j] : v * ri);
        }
      }
    });
  });
  return out;
}

at::Tensor gather_cols(const at::Tensor& x2, const Active& cols, const Scale& scale, Workspace* ws) {
  TORCH_INTERNAL_ASSERT(x2.dim() == 2 && (x2.stride(1) == 1 || x2.size(1) <= 1));
  const int64_t M = x2.size(0), nc = cols.size(), ldo = cols.padded();
  at::Tensor out = ws ? ws->empty({M, ldo}, x2.options()) : at::empty({M, ldo}, x2.options());
  if (M == 0 || ldo == 0) return out;
  const int64_t ld = x2.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(), "fg_gather_cols", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* sc = scale.as<acc_t>();
    const scalar_t* x = x2.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t* c = cols.all ? nullptr : cols.idx.data();
    at::parallel_for(0, M, row_grain(nc), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* src = x + m * ld;
        scalar_t* dst = o + m * ldo;
        if (cols.pad > 0) std::memset(dst + nc, 0, sizeof(scalar_t) * cols.pad);
        if (try_pack_row(src, cols, acc_t(1), sc, dst)) continue;
        if (c == nullptr && sc == nullptr) {
          std::memcpy(dst, src, sizeof(scalar_t) * nc);
        } else if (c == nullptr) {
          for (int64_t j = 0; j < nc; ++j) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) * sc[j]);
        } else if (sc == nullptr) {
          for (int64_t j = 0; j < nc; ++j) dst[j] = src[c[j]];
        } else {
          for (int64_t j = 0; j < nc; ++j)
            dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[c[j]]) * sc[j]);
        }
      }
    });
  });
  return out;
}

void scatter_cols(const at::Tensor& src, const Active& cols, const Scale& scale,
                  at::Tensor& dst) {
  const int64_t M = dst.size(0), nc = cols.size();
  TORCH_INTERNAL_ASSERT(dst.is_contiguous() && dst.size(1) == cols.full);
  TORCH_INTERNAL_ASSERT(src.size(0) == M && src.size(1) >= nc && (src.stride(1) == 1 || nc <= 1));
  if (M == 0) return;
  const int64_t lds = src.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst.scalar_type(), "fg_scatter_cols", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scatter_block<scalar_t>(src.data_ptr<scalar_t>(), lds, M, cols, scale.as<acc_t>(), nullptr,
                            dst.data_ptr<scalar_t>());
  });
}

void scatter_rows_cols(const at::Tensor& src, const Active& rows, const Active& cols, at::Tensor& dst) {
  const int64_t nr = rows.size(), nc = cols.size();
  TORCH_INTERNAL_ASSERT(dst.is_contiguous() && dst.size(0) == rows.full && dst.size(1) == cols.full);
  TORCH_INTERNAL_ASSERT(src.size(0) >= nr && src.size(1) >= nc);
  if (nr == 0 || nc == 0) return;
  const at::Tensor s = src.narrow(0, 0, nr).narrow(1, 0, nc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst.scalar_type(), "fg_scatter_rows_cols", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    at::parallel_for(0, nr, row_grain(nc), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* drow = d + (rows.all ? i : rows.idx[i]) * cols.full;
        const scalar_t* srow = sp + i * nc;
        if (cols.all) {
          std::memcpy(drow, srow, sizeof(scalar_t) * nc);
        } else {
          for (int64_t j = 0; j < nc; ++j) drow[cols.idx[j]] = srow[j];
        }
      }
    });
  });
}

// A layer runs as one block with a multi-threaded BLAS call up to kOneBlock tokens, and also while
// there would be fewer than kBlocksPerThread blocks of kTokenBlock per thread: per-thread blocks make
// each thread's BLAS pack the whole weight, and with one or two blocks per thread nothing balances a
// thread that falls behind (at 528 and 768 tokens on 2 threads, 2 and 3 blocks measured 0.5-1 ms
// slower per forward + backward of a 384x1536 layer than one block; at 1024, 4 blocks ~5% faster).
// Above, blocks of kTokenBlock are shared out by for_token_blocks. Smaller blocks make each thread's
// BLAS re-pack the weight too often, larger ones let the compact result fall out of cache before the
// scatter reads it and leave fewer blocks to balance a busy core with.
constexpr int64_t kOneBlock = 512;
constexpr int64_t kBlocksPerThread = 2;
constexpr int64_t kTokenBlock = 256;

bool fold_lora(at::ScalarType dtype, int64_t M, const Active& rows, const Active& cols, bool reused) {
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  const int64_t nR = rows.size(), nC = cols.size();
  return reused || nR * nC <= M * (nR + nC);
}

int64_t row_grain(int64_t row_elems) {
  static const int64_t task_elems = [] {
    const char* s = std::getenv("FG_CPU_TASK_ELEMS");
    return s ? std::max<long long>(std::atoll(s), 1) : int64_t{1} << 15;
  }();
  return std::max<int64_t>(1, task_elems / std::max<int64_t>(row_elems, 1));
}

int64_t token_block(int64_t M) {
  static const int64_t env_block = [] {
    const char* s = std::getenv("FG_CPU_BLOCK_M");
    return s && *s ? std::atoll(s) : int64_t{-1};
  }();
  if (env_block > 0) return std::min<int64_t>(env_block, std::max<int64_t>(M, 1));
  // Blocks of equal size: a ragged last block of a few tokens runs its GEMM far below speed
  // (16 of 528 tokens measured at half the per-token rate of the others).
  const int64_t n = (M + kTokenBlock - 1) / kTokenBlock;
  const bool one = env_block == 0 || M <= kOneBlock ||
                   (at::get_num_threads() > 1 && n < kBlocksPerThread * at::get_num_threads());
  if (one) return std::max<int64_t>(M, 1);
  return (M + n - 1) / n;
}

void compact_linear_forward(const at::Tensor& x2, const CompactLinear& p, at::Tensor& out) {
  const Active& rows = *p.rows;
  const Active& cols = *p.cols;
  const int64_t M = x2.size(0), nR = rows.size(), nC = cols.size(), ldh = rows.padded();
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.size(0) == M && out.size(1) == rows.full);
  if (M == 0) return;
  if (nR == 0) {
    out.zero_();  // every output row removed: no GEMM at all
    return;
  }
  const bool lora = p.lora_a_c.defined() && nC > 0;
  const at::Tensor wt = p.weight_c.t();
  auto gemm = [&](const at::Tensor& xb, at::Tensor& hb, bool with_bias) {
    FG_TRACE("fg::cpu::gemm");
    const int64_t mb = xb.size(0);
    if (nC == 0) {
      // Every input column removed: the GEMM contributes nothing, only the bias remains.
      if (with_bias) {
        hb.copy_(p.bias_c.expand({mb, nR}));
      } else {
        hb.zero_();
      }
    } else if (with_bias) {
      at::addmm_out(hb, p.bias_c, xb, wt);
    } else {
      at::mm_out(hb, xb, wt);
    }
    if (lora) hb.addmm_(at::mm(xb, p.lora_a_c.t()), p.lora_b_r.t(), 1.0, p.lora_scale);
  };

  if (rows.all) {
    // No scatter: one GEMM (with the bias) over all tokens writes `out` directly; blocking would
    // make the BLAS re-pack the whole weight once per block (measured ~10% at 768->3072).
    Workspace ws;
    const at::Tensor xc = cols.all ? x2 : gather_cols(x2, cols, {}, &ws);
    gemm(xc, out, p.bias_c.defined());
    return;
  }
  // Blocks of tokens: gather, GEMM into a compact buffer still in cache for the epilogue (bias and
  // scatter into the active output columns, zeros elsewhere).
  for_token_blocks(M, token_block(M), [&](int64_t m0, int64_t mb) {
    Workspace ws;  // this block's gathered x and GEMM result, reused by the thread's next block
    at::Tensor xb = mb == M ? x2 : x2.narrow(0, m0, mb);
    if (!cols.all) {
      FG_TRACE("fg::cpu::gather_x");
      xb = gather_cols(xb, cols, {}, &ws);
    }
    at::Tensor hb = ws.empty({mb, ldh}, out.options());
    gemm(xb, hb, false);
    FG_TRACE("fg::cpu::epilogue");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fg_epilogue", [&] {
      const scalar_t* b = p.bias_c.defined() ? p.bias_c.data_ptr<scalar_t>() : nullptr;
      scatter_block<scalar_t>(hb.data_ptr<scalar_t>(), ldh, mb, rows, nullptr, b,
                              out.data_ptr<scalar_t>() + m0 * rows.full);
    });
  });
}

}  // namespace cpu
}  // namespace fg
