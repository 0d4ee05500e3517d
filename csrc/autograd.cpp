// The Autograd kernels, in C++: a Python autograd.Function costs ~150 µs per forward+backward of
// sq_norm/l2_penalty, ten times the fused kernels at the seed MLP's size.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace l2fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor penalty_below_autograd(at::TensorList params, double weight, bool is_sq_norm) {
  static const auto sq_norm = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("l2fast::sq_norm", "")
                                  .typed<at::Tensor(at::TensorList)>();
  static const auto l2_penalty = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("l2fast::l2_penalty", "")
                                     .typed<at::Tensor(at::TensorList, double)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return is_sq_norm ? sq_norm.call(params) : l2_penalty.call(params, weight);
}

// grads_i = 2 * weight * grad * p_i: one fused kernel (and differentiable again, see l2fast/ops.py).
std::vector<at::Tensor> penalty_backward(const at::Tensor& grad, at::TensorList params, double weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("l2fast::l2_penalty_backward", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, double)>();
  return op.call(grad, params, weight);
}

struct L2Penalty : public torch::autograd::Function<L2Penalty> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList params, double weight, bool is_sq_norm) {
    ctx->save_for_backward(params.vec());
    ctx->saved_data["weight"] = weight;
    return penalty_below_autograd(params, weight, is_sq_norm);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads = penalty_backward(grad_outputs[0], ctx->get_saved_variables(),
                                           ctx->saved_data["weight"].toDouble());
    grads.emplace_back();  // weight
    grads.emplace_back();  // is_sq_norm
    return grads;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, Autograd, m) {
  m.impl("sq_norm", [](at::TensorList t) { return L2Penalty::apply(t, 1.0, true); });
  m.impl("l2_penalty", [](at::TensorList p, double w) { return L2Penalty::apply(p, w, false); });

  // l2_penalty_ is not differentiable (its value is detached and grads are plain buffers). An explicit
  // Autograd kernel skips the boxed "autograd not implemented" fallback, which costs more per call than
  // the whole seed-MLP-sized kernel; it must then do that fallback's other jobs itself: refuse grads that
  // are part of an autograd graph, and bump the version counters of the grads it writes so that autograd
  // still catches a later backward through a value it overwrote.
  m.impl("l2_penalty_", [](at::TensorList p, at::TensorList g, double w, at::IntArrayRef fresh) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("l2fast::l2_penalty_", "")
                               .typed<at::Tensor(at::TensorList, at::TensorList, double, at::IntArrayRef)>();
    for (size_t i = 0; i < g.size(); ++i) {
      TORCH_CHECK_VALUE(!(g[i].defined() && g[i].requires_grad()), "l2fast.l2_penalty_: grads[", i,
                        "] requires grad; expected plain gradient buffers (the op writes them in place, "
                        "outside autograd)");
    }
    at::Tensor value;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      value = op.call(p, g, w, fresh);
    }
    for (const at::Tensor& t : g) torch::autograd::impl::bump_version(t);
    return value;
  });
}

}  // namespace l2fast
