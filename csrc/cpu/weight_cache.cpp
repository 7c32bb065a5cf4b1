// The per-weight cache of folded weight blocks (see weight_cache.h).
#include "weight_cache.h"

#include "trace.h"

#include <c10/util/intrusive_ptr.h>

#include <array>
#include <atomic>
#include <cstring>
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

// A tensor's values as the key sees them: its version counter (in-place updates), its very storage
// (a swapped one, `w.data = ...`, differs even when the allocator hands out the old address), data
// pointer, geometry (sizes, strides, storage offset) and dtype.
struct TensorKey {
  int64_t version = 0;
  WeakStorage storage{c10::intrusive_ptr<c10::StorageImpl>()};  // null for an undefined tensor
  const void* data = nullptr;
  std::array<int64_t, 5> geometry{};
  at::ScalarType dtype = at::kFloat;
  bool defined = false;
};

std::array<int64_t, 5> geometry_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.stride(0), t.stride(1), t.storage_offset()};
}

TensorKey tensor_key(const at::Tensor& t) {
  if (!t.defined()) return {};
  return TensorKey{t._version(), t.storage().getWeakStorageImpl(), t.data_ptr(), geometry_of(t), t.scalar_type(), true};
}

bool same(const TensorKey& k, const at::Tensor& t) {
  if (!t.defined()) return !k.defined;
  return k.defined && k.version == t._version() && !k.storage.expired() &&
         k.storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() && k.data == t.data_ptr() &&
         k.geometry == geometry_of(t) && k.dtype == t.scalar_type();
}

// A small tensor's values themselves: the LoRA factors. An optimizer may update them without
// bumping their version counter (fused AdamW does not), so their version cannot say they are
// unchanged; a copy compared byte for byte can (a few KB against a block of |R| x |C|).
at::Tensor value_key(const at::Tensor& t) { return t.defined() ? t.contiguous().clone() : at::Tensor(); }

bool same_values(const at::Tensor& copy, const at::Tensor& t) {
  if (!t.defined() || !copy.defined()) return t.defined() == copy.defined();
  if (copy.sizes() != t.sizes() || copy.scalar_type() != t.scalar_type()) return false;
  const at::Tensor c = t.contiguous();
  return std::memcmp(copy.data_ptr(), c.data_ptr(), c.nbytes()) == 0;
}

// Everything the folded block depends on, compared exactly.
struct BlockKey {
  TensorKey weight;
  at::Tensor lora_a, lora_b;  // copies of the factors' values; undefined when the block holds no adapter
  double lora_scale = 0.0;
  std::vector<int64_t> rows, cols;  // index lists; empty = all
  int64_t row_pad = 0, col_pad = 0;
  std::vector<double> row_values, col_values;  // empty = all 1
};

at::Tensor factor(const LoraTerm* lora, bool b) { return lora ? (b ? lora->b : lora->a) : at::Tensor(); }

// Compared in place (no copy of the index lists and values per call: the common case is a hit).
bool matches(const BlockKey& k, const at::Tensor& weight, const GateSet& rows, const GateSet& cols,
             const LoraTerm* lora) {
  return same(k.weight, weight) && same_values(k.lora_a, factor(lora, false)) &&
         same_values(k.lora_b, factor(lora, true)) &&
         k.lora_scale == (lora ? lora->scale : 0.0) && k.row_pad == rows.active.pad &&
         k.col_pad == cols.active.pad && k.rows == rows.active.idx && k.cols == cols.active.idx &&
         k.row_values == rows.values.values() && k.col_values == cols.values.values();
}

BlockKey key_of(const at::Tensor& weight, const GateSet& rows, const GateSet& cols, const LoraTerm* lora) {
  return BlockKey{tensor_key(weight), value_key(factor(lora, false)), value_key(factor(lora, true)),
                  lora ? lora->scale : 0.0, rows.active.idx, cols.active.idx, rows.active.pad, cols.active.pad,
                  rows.values.values(), cols.values.values()};
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
  // The matching block, or undefined; with `take` the entry leaves the cache.
  at::Tensor find(const at::Tensor& weight, const GateSet& rows, const GateSet& cols, const LoraTerm* lora,
                  bool take) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(weight.unsafeGetTensorImpl());
    if (it == entries_.end() || it->second.owner.expired() || !matches(it->second.key, weight, rows, cols, lora))
      return {};
    at::Tensor block = it->second.block;
    if (take) {
      remove(it);
    } else {
      lru_.splice(lru_.begin(), lru_, it->second.lru);
    }
    return block;
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

// Inference tensors have no version counter: their blocks are never kept.
bool cacheable(const at::Tensor& weight, const LoraTerm* lora) {
  return budget_bytes() > 0 && !weight.requires_grad() && !weight.is_inference() &&
         !(lora && (lora->a.is_inference() || lora->b.is_inference()));
}

at::Tensor build_block(const at::Tensor& weight, const GateSet& rows, const GateSet& cols, const LoraTerm* lora) {
  FG_TRACE("fg::cpu::build_block");
  at::Tensor block = gather_block(weight, rows.active, cols.active, rows.values, cols.values);
  if (lora == nullptr) return block;
  if (block.is_same(weight)) return at::addmm(weight, lora->b_f, lora->a_f, 1.0, lora->scale);
  return block.addmm_(lora->b_f, lora->a_f, 1.0, lora->scale);  // zero padding stays zero: so are the factors'
}

}  // namespace

at::Tensor folded_block(const at::Tensor& weight, const GateSet& rows, const GateSet& cols, Reuse reuse,
                        const LoraTerm* lora) {
  const bool whole = rows.active.all && cols.active.all && rows.values.empty() && cols.values.empty() && !lora;
  if (whole) return weight;
  if (!cacheable(weight, lora)) return build_block(weight, rows, cols, lora);
  const bool scope = frozen_scope_open();
  const bool may_reuse = reuse == Reuse::kSameStep || scope;
  at::Tensor block = may_reuse ? cache().find(weight, rows, cols, lora, reuse == Reuse::kSameStep && !scope)
                               : at::Tensor();
  if (block.defined()) return block;
  block = build_block(weight, rows, cols, lora);
  // A backward's block would never be read again outside a scope (the next step's gates differ).
  if (reuse == Reuse::kFrozenScopeOnly || scope) cache().insert(weight, key_of(weight, rows, cols, lora), block);
  return block;
}

bool frozen_scope_open() { return reuse_scopes.load() > 0; }

LoraTerm lora_term(const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b, double scale,
                   const GateSet& rows, const GateSet& cols, int64_t M) {
  LoraTerm t;
  if (!lora_a.has_value() || rows.active.size() == 0 || cols.active.size() == 0) return t;
  const int64_t r = lora_a->size(0);
  t.a = *lora_a;
  t.b = *lora_b;
  t.a_f = gather_block(*lora_a, Active{{}, r, true}, cols.active, {}, cols.values);
  t.b_f = gather_block(*lora_b, rows.active, Active{{}, r, true}, rows.values, {});
  t.scale = scale;
  t.fold = fold_lora(lora_a->scalar_type(), M, rows.active, cols.active, frozen_scope_open());
  return t;
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
