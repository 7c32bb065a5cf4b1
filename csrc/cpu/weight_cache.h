// The gathered, gate-folded weight block of a frozen weight, kept between calls.
//
// Folding the gates into W[R][:, C] reads every active row of the weight: at 128 tokens that pass
// costs a third of the GEMM. In evaluation and inference the gates do not change between calls,
// and in a training step the backward reads the same block as its forward, so the block is kept
// per weight and rebuilt only when the weight, the active sets or the gate values differ.
//
// With LoRA the block may hold the adapter too (W_f + s B_f A_f, see fold_lora in compact_gemm.h);
// its key then also holds a copy of the factors' values (an optimizer may update them without
// bumping their version counter: fused AdamW does not).
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

// The LoRA term folded into a block: s * b_f a_f with the gate-folded factors b_f = g_r B[R]
// (rows.padded() x r, zero padding) and a_f = A[:, C] g_c (r x cols.padded()); a and b are the
// factors themselves, for the key (their values). `fold` says whether
// the term goes into the weight block (fold_lora) or runs on the low-rank path; decided here once,
// so that a backward asks for the block its forward built.
struct LoraTerm {
  at::Tensor a, b, a_f, b_f;
  double scale = 1.0;
  bool fold = false;
  bool defined() const { return a.defined(); }
};

// The term of optional LoRA factors (A (r, K), B (N, r)) with the gates of rows and cols folded in,
// for a call over M tokens; undefined tensors when there are none or the block is empty.
LoraTerm lora_term(const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b, double scale,
                   const GateSet& rows, const GateSet& cols, int64_t M);

// Who asks for a block: a backward, whose forward built it in this step, or a forward, which may
// reuse an earlier call's block only inside a frozen_weights() scope.
enum class Reuse { kSameStep, kFrozenScopeOnly };

// diag(rows.values) W[rows][:, cols] diag(cols.values) (+ lora->scale * lora->b_f lora->a_f when
// `lora` is given), as gather_block returns it, from the cache when the same block was built for
// this weight before and `reuse` allows it. A backward takes its block out of the cache (outside a
// frozen_weights() scope nothing reads it again: the next step's gates differ), so blocks do not
// outlive the step that built them.
at::Tensor folded_block(const at::Tensor& weight, const GateSet& rows, const GateSet& cols, Reuse reuse,
                        const LoraTerm* lora = nullptr);

// True while a frozen_weights() scope is open.
bool frozen_scope_open();

// Drops every cached block (tests; memory).
void clear_weight_cache();

// Bytes held by the cache now.
int64_t weight_cache_bytes();

// Opens (delta 1) or closes (delta -1) a frozen_weights() scope; returns how many are open.
int64_t enter_frozen_weights(int64_t delta);

}  // namespace cpu
}  // namespace fg
