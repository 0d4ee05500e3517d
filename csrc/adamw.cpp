// l2fast::adamw_, written once over a backend's kernel: every check before any write, then the plan.
#include "adamw.h"

#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "l2_penalty.h"

namespace l2fast {
namespace {

constexpr const char* kOp = "l2fast.adamw_";

bool dense_like(const at::Tensor& t, const at::Tensor& p) {
  return t.is_non_overlapping_and_dense() && t.strides() == p.strides();
}

void check_like(const char* name, size_t i, const at::Tensor& t, const at::Tensor& p, bool written) {
  TORCH_CHECK_VALUE(t.defined(), kOp, ": ", name, "[", i, "] is an undefined tensor");
  check_layout(kOp, name, i, t);
  TORCH_CHECK_VALUE(t.device() == p.device(), kOp, ": ", name, "[", i, "] is on ", t.device(), " but its param is on ",
                    p.device(), "; expected the param's device");
  TORCH_CHECK_TYPE(t.scalar_type() == p.scalar_type(), kOp, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                   " but its param has dtype ", p.scalar_type(), "; expected the param's dtype");
  TORCH_CHECK_VALUE(t.sizes() == p.sizes(), kOp, ": ", name, "[", i, "] has shape ", t.sizes(),
                    " but its param has shape ", p.sizes(), "; expected the param's shape");
  // A written tensor whose own elements share memory is refused by the shared-memory check.
  if (written) {
    TORCH_CHECK(!(t.is_inference() && !c10::InferenceMode::is_enabled()), kOp, ": ", name, "[", i,
                "] is an inference tensor; it may only be updated in place inside torch.inference_mode()");
  }
}

// A float32 scalar tensor on the params' device (a step, grad_scale, found_inf).
void check_scalar(const char* name, int64_t i, const at::Tensor& t, const at::Device& device, bool written) {
  const std::string where = i < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(i) + "]";
  TORCH_CHECK_VALUE(t.defined(), kOp, ": ", where, " is an undefined tensor");
  check_layout(kOp, name, static_cast<size_t>(std::max<int64_t>(i, 0)), t);
  TORCH_CHECK_VALUE(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == device, kOp, ": ", where,
                    " is a ", t.scalar_type(), " tensor of ", t.numel(), " element(s) on ", t.device(),
                    "; expected one float32 element on ", device);
  if (written) {
    TORCH_CHECK(!(t.is_inference() && !c10::InferenceMode::is_enabled()), kOp, ": ", where,
                " is an inference tensor; it may only be updated in place inside torch.inference_mode()");
  }
}

void check_count(const char* name, size_t got, size_t want, const char* per) {
  TORCH_CHECK_VALUE(got == want, kOp, ": got ", got, " ", name, " for ", want, " ", per, "s; expected one per ", per);
}

// Hyperparameters as torch.optim.AdamW checks them at construction (same words), plus the L2 weight.
void check_groups(const AdamWArgs& a) {
  const size_t G = a.group_sizes.size();
  for (const auto& [name, n] : {std::pair<const char*, size_t>{"lr", a.lr.size()}, {"beta1", a.beta1.size()},
                                {"beta2", a.beta2.size()}, {"eps", a.eps.size()},
                                {"weight_decay", a.weight_decay.size()}, {"l2_weight", a.l2_weight.size()},
                                {"flags", a.flags.size()}}) {
    check_count(name, n, G, "group");
  }
  if (a.lr_tensors.size() != 0) check_count("lr_tensors", a.lr_tensors.size(), G, "group");
  int64_t total = 0;
  for (size_t k = 0; k < G; ++k) {
    TORCH_CHECK_VALUE(a.group_sizes[k] >= 0, kOp, ": group_sizes[", k, "] is ", a.group_sizes[k],
                      "; expected a count >= 0");
    total += a.group_sizes[k];
    TORCH_CHECK_VALUE(a.lr[k] >= 0.0, kOp, ": Invalid learning rate: ", a.lr[k], " (group ", k, ")");
    TORCH_CHECK_VALUE(a.eps[k] >= 0.0, kOp, ": Invalid epsilon value: ", a.eps[k], " (group ", k, ")");
    TORCH_CHECK_VALUE(a.beta1[k] >= 0.0 && a.beta1[k] < 1.0, kOp, ": Invalid beta parameter at index 0: ",
                      a.beta1[k], " (group ", k, ")");
    TORCH_CHECK_VALUE(a.beta2[k] >= 0.0 && a.beta2[k] < 1.0, kOp, ": Invalid beta parameter at index 1: ",
                      a.beta2[k], " (group ", k, ")");
    TORCH_CHECK_VALUE(a.weight_decay[k] >= 0.0, kOp, ": Invalid weight_decay value: ", a.weight_decay[k],
                      " (group ", k, ")");
    TORCH_CHECK_VALUE(std::isfinite(a.l2_weight[k]) && a.l2_weight[k] >= 0.0, kOp, ": l2_weight[", k, "] is ",
                      a.l2_weight[k], "; expected a finite number >= 0");
    TORCH_CHECK_VALUE((a.flags[k] & ~(kAmsgrad | kMaximize)) == 0, kOp, ": flags[", k, "] is ", a.flags[k],
                      "; expected a combination of 1 (amsgrad) and 2 (maximize)");
  }
  TORCH_CHECK_VALUE(total == static_cast<int64_t>(a.params.size()), kOp, ": group_sizes add up to ", total, " but got ",
                    a.params.size(), " params; expected one entry per param, group by group");
}

// Checks everything (nothing is written) and builds the plan: an op that rejects its input modifies nothing.
AdamWPlan checked_plan(const AdamWArgs& a, bool check) {
  const size_t n = a.params.size();
  AdamWPlan plan;
  if (check) {
    check_groups(a);
    check_count("grads", a.grads.size(), n, "param");
    check_count("exp_avgs", a.exp_avgs.size(), n, "param");
    check_count("exp_avg_sqs", a.exp_avg_sqs.size(), n, "param");
    check_count("state_steps", a.state_steps.size(), n, "param");
  }
  plan.device = n ? a.params[0].device() : at::Device(at::kCPU);
  plan.groups.reserve(a.group_sizes.size());
  size_t amsgrad_params = 0;
  for (size_t k = 0; k < a.group_sizes.size(); ++k) {
    AdamWGroup g{a.lr[k], a.beta1[k], a.beta2[k], a.eps[k], a.weight_decay[k], a.l2_weight[k],
                 (a.flags[k] & kAmsgrad) != 0, (a.flags[k] & kMaximize) != 0, at::Tensor()};
    if (a.lr_tensors.size() != 0) {
      const std::optional<at::Tensor> lt = a.lr_tensors.get(k);
      if (lt.has_value() && lt->defined()) {
        if (check) {
          TORCH_CHECK_VALUE(usable_lr_tensor(*lt, plan.device), kOp, ": lr_tensors[", k, "] is a ", lt->scalar_type(),
                            " tensor of ", lt->numel(), " element(s) on ", lt->device(),
                            "; expected one float32 or float64 element on the cpu or ", plan.device);
        }
        if (lt->is_cpu()) {  // read here: no device sync
          g.lr = lt->scalar_type() == at::kDouble ? *lt->const_data_ptr<double>() : *lt->const_data_ptr<float>();
          TORCH_CHECK_VALUE(g.lr >= 0.0, kOp, ": Invalid learning rate: ", g.lr, " (group ", k, ")");
        } else {
          g.lr_tensor = *lt;
        }
      }
    }
    if (g.amsgrad) amsgrad_params += a.group_sizes[k];
    plan.groups.push_back(std::move(g));
  }
  if (check) {
    TORCH_CHECK_VALUE(a.max_exp_avg_sqs.size() == amsgrad_params, kOp, ": got ", a.max_exp_avg_sqs.size(),
                      " max_exp_avg_sqs for ", amsgrad_params, " params in amsgrad groups; expected one per param "
                      "of an amsgrad group, in order");
  }
  const bool scaled = a.grad_scale.has_value() && a.grad_scale->defined();
  if (scaled) {
    if (check) check_scalar("grad_scale", -1, *a.grad_scale, plan.device, false);
    plan.grad_scale = *a.grad_scale;
  }
  if (a.found_inf.has_value() && a.found_inf->defined()) {
    if (check) check_scalar("found_inf", -1, *a.found_inf, plan.device, false);
    plan.found_inf = *a.found_inf;
  }

  plan.segments.reserve(n);
  // No written tensor may share memory with any other tensor of the call, nor its own elements with
  // each other (the kernel would race on it, or read a value it is overwriting); read-only ones may
  // overlap. Each tensor is added while this pass has it at hand; lists as indexed by the errors.
  enum : size_t { kParams, kGrads, kExpAvgs, kExpAvgSqs, kMaxes, kSteps, kLrs, kGradScale, kFoundInf };
  MemoryCheck memory({{"params", true},
                      {"grads", scaled},
                      {"exp_avgs", true},
                      {"exp_avg_sqs", true},
                      {"max_exp_avg_sqs", true},
                      {"state_steps", true},
                      {"lr_tensors", false},
                      {"grad_scale", false},
                      {"found_inf", false}});
  if (check) {
    for (size_t list : {kParams, kGrads, kExpAvgs, kExpAvgSqs, kSteps}) memory.reserve(list, n);
    memory.reserve(kMaxes, a.max_exp_avg_sqs.size());
  }
  size_t group = 0, left = a.group_sizes.empty() ? 0 : a.group_sizes[0], next_max = 0;
  for (size_t i = 0; i < n; ++i) {
    while (left == 0) left = a.group_sizes[++group];
    --left;
    const at::Tensor& p = a.params[i];
    const std::optional<at::Tensor> go = a.grads.get(i);
    const at::Tensor g = go.has_value() ? *go : at::Tensor();
    const at::Tensor& m = a.exp_avgs[i];
    const at::Tensor& v = a.exp_avg_sqs[i];
    const at::Tensor& step = a.state_steps[i];
    const bool amsgrad = plan.groups[group].amsgrad;
    const at::Tensor vmax = amsgrad ? a.max_exp_avg_sqs[next_max++] : at::Tensor();
    if (check) {
      check_param(kOp, "params", a.params, i);
      TORCH_CHECK(!(p.is_inference() && !c10::InferenceMode::is_enabled()), kOp, ": params[", i,
                  "] is an inference tensor; it may only be updated in place inside torch.inference_mode()");
      if (g.defined()) {
        check_like("grads", i, g, p, scaled);
        TORCH_CHECK_VALUE(!(scaled && g.requires_grad()), kOp, ": grads[", i, "] requires grad; expected a plain "
                          "gradient buffer (the step writes the unscaled gradient into it)");
      }
      check_like("exp_avgs", i, m, p, true);
      check_like("exp_avg_sqs", i, v, p, true);
      if (amsgrad) check_like("max_exp_avg_sqs", next_max - 1, vmax, p, true);
      check_scalar("state_steps", static_cast<int64_t>(i), step, plan.device, true);
      memory.add(kParams, i, p);
      memory.add(kGrads, i, g);
      memory.add(kExpAvgs, i, m);
      memory.add(kExpAvgSqs, i, v);
      if (amsgrad) memory.add(kMaxes, next_max - 1, vmax);
      memory.add(kSteps, i, step);
    }
    plan.any_double |= p.scalar_type() == at::kDouble;
    if (p.numel() == 0 || (dense_like(p, p) && (!g.defined() || dense_like(g, p)) && dense_like(m, p) &&
                           dense_like(v, p) && (!amsgrad || dense_like(vmax, p)))) {
      plan.segments.push_back({p, g, m, v, vmax, step, static_cast<int32_t>(group)});
      continue;
    }
    // Some tensor cannot be walked with p's layout: contiguous stand-ins, the written ones copied back.
    auto standin = [&](const at::Tensor& t, bool written) {
      if (!t.defined()) return t;
      at::Tensor c = t.contiguous();
      if (written && !c.is_same(t)) plan.writeback.emplace_back(t, c);
      return c;
    };
    plan.segments.push_back({standin(p, true), standin(g, scaled), standin(m, true), standin(v, true),
                             standin(vmax, true), step, static_cast<int32_t>(group)});
  }
  if (check) {
    for (size_t k = 0; k < plan.groups.size(); ++k) memory.add(kLrs, k, plan.groups[k].lr_tensor);
    memory.add(kGradScale, 0, plan.grad_scale);
    memory.add(kFoundInf, 0, plan.found_inf);
    memory.check(kOp);
  }
  return plan;
}

at::Tensor run_plan(const AdamWPlan& plan, RunAdamW run) {
  if (plan.segments.empty()) return at::zeros({}, at::TensorOptions().dtype(plan.acc_dtype()).device(plan.device));
  at::Tensor value = run(plan);
  plan.finish();
  return value;
}

// Everything checked_plan's verdict depends on, flattened (hyperparameter values are checked anew).
void key_of(std::vector<int64_t>& key, const AdamWArgs& a) {
  key.clear();
  key.insert(key.end(), a.group_sizes.begin(), a.group_sizes.end());
  key.insert(key.end(), a.flags.begin(), a.flags.end());
  auto add = [&key](const at::Tensor& t) {
    if (t.defined()) {
      append_key(key, t);
    } else {
      key.push_back(0);
    }
  };
  for (size_t i = 0; i < a.params.size(); ++i) {
    add(a.params[i]);
    const std::optional<at::Tensor> g = a.grads.get(i);
    add(g.has_value() ? *g : at::Tensor());
    add(a.exp_avgs[i]);
    add(a.exp_avg_sqs[i]);
    add(a.state_steps[i]);
  }
  for (const at::Tensor& t : a.max_exp_avg_sqs) add(t);
  for (size_t k = 0; k < a.lr_tensors.size(); ++k) {
    const std::optional<at::Tensor> t = a.lr_tensors.get(k);
    add(t.has_value() ? *t : at::Tensor());
  }
  add(a.grad_scale.has_value() ? *a.grad_scale : at::Tensor());
  add(a.found_inf.has_value() ? *a.found_inf : at::Tensor());
}

RunAdamW kernels[static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)] = {};

}  // namespace

bool usable_lr_tensor(const at::Tensor& t, const at::Device& params_device) {
  return t.numel() == 1 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
         (t.is_cpu() || t.device() == params_device);
}

at::Tensor adamw_impl(const AdamWArgs& a, RunAdamW run) { return run_plan(checked_plan(a, true), run); }

at::Tensor adamw_cached(AdamWValidated& seen, const AdamWArgs& a, RunAdamW run) {
  std::unique_lock<std::mutex> lock(seen.busy, std::try_to_lock);
  if (!lock.owns_lock()) return adamw_impl(a, run);
  thread_local std::vector<int64_t> key;
  key_of(key, a);
  if (key != seen.key) {
    seen.key.clear();
    AdamWPlan plan = checked_plan(a, true);  // throws: no key kept
    if (plan.writeback.empty()) seen.key.swap(key);
    return run_plan(plan, run);
  }
  // The same tensors as last time, which passed every check: only the hyperparameters are new.
  check_groups(a);
  return run_plan(checked_plan(a, false), run);
}

RunAdamW adamw_kernel_for(c10::DeviceType type) { return kernels[static_cast<size_t>(type)]; }

void set_adamw_kernel(c10::DeviceType type, RunAdamW run) { kernels[static_cast<size_t>(type)] = run; }

void adamw_bump_versions(const AdamWArgs& a) {
  using torch::autograd::impl::bump_version;
  for (const at::Tensor& t : a.params) bump_version(t);
  if (a.grad_scale.has_value() && a.grad_scale->defined()) {
    for (size_t i = 0; i < a.grads.size(); ++i) {
      const std::optional<at::Tensor> g = a.grads.get(i);
      if (g.has_value() && g->defined()) bump_version(*g);
    }
  }
  for (at::TensorList list : {a.exp_avgs, a.exp_avg_sqs, a.max_exp_avg_sqs, a.state_steps}) {
    for (const at::Tensor& t : list) bump_version(t);
  }
}

at::Tensor adamw_fallback(const AdamWArgs& a) {
  check_layouts(kOp, "params", a.params);
  refuse_device(kOp, "params", a.params);
  return adamw_impl(a, nullptr);  // nothing to update; the hyperparameters are still checked
}

}  // namespace l2fast

TORCH_LIBRARY_IMPL(l2fast, Autograd, m) { m.impl("adamw_", TORCH_FN(l2fast::AdamWOp::below<false>)); }

TORCH_LIBRARY_IMPL(l2fast, ADInplaceOrView, m) { m.impl("adamw_", TORCH_FN(l2fast::AdamWOp::below<true>)); }

// Reached only when no backend kernel applies: an empty params list, or a device or layout without one.
TORCH_LIBRARY_IMPL(l2fast, CompositeExplicitAutograd, m) {
  m.impl("adamw_", TORCH_FN(l2fast::AdamWOp::backend<nullptr>));
}
