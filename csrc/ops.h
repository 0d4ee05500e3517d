// The l2fast ops as C++ functions, each calling through a typed dispatcher handle looked up once
// (torchvision's roi_align.cpp style). C++ code calls these, never the dispatcher by name.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace l2fast
