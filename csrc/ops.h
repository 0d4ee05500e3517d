// The l2fast ops as C++ functions, each calling through a typed dispatcher handle looked up once
// (torchvision's roi_align.cpp style). C++ code calls these, never the dispatcher by name.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

namespace l2fast {

using Weights = std::optional<at::ArrayRef<double>>;  // schema: float[]? weights=None

// sum(x^2) over every element of every tensor; float64 if any input is float64, else float32.
at::Tensor sq_norm(at::TensorList tensors);
// weight * sum_i w_i * ||p_i||^2 (w_i = 1 without `weights`); differentiable.
at::Tensor l2_penalty(at::TensorList params, double weight, Weights weights);
// grads_i = 2 * weight * w_i * grad * p_i (zeros where w_i == 0), in one multi-tensor kernel.
std::vector<at::Tensor> l2_penalty_backward(const at::Tensor& grad, at::TensorList params, double weight,
                                            Weights weights);
// grads_i += 2 * weight * w_i * p_i (= for the indices in `fresh`), returns the penalty's value.
at::Tensor l2_penalty_(at::TensorList params, at::TensorList grads, double weight, at::IntArrayRef fresh,
                       Weights weights);

// l2_penalty_ again from one of its own kernels, with the keys already known: skips re-reading
// every tensor's dispatch keys (a cache miss each with 100,000 tensors).
at::Tensor l2_penalty_redispatch(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads, double weight,
                                 at::IntArrayRef fresh, Weights weights);

// adamw_'s C++ signature, in schema order (csrc/ops.cpp), and its typed handle (call / redispatch).
// torch's AdamW step over param groups with the coupled L2 penalty's gradient 2·l2_weight·p added to
// each grad in registers, in one pass; returns sum l2_weight·||p||^2 of the params before the step
// (csrc/adamw.h).
using AdamWSchema = at::Tensor(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                               at::TensorList state_steps, at::IntArrayRef group_sizes, at::ArrayRef<double> lr,
                               at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                               at::ArrayRef<double> weight_decay, at::ArrayRef<double> l2_weight,
                               at::IntArrayRef flags, const c10::List<std::optional<at::Tensor>>& lr_tensors,
                               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);
const c10::TypedOperatorHandle<AdamWSchema>& adamw_handle();

}  // namespace l2fast
