// Per-thread scratch buffers for kernel temporaries (see workspace.h).
#include "workspace.h"

#include <c10/util/accumulate.h>

#include <algorithm>

namespace fg {
namespace cpu {

struct Arena {
  at::Tensor buffer;   // bytes; undefined until a call needs one
  int64_t used = 0;    // bytes handed out by the open Workspaces
  int64_t demand = 0;  // bytes they asked for, also those the buffer could not hold
  int64_t peak = 0;    // the largest demand since the buffer last grew
  int64_t open = 0;    // Workspaces open on this thread
};

namespace {

constexpr int64_t kAlign = 64;          // each temporary starts on a cache line
constexpr int64_t kGrowStep = 1 << 20;  // the buffer grows in whole MiB

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

Arena& this_thread_arena() {
  thread_local Arena arena;
  return arena;
}

int64_t capacity(const Arena& a) { return a.buffer.defined() ? static_cast<int64_t>(a.buffer.nbytes()) : 0; }

}  // namespace

Workspace::Workspace() : arena_(&this_thread_arena()), mark_(arena_->used), demand_mark_(arena_->demand) {
  ++arena_->open;
}

Workspace::~Workspace() {
  Arena& a = *arena_;
  a.used = mark_;
  a.demand = demand_mark_;
  if (--a.open > 0) return;
  // The outermost Workspace of this thread: every temporary should be gone. One still alive keeps
  // the old buffer, so later calls must not write under it.
  if (a.buffer.defined() && a.buffer.use_count() > 1) a.buffer = at::Tensor();
  if (a.peak > capacity(a)) a.buffer = at::empty({round_up(a.peak, kGrowStep)}, at::TensorOptions().dtype(at::kByte));
  a.peak = 0;
}

at::Tensor Workspace::empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t elem = static_cast<int64_t>(options.dtype().itemsize());
  const int64_t bytes = round_up(c10::multiply_integers(sizes) * elem, kAlign);
  Arena& a = *arena_;
  if (&a != &this_thread_arena() || bytes == 0 || options.device().type() != at::kCPU)
    return at::empty(sizes, options);
  a.demand += bytes;
  a.peak = std::max(a.peak, a.demand);
  if (a.used + bytes > capacity(a)) return at::empty(sizes, options);
  void* data = static_cast<uint8_t*>(a.buffer.data_ptr()) + a.used;
  a.used += bytes;
  return at::from_blob(data, sizes, [keep = a.buffer](void*) {}, options);
}

}  // namespace cpu
}  // namespace fg
