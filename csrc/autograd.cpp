// Autograd of fg::gated_linear for every device, in C++.
//
// The backward is the op fg::gated_linear_backward (the one formula; each backend implements it);
// this file is only the glue that saves what the requested gradients read and calls it. It lives in
// C++ because the Python registration (torch.library.register_autograd) measured ~65 us of fixed
// cost per forward + backward, as much as the whole backward of a 384-wide layer at 128 tokens.
// The glue follows fg_kernels/contract.py (backward_plan); the namespaces defined from Python
// (fg_triton, for the Triton interpreter) register the same plan from there, and the shared
// gradient tests run on both.
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>

namespace fg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Gradient slots (x, weight, bias, row_gate, col_gate, lora_a, lora_b), as contract.GRAD_SLOTS.
using Mask = std::array<bool, 7>;

// contract.backward_plan: the x slot's gradient reads nothing but dy; col_gate, weight and LoRA read x;
// row_gate reads the output.
bool needs_x(const Mask& m) { return m[1] || m[4] || m[5] || m[6]; }
bool needs_output(const Mask& m) { return m[3]; }

bool requires(const c10::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

// The backward kernels are differentiable once. Under create_graph the gradients would otherwise
// leave the graph silently (a second derivative of 0); like @once_differentiable, they get an Error
// node (with the backward's inputs as next edges, so the graph reaches the leaves) that raises if a
// second backward reaches it. The text is contract.DOUBLE_BACKWARD_ERROR.
constexpr const char* kDoubleBackward =
    "fg::gated_linear has no double backward (its backward is a fused kernel, differentiable once): "
    "for higher-order gradients use fg_kernels.reference.gated_linear_ref";

// Node handles are std::shared_ptr in older torch and c10::intrusive_ptr in newer: make the one
// this torch's Edge holds.
using NodePtr = decltype(torch::autograd::Edge::function);
template <typename Ptr>
struct MakeNode;
template <typename N>
struct MakeNode<std::shared_ptr<N>> {
  template <typename T, typename... Args>
  static std::shared_ptr<N> make(Args&&... args) { return std::make_shared<T>(std::forward<Args>(args)...); }
};
template <typename N>
struct MakeNode<c10::intrusive_ptr<N>> {
  template <typename T, typename... Args>
  static c10::intrusive_ptr<N> make(Args&&... args) { return c10::make_intrusive<T>(std::forward<Args>(args)...); }
};

void refuse_double_backward(torch::autograd::variable_list& grads, const torch::autograd::variable_list& sources) {
  bool any = false;
  for (const auto& t : sources) any = any || (t.defined() && t.requires_grad());
  if (!any) return;
  NodePtr error = MakeNode<NodePtr>::make<torch::autograd::Error>(kDoubleBackward, torch::autograd::collect_next_edges(sources));
  for (auto& g : grads) {
    if (!g.defined()) continue;
    g = g.detach();
    torch::autograd::create_gradient_edge(g, error);
  }
}

using ForwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                     const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                     const c10::optional<at::Tensor>&, double);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fg::gated_linear", "").typed<ForwardSignature>();
  return op;
}

class GatedLinear : public torch::autograd::Function<GatedLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& row_gate,
                            const at::Tensor& col_gate, const c10::optional<at::Tensor>& lora_a,
                            const c10::optional<at::Tensor>& lora_b, double lora_scale) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = forward_op().call(x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale);
    }
    const Mask mask{x.requires_grad(), weight.requires_grad(), requires(bias), row_gate.requires_grad(),
                    col_gate.requires_grad(), requires(lora_a), requires(lora_b)};
    ctx->save_for_backward({needs_x(mask) ? x : at::Tensor(), weight, row_gate, col_gate,
                            lora_a.value_or(at::Tensor()), lora_b.value_or(at::Tensor()),
                            needs_output(mask) ? y : at::Tensor()});
    ctx->saved_data["lora_scale"] = lora_scale;
    int64_t bits = 0;
    for (size_t i = 0; i < mask.size(); ++i) bits |= static_cast<int64_t>(mask[i]) << i;
    ctx->saved_data["mask"] = bits;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fg::gated_linear_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double,
                const c10::optional<at::Tensor>&, std::array<bool, 7>)>();
    const variable_list saved = ctx->get_saved_variables();
    const int64_t bits = ctx->saved_data["mask"].toInt();
    Mask mask;
    for (size_t i = 0; i < mask.size(); ++i) mask[i] = (bits >> i) & 1;
    auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
    const bool create_graph = at::GradMode::is_enabled();
    // The kernels write into outputs (mm out=); under create_graph their inputs require grad, which
    // out= variants refuse. The results get their Error node below instead.
    at::NoGradGuard no_grad;
    auto g = op.call(grads[0], opt(saved[0]), saved[1], saved[2], saved[3], opt(saved[4]), opt(saved[5]),
                     ctx->saved_data["lora_scale"].toDouble(), opt(saved[6]), mask);
    const std::array<at::Tensor, 7> all{std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g),
                                        std::get<4>(g), std::get<5>(g), std::get<6>(g)};
    variable_list out(8);  // one per forward argument; lora_scale gets none
    for (size_t i = 0; i < mask.size(); ++i) out[i] = mask[i] ? all[i] : at::Tensor();
    if (create_graph) {
      variable_list sources(saved);
      sources.push_back(grads[0]);
      refuse_double_backward(out, sources);
    }
    return out;
  }
};

at::Tensor gated_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& row_gate, const at::Tensor& col_gate,
                                 const c10::optional<at::Tensor>& lora_a, const c10::optional<at::Tensor>& lora_b,
                                 double lora_scale) {
  const bool any_grad = x.requires_grad() || weight.requires_grad() || requires(bias) || row_gate.requires_grad() ||
                        col_gate.requires_grad() || requires(lora_a) || requires(lora_b);
  if (!any_grad || !at::GradMode::is_enabled()) {
    // No graph to record (evaluation, inference): skip the autograd node and its saved tensors.
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale);
  }
  return GatedLinear::apply(x, weight, bias, row_gate, col_gate, lora_a, lora_b, lora_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fg, Autograd, m) { m.impl("gated_linear", &gated_linear_autograd); }

}  // namespace fg
