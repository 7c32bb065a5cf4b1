// The gathered, gate-folded weight block of a frozen weight, kept between calls.
//
// Folding the gates into W[R][:, C] reads every active row of the weight: at 128 tokens that pass
// costs a third of the GEMM. In evaluation and inference the gates do not change between calls,
// and in a training step the backward reads the same block as its forward, so the block is kept
// per weight and rebuilt only when the weight, the active sets or the gate values differ.
//
// Only weights that do not require grad are cached (a frozen weight, as in FineGates fine-tuning);
// a change is seen through the tensor's version counter, so in-place updates (optimizer steps,
// load_state_dict, copy_ under no_grad) invalidate the block. A write through `weight.data`
// bypasses that counter: such a weight must be written through the tensor itself, or the cache
// turned off (FG_CPU_WEIGHT_CACHE_MB=0). The cache holds at most FG_CPU_WEIGHT_CACHE_MB MiB
// (default 1024), least recently used first out; blocks of weights that no longer exist are dropped.
#pragma once

#include <ATen/ATen.h>

#include "compact_gemm.h"

namespace fg {
namespace cpu {

// diag(rows.values) W[rows][:, cols] diag(cols.values), as gather_block returns it, from the cache
// when the same block was built for this weight before.
at::Tensor folded_block(const at::Tensor& weight, const GateSet& rows, const GateSet& cols);

// Drops every cached block (tests; memory).
void clear_weight_cache();

// Bytes held by the cache now.
int64_t weight_cache_bytes();

}  // namespace cpu
}  // namespace fg
