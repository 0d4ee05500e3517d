// Op schemas (backend-independent) and their typed C++ handles.
#include "ops.h"

#include "l2_penalty.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(l2fast, m) {
  m.def("sq_norm(Tensor[] tensors) -> Tensor");
  m.def("l2_penalty(Tensor[] params, float weight, float[]? weights=None) -> Tensor");
  m.def("l2_penalty_backward(Tensor grad, Tensor[] params, float weight, float[]? weights=None) -> Tensor[]");
  // Reads each param once; see ops.h for what each op computes.
  m.def("l2_penalty_(Tensor[] params, Tensor(a!)[] grads, float weight, int[] fresh=[], "
        "float[]? weights=None) -> Tensor");
  // AdamW with the coupled L2 penalty, over param groups in one pass (csrc/adamw.h). Per group:
  // group_sizes params, hyperparameters, flags (1 amsgrad, 2 maximize); max_exp_avg_sqs for the
  // params of amsgrad groups only; a grads entry None: the penalty's gradient alone.
  m.def("adamw_(Tensor(a!)[] params, Tensor(b!)?[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
        "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, int[] group_sizes, float[] lr, float[] beta1, "
        "float[] beta2, float[] eps, float[] weight_decay, float[] l2_weight, int[] flags, "
        "Tensor?[] lr_tensors, Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
}

namespace l2fast {

template <typename Schema>
static c10::TypedOperatorHandle<Schema> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Schema>();
}

at::Tensor sq_norm(at::TensorList tensors) {
  static const auto op = handle<decltype(sq_norm)>("l2fast::sq_norm");
  return op.call(tensors);
}

at::Tensor l2_penalty(at::TensorList params, double weight, Weights weights) {
  static const auto op = handle<decltype(l2_penalty)>("l2fast::l2_penalty");
  return op.call(params, weight, weights);
}

std::vector<at::Tensor> l2_penalty_backward(const at::Tensor& grad, at::TensorList params, double weight,
                                            Weights weights) {
  static const auto op = handle<decltype(l2_penalty_backward)>("l2fast::l2_penalty_backward");
  return op.call(grad, params, weight, weights);
}

at::Tensor l2_penalty_(at::TensorList params, at::TensorList grads, double weight, at::IntArrayRef fresh,
                       Weights weights) {
  static const auto op = handle<decltype(l2_penalty_)>("l2fast::l2_penalty_");
  return op.call(params, grads, weight, fresh, weights);
}

at::Tensor l2_penalty_redispatch(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads, double weight,
                                 at::IntArrayRef fresh, Weights weights) {
  static const auto op = handle<decltype(l2_penalty_)>("l2fast::l2_penalty_");
  return op.redispatch(ks, params, grads, weight, fresh, weights);
}

const c10::TypedOperatorHandle<AdamWSchema>& adamw_handle() {
  static const auto op = handle<AdamWSchema>("l2fast::adamw_");
  return op;
}

}  // namespace l2fast

// Reached only when no backend kernel applies: an empty tensor list (no device to dispatch on),
// sparse or quantized tensors, or tensors on a device l2fast has no kernel for.
namespace l2fast {

void check_layouts(const char* op, const char* name, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].defined()) check_layout(op, name, i, tensors[i]);
  }
}

void refuse_device(const char* op, const char* name, at::TensorList tensors) {
#ifdef WITH_CUDA
  constexpr const char* kKernelDevices = "cpu and cuda";
#else
  constexpr const char* kKernelDevices = "cpu (this build has no CUDA kernels)";
#endif
  TORCH_CHECK_NOT_IMPLEMENTED(tensors.empty(), op, ": ", name, "[0] is on ", tensors[0].device(),
                              "; l2fast has kernels for ", kKernelDevices, " tensors only");
}

}  // namespace l2fast

namespace {

// name: the list as the op's schema calls it ("params", or sq_norm's "tensors").
at::Tensor zero_if_empty(const char* op, const char* name, at::TensorList params, double weight = 1.0,
                         l2fast::Weights weights = {}, at::TensorList grads = {}) {
  l2fast::check_weights(op, weight, weights, params.size());
  l2fast::check_layouts(op, name, params);
  l2fast::check_layouts(op, "grads", grads);
  l2fast::refuse_device(op, name, params);
  return at::zeros({}, at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, CompositeExplicitAutograd, m) {
  using l2fast::Weights;
  m.impl("sq_norm", [](at::TensorList t) { return zero_if_empty("l2fast.sq_norm", "tensors", t); });
  m.impl("l2_penalty", [](at::TensorList p, double w, Weights ws) {
    return zero_if_empty("l2fast.l2_penalty", "params", p, w, ws);
  });
  m.impl("l2_penalty_backward", [](const at::Tensor&, at::TensorList p, double w, Weights ws) {
    zero_if_empty("l2fast.l2_penalty_backward", "params", p, w, ws);
    return std::vector<at::Tensor>();
  });
  m.impl("l2_penalty_", [](at::TensorList p, at::TensorList g, double w, at::IntArrayRef, Weights ws) {
    return zero_if_empty("l2fast.l2_penalty_", "params", p, w, ws, g);
  });
}
