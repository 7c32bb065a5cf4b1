// Scratch memory for the temporaries of CPU kernel calls, reused from call to call.
//
// A gated layer's temporaries (the gathered x, the compact GEMM result, dy's active rows, the
// compact dx) have ragged sizes that change with the active sets. glibc serves blocks of that size
// with fresh mmap()s or from a heap top it trims again, and every page of such a block costs a page
// fault when first written: on 528 tokens of MiniLM's layers with 22.5% of rows and columns closed
// that was 50-950 faults per forward + backward and ~10% of its time. A Workspace hands out pieces
// of one buffer per thread instead, kept between calls and grown to the largest need seen.
//
// Workspaces nest as a stack per thread: one opened inside another (a block of tokens, on whichever
// thread runs it) hands out the memory after its parent's and gives it back when it closes, so that
// the next block reuses the same, still cached, memory. Each thread asks only its own Workspaces.
//
// Only a call's own temporaries come from here: never an output, a saved tensor or a cached block.
// A temporary that outlives its Workspace anyway keeps its memory alive (each piece holds the
// buffer) and the thread takes a new buffer for later calls, so nothing is ever written under it.
#pragma once

#include <ATen/ATen.h>

namespace fg {
namespace cpu {

struct Arena;  // a thread's buffer

class Workspace {
 public:
  Workspace();
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // An uninitialised contiguous tensor, valid while this Workspace lives. Call it on the thread
  // that opened the Workspace (elsewhere it allocates normally).
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);

 private:
  Arena* arena_;
  int64_t mark_;            // the arena's offset when this Workspace opened
  int64_t demand_mark_;     // the arena's demand then
};

}  // namespace cpu
}  // namespace fg
