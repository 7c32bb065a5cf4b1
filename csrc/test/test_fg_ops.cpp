// C++ test of the fg ops through the dispatcher, without Python: the CPU kernels against an ATen
// formulation of the same formula, for a few gate patterns. Run by ctest (see CMakeLists.txt).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>

#include "../cpu/workspace.h"

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).norm().item<double>() /
                     std::max(want.to(at::kDouble).norm().item<double>(), 1e-30);
  const bool ok = got.sizes() == want.sizes() && err <= tol;
  std::printf("%s %s (rel err %.2e)\n", ok ? "PASS" : "FAIL", what.c_str(), err);
  if (!ok) ++failures;
}

at::Tensor gated_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& gr,
                        const at::Tensor& gc) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fg::gated_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, double)>();
  return op.call(x, w, b, gr, gc, std::nullopt, std::nullopt, 1.0);
}

at::Tensor gathered_linear(const at::Tensor& x, const at::Tensor& wc, const at::Tensor& bc, const at::Tensor& ri,
                           const at::Tensor& ci, int64_t n) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fg::gathered_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         int64_t)>();
  return op.call(x, wc, bc, ri, ci, n);
}

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// The kernels' scratch memory: reused from call to call, nested as a stack, and never handed out
// again while a temporary that escaped its Workspace still uses it.
void test_workspace() {
  using fg::cpu::Workspace;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto one_call = [&] {
    Workspace ws;
    return ws.empty({100, 37}, f32).data_ptr();
  };
  one_call();  // the first call sizes the buffer
  const void* first = one_call();
  const at::Tensor hold = at::empty({100, 37}, f32);  // would take memory that malloc just freed
  expect(one_call() == first, "workspace: a later call reuses the same memory");
  {
    Workspace outer;
    at::Tensor a = outer.empty({64, 64}, f32);
    const void* inner_ptr = nullptr;
    for (int i = 0; i < 2; ++i) {
      Workspace inner;
      at::Tensor b = inner.empty({64, 64}, f32);
      const auto* pa = static_cast<const char*>(a.data_ptr());
      const auto* pb = static_cast<const char*>(b.data_ptr());
      expect(pb >= pa + a.nbytes() || pb + b.nbytes() <= pa, "workspace: a nested piece does not overlap its parent's");
      if (i == 1) expect(b.data_ptr() == inner_ptr, "workspace: a closed nested Workspace's memory is reused");
      inner_ptr = b.data_ptr();
    }
  }
  at::Tensor kept;
  {
    Workspace ws;
    kept = ws.empty({100, 37}, f32);
    kept.fill_(7.0f);
  }
  {
    Workspace ws;
    ws.empty({100, 37}, f32).fill_(-1.0f);
  }
  expect(kept.eq(7.0f).all().item<bool>(), "workspace: a temporary that outlived its Workspace is never overwritten");
}

}  // namespace

int main() {
  test_workspace();
  at::manual_seed(0);
  const int64_t M = 37, N = 29, K = 53;
  for (double sparsity : {0.0, 0.4, 1.0}) {
    const at::Tensor x = at::randn({M, K}), w = at::randn({N, K}), b = at::randn({N});
    const at::Tensor gr = at::rand({N}) * (at::rand({N}) >= sparsity).to(at::kFloat);
    const at::Tensor gc = at::rand({K}) * (at::rand({K}) >= sparsity).to(at::kFloat);
    // Reference: masked dense formula; removed rows are exactly zero.
    const at::Tensor want = (at::linear(x * gc, w, b) * gr).masked_fill(gr == 0, 0);
    expect_close(gated_linear(x, w, b, gr, gc), want, 1e-5,
                 "gated_linear sparsity " + std::to_string(sparsity));

    const at::Tensor ri = gr.nonzero().flatten(), ci = gc.nonzero().flatten();
    const at::Tensor wc = w.index_select(0, ri).index_select(1, ci);
    const at::Tensor y = gathered_linear(x, wc, b.index_select(0, ri), ri, ci, N);
    const at::Tensor want_g = at::linear(x, w * (gc != 0), b).masked_fill(gr == 0, 0);
    expect_close(y, want_g, 1e-5, "gathered_linear sparsity " + std::to_string(sparsity));
  }
  // Bad input must raise, not crash.
  bool raised = false;
  try {
    gated_linear(at::randn({3, 5}), at::randn({4, 6}), at::randn({4}), at::ones({4}), at::ones({6}));
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("x must have last dimension") != std::string::npos;
  }
  std::printf("%s gated_linear rejects a mismatched x\n", raised ? "PASS" : "FAIL");
  failures += raised ? 0 : 1;
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
