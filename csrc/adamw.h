// l2fast::adamw_: torch's AdamW update with the coupled L2 penalty folded in, in one pass over
// memory. Per element: g' = g (/ grad_scale) (negated with maximize) + 2·w·p, AdamW's update with
// g' (torch's order of operations), and p² of the param as it was before the update added to the
// penalty's sum. This header holds the plan the CPU and CUDA kernels share.
#pragma once

#include <ATen/ATen.h>

#include <mutex>
#include <utility>
#include <vector>

#include "ops.h"
#include "plan.h"

namespace l2fast {

// One param group's hyperparameters, as torch.optim.AdamW keeps them, plus the L2 weight.
struct AdamWGroup {
  double lr, beta1, beta2, eps, weight_decay, l2_weight;
  bool amsgrad, maximize;
  at::Tensor lr_tensor;  // defined: lr is read from this device tensor (capturable), `lr` unused
};

// One param: every tensor dense, with the param's strides (walked as flat memory). Zero-size params
// are segments too: their data is not touched, but their step is incremented.
struct AdamWSegment {
  at::Tensor p, g, m, v, vmax;  // g undefined: no data grad (the penalty's gradient alone)
  at::Tensor step;              // float32, numel 1, on the params' device
  int32_t group;
  int64_t numel() const { return p.numel(); }
};

struct AdamWPlan : PlanBase {
  std::vector<AdamWSegment> segments;
  std::vector<AdamWGroup> groups;
  at::Tensor grad_scale, found_inf;  // float32 numel 1 on the params' device, or undefined
};

// A backend's kernel: runs the plan, increments every step (none when found_inf is not 0), and
// returns sum_s l2_weight(s) * ||p_s||^2 of the params before the update, a 0-dim acc_dtype tensor.
using RunAdamW = at::Tensor (*)(const AdamWPlan& plan);

constexpr int64_t kAmsgrad = 1;
constexpr int64_t kMaximize = 2;

// The arguments of l2fast::adamw_ (see csrc/ops.cpp for the schema).
struct AdamWArgs {
  at::TensorList params;
  const c10::List<std::optional<at::Tensor>>& grads;
  at::TensorList exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps;
  at::IntArrayRef group_sizes;
  at::ArrayRef<double> lr, beta1, beta2, eps, weight_decay, l2_weight;
  at::IntArrayRef flags;  // per group: kAmsgrad | kMaximize
  const c10::List<std::optional<at::Tensor>>& lr_tensors;  // empty, or per group (None: the float lr)
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
};

at::Tensor adamw_impl(const AdamWArgs& a, RunAdamW run);

// An lr tensor the op takes as it is: one float32 or float64 element, on the cpu or the params' device.
bool usable_lr_tensor(const at::Tensor& t, const at::Device& params_device);

// What the last successful validation of one optimizer's arguments depended on (every tensor's
// identity, storage, offset, dtype, device, sizes and strides, and the groups' layout): while none
// of it changes, the checks are skipped (the direct call from l2fast.optim.AdamW keeps one).
struct AdamWValidated {
  std::vector<int64_t> key;
  std::mutex busy;  // two threads with one cache: the second validates in full and keeps nothing
};

at::Tensor adamw_cached(AdamWValidated& seen, const AdamWArgs& a, RunAdamW run);

RunAdamW adamw_kernel_for(c10::DeviceType type);
void set_adamw_kernel(c10::DeviceType type, RunAdamW run);

// What adamw_'s ADInplaceOrView kernel does (and the direct call): bump every written tensor's version.
void adamw_bump_versions(const AdamWArgs& a);

// Refuses what the fallback is reached for (a layout or device without a kernel); no tensors: zero.
at::Tensor adamw_fallback(const AdamWArgs& a);

// adamw_'s kernels, written once over the schema's argument types (csrc/ops.h: AdamWSchema).
template <typename Schema>
struct AdamWKernels;

template <typename... Args>
struct AdamWKernels<at::Tensor(Args...)> {
  // A backend's kernel over `run` (nullptr: the fallback for no tensors or a device without a kernel).
  template <RunAdamW run>
  static at::Tensor backend(Args... args) {
    return run == nullptr ? adamw_fallback(AdamWArgs{args...}) : adamw_impl(AdamWArgs{args...}, run);
  }
  // The Autograd kernel (kBump false: the step is not differentiable and runs below autograd, as
  // torch's fused optimizers do) and the ADInplaceOrView kernel (kBump: every written tensor's version).
  template <bool kBump>
  static at::Tensor below(c10::DispatchKeySet ks, Args... args) {
    at::Tensor value;
    {
      c10::impl::ExcludeDispatchKeyGuard guard(kBump ? c10::autograd_dispatch_keyset_with_ADInplaceOrView
                                                     : c10::autograd_dispatch_keyset);
      value = adamw_handle().redispatch(ks & (kBump ? c10::after_ADInplaceOrView_keyset : c10::after_autograd_keyset),
                                        args...);
    }
    if (kBump) adamw_bump_versions(AdamWArgs{args...});
    return value;
  }
};

using AdamWOp = AdamWKernels<AdamWSchema>;

}  // namespace l2fast

#include <torch/library.h>

namespace l2fast {

template <RunAdamW run>
void register_adamw_kernel(torch::Library& m, c10::DeviceType type) {
  set_adamw_kernel(type, run);
  m.impl("adamw_", TORCH_FN(AdamWOp::backend<run>));
}

}  // namespace l2fast
