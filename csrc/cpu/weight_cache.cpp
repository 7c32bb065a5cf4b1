// The per-weight cache of folded weight blocks (see weight_cache.h).
#include "weight_cache.h"

#include <c10/util/intrusive_ptr.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <iterator>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fg {
namespace cpu {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
using WeakStorage = c10::weak_intrusive_ptr<c10::StorageImpl>;

// Open frozen_weights() scopes (any thread): while > 0 a forward may reuse an earlier call's block.
std::atomic<int64_t> reuse_scopes{0};

// Everything the folded block depends on, compared exactly.
struct BlockKey {
  int64_t version = 0;
  WeakStorage storage;  // the storage itself: a swapped one (`w.data = ...`) differs even at a reused address
  const void* data = nullptr;
  std::array<int64_t, 5> geometry{};  // sizes, strides, storage offset
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> rows, cols;           // index lists; empty = all
  int64_t row_pad = 0, col_pad = 0;
  std::vector<double> row_values, col_values;  // empty = all 1
};

std::array<int64_t, 5> geometry_of(const at::Tensor& w) {
  return {w.size(0), w.size(1), w.stride(0), w.stride(1), w.storage_offset()};
}

bool same_storage(const WeakStorage& held, const at::Tensor& weight) {
  return !held.expired() && held._unsafe_get_target() == weight.storage().unsafeGetStorageImpl();
}

// Compared in place (no copy of the index lists and values per call: the common case is a hit).
bool matches(const BlockKey& k, const at::Tensor& weight, const GateSet& rows, const GateSet& cols) {
  return k.version == weight._version() && same_storage(k.storage, weight) && k.data == weight.data_ptr() &&
         k.geometry == geometry_of(weight) && k.dtype == weight.scalar_type() && k.row_pad == rows.active.pad && k.col_pad == cols.active.pad &&
         k.rows == rows.active.idx && k.cols == cols.active.idx && k.row_values == rows.values.values() &&
         k.col_values == cols.values.values();
}

BlockKey key_of(const at::Tensor& weight, const GateSet& rows, const GateSet& cols) {
  return BlockKey{weight._version(),    weight.storage().getWeakStorageImpl(),
                  weight.data_ptr(),    geometry_of(weight),
                  weight.scalar_type(), rows.active.idx,
                  cols.active.idx,      rows.active.pad,
                  cols.active.pad,      rows.values.values(),
                  cols.values.values()};
}

struct Entry {
  WeakImpl owner;
  BlockKey key;
  at::Tensor block;
  std::list<const c10::TensorImpl*>::iterator lru;  // position in Cache::lru (front = newest)
};

int64_t budget_bytes() {
  static const int64_t budget = [] {
    const char* s = std::getenv("FG_CPU_WEIGHT_CACHE_MB");
    const long long mb = s ? std::atoll(s) : 1024;
    return static_cast<int64_t>(std::max<long long>(mb, 0)) << 20;
  }();
  return budget;
}

class Cache {
 public:
  at::Tensor find(const at::Tensor& weight, const GateSet& rows, const GateSet& cols) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(weight.unsafeGetTensorImpl());
    if (it == entries_.end() || it->second.owner.expired() || !matches(it->second.key, weight, rows, cols)) return {};
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return it->second.block;
  }

  void insert(const at::Tensor& weight, BlockKey key, const at::Tensor& block) {
    const int64_t bytes = block.nbytes();
    std::lock_guard<std::mutex> lock(mu_);
    const c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
    erase(impl);
    drop_expired();
    while (!lru_.empty() && bytes_ + bytes > budget_bytes()) erase(lru_.back());
    if (bytes > budget_bytes()) return;
    lru_.push_front(impl);
    entries_.emplace(impl, Entry{WeakImpl(weight.getIntrusivePtr()), std::move(key), block, lru_.begin()});
    bytes_ += bytes;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.clear();
    lru_.clear();
    bytes_ = 0;
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_;
  }

 private:
  using Iterator = std::unordered_map<const c10::TensorImpl*, Entry>::iterator;

  Iterator remove(Iterator it) {
    bytes_ -= it->second.block.nbytes();
    lru_.erase(it->second.lru);
    return entries_.erase(it);
  }

  void erase(const c10::TensorImpl* impl) {
    auto it = entries_.find(impl);
    if (it != entries_.end()) remove(it);
  }

  void drop_expired() {
    for (auto it = entries_.begin(); it != entries_.end();) it = it->second.owner.expired() ? remove(it) : std::next(it);
  }

  std::mutex mu_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
  std::list<const c10::TensorImpl*> lru_;
  int64_t bytes_ = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may outlive static destruction order
  return *c;
}

bool cacheable(const at::Tensor& weight) {
  return budget_bytes() > 0 && !weight.requires_grad() && !weight.is_inference();
}

}  // namespace

at::Tensor folded_block(const at::Tensor& weight, const GateSet& rows, const GateSet& cols, Reuse reuse) {
  const bool whole = rows.active.all && cols.active.all && rows.values.empty() && cols.values.empty();
  if (whole || !cacheable(weight)) return gather_block(weight, rows.active, cols.active, rows.values, cols.values);
  const bool may_reuse = reuse == Reuse::kSameStep || reuse_scopes.load() > 0;
  at::Tensor block = may_reuse ? cache().find(weight, rows, cols) : at::Tensor();
  if (block.defined()) return block;
  block = gather_block(weight, rows.active, cols.active, rows.values, cols.values);
  cache().insert(weight, key_of(weight, rows, cols), block);
  return block;
}

void clear_weight_cache() { cache().clear(); }

int64_t weight_cache_bytes() { return cache().bytes(); }

int64_t enter_frozen_weights(int64_t delta) {
  TORCH_CHECK(delta == 1 || delta == -1, "cpu_weight_reuse: delta must be 1 or -1, got ", delta);
  int64_t open = reuse_scopes.load();
  do {
    TORCH_CHECK(open + delta >= 0, "cpu_weight_reuse: more frozen_weights() scopes left than entered");
  } while (!reuse_scopes.compare_exchange_weak(open, open + delta));
  return open + delta;
}

}  // namespace cpu
}  // namespace fg
