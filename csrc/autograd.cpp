// The Autograd and ADInplaceOrView kernels, in C++: a Python autograd.Function costs ~150 µs per
// forward+backward of sq_norm/l2_penalty, ten times the fused kernels at the seed MLP's size.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "l2_penalty.h"
#include "ops.h"

namespace l2fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<std::vector<double>> saved_weights(AutogradContext* ctx) {
  const c10::IValue& w = ctx->saved_data["weights"];
  if (w.isNone()) return std::nullopt;
  return w.toDoubleVector();
}

// d/dp_i of weight * sum_i w_i ||p_i||^2, times grad: one fused kernel (differentiable again, see
// l2fast/ops.py).
variable_list penalty_grads(AutogradContext* ctx, const at::Tensor& grad, double weight,
                            const std::optional<std::vector<double>>& weights) {
  return l2_penalty_backward(grad, ctx->get_saved_variables(), weight,
                             weights ? Weights(*weights) : Weights(std::nullopt));
}

struct SqNorm : public torch::autograd::Function<SqNorm> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList tensors) {
    ctx->save_for_backward(tensors.vec());
    at::AutoDispatchBelowADInplaceOrView guard;
    return sq_norm(tensors);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return penalty_grads(ctx, grad_outputs[0], 1.0, std::nullopt);
  }
};

struct L2Penalty : public torch::autograd::Function<L2Penalty> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList params, double weight, Weights weights) {
    ctx->save_for_backward(params.vec());
    ctx->saved_data["weight"] = weight;
    ctx->saved_data["weights"] = weights ? c10::IValue(weights->vec()) : c10::IValue();
    at::AutoDispatchBelowADInplaceOrView guard;
    return l2_penalty(params, weight, weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads =
        penalty_grads(ctx, grad_outputs[0], ctx->saved_data["weight"].toDouble(), saved_weights(ctx));
    grads.emplace_back();  // weight
    grads.emplace_back();  // weights
    return grads;
  }
};

}  // namespace

void refuse_grads_in_graph(at::TensorList g) {
  for (size_t i = 0; i < g.size(); ++i) {
    TORCH_CHECK_VALUE(!(g[i].defined() && g[i].requires_grad()), "l2fast.l2_penalty_: grads[", i,
                      "] requires grad; expected plain gradient buffers (the op writes them in place, "
                      "outside autograd)");
  }
}

void bump_versions(at::TensorList g) {
  for (const at::Tensor& t : g) torch::autograd::impl::bump_version(t);
}

TORCH_LIBRARY_IMPL(l2fast, Autograd, m) {
  m.impl("sq_norm", [](at::TensorList t) { return SqNorm::apply(t); });
  m.impl("l2_penalty", [](at::TensorList p, double w, Weights ws) { return L2Penalty::apply(p, w, ws); });

  // l2_penalty_ is not differentiable (its value is detached and grads are plain buffers). An explicit
  // Autograd kernel skips the boxed "autograd not implemented" fallback, which costs more per call than
  // the whole seed-MLP-sized kernel; it must then refuse grads that are part of an autograd graph.
  m.impl("l2_penalty_", [](c10::DispatchKeySet ks, at::TensorList p, at::TensorList g, double w,
                           at::IntArrayRef fresh, Weights ws) {
    refuse_grads_in_graph(g);
    at::AutoDispatchBelowAutograd guard;
    return l2_penalty_redispatch(ks & c10::after_autograd_keyset, p, g, w, fresh, ws);
  });
}

// The version counters of the grads it writes are bumped here, where native in-place ops bump theirs,
// so that autograd still catches a later backward through a value it overwrote: this key runs in
// every mode, torch.inference_mode() included, where the Autograd kernel above is skipped.
TORCH_LIBRARY_IMPL(l2fast, ADInplaceOrView, m) {
  m.impl("l2_penalty_", [](c10::DispatchKeySet ks, at::TensorList p, at::TensorList g, double w,
                           at::IntArrayRef fresh, Weights ws) {
    // Inference-tensor grads outside inference mode are refused by the backend kernel's checks, in the
    // same pass that reads every grad anyway.
    at::Tensor value;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      value = l2_penalty_redispatch(ks & c10::after_ADInplaceOrView_keyset, p, g, w, fresh, ws);
    }
    bump_versions(g);
    return value;
  });
}

}  // namespace l2fast
