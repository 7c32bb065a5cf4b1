// The gathered, gate-folded weight block of a frozen weight, kept between calls.
//
// Folding the gates into W[R][:, C] reads every active row of the weight: at 128 tokens that pass
// costs a third of the GEMM. In evaluation and inference the gates do not change between calls,
// and in a training step the backward reads the same block as its forward, so the block is kept
// per weight and rebuilt only when the weight, the active sets or the gate values differ.
//
// Only weights that do not require grad are cached (a frozen weight, as in FineGates fine-tuning).
// A block is found again only where the weight provably did not change: the backward of a step
// reads its forward's block, and a forward reads an earlier call's block only inside an open
// fg_kernels.frozen_weights() scope (evaluation, inference), the caller's promise that the weight
// changes only through the tensor. Either way the block must match the weight's version counter
// (in-place updates: optimizer steps, load_state_dict, copy_ under no_grad) and its very storage
// (a swap through `weight.data = ...` or `module.half().float()` differs even when the allocator
// hands out the old address). Writes that bypass both (`weight.data.copy_`, `weight.numpy()[:]`)
// are never seen across calls outside such a scope. The cache holds at most FG_CPU_WEIGHT_CACHE_MB
// MiB (default 1024), least recently used first out; blocks of weights that no longer exist are dropped.
#pragma once

#include <ATen/ATen.h>

#include "compact_gemm.h"

namespace fg {
namespace cpu {

// Who asks for a block: a backward, whose forward built it in this step, or a forward, which may
// reuse an earlier call's block only inside a frozen_weights() scope.
enum class Reuse { kSameStep, kFrozenScopeOnly };

// diag(rows.values) W[rows][:, cols] diag(cols.values), as gather_block returns it, from the cache
// when the same block was built for this weight before and `reuse` allows it.
at::Tensor folded_block(const at::Tensor& weight, const GateSet& rows, const GateSet& cols, Reuse reuse);

// Drops every cached block (tests; memory).
void clear_weight_cache();

// Bytes held by the cache now.
int64_t weight_cache_bytes();

// Opens (delta 1) or closes (delta -1) a frozen_weights() scope; returns how many are open.
int64_t enter_frozen_weights(int64_t delta);

}  // namespace cpu
}  // namespace fg
