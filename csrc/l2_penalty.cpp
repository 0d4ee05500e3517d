#include "l2_penalty.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace l2fast {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Everything is checked before anything is written: an op that rejects its input modifies nothing.
void validate(const char* op, at::TensorList params, const at::TensorList* grads, at::IntArrayRef fresh) {
  if (grads) {
    TORCH_CHECK_VALUE(grads->size() == params.size(), op, ": got ", params.size(), " params but ", grads->size(),
                      " grads; expected one grad per param");
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.defined(), op, ": params[", i, "] is an undefined tensor");
    TORCH_CHECK_TYPE(is_supported_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ", p.scalar_type(),
                     "; expected a floating-point tensor (float32, float64, float16 or bfloat16)");
    TORCH_CHECK_VALUE(p.device() == params[0].device(), op, ": params[", i, "] is on ", p.device(),
                      " but params[0] is on ", params[0].device(), "; all tensors must be on one device");
    if (!grads) continue;
    const at::Tensor& g = (*grads)[i];
    TORCH_CHECK_VALUE(g.defined(), op, ": grads[", i, "] is an undefined tensor");
    TORCH_CHECK_VALUE(g.device() == p.device(), op, ": grads[", i, "] is on ", g.device(), " but params[", i,
                      "] is on ", p.device(), "; a grad must be on its param's device");
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ", g.scalar_type(),
                     " but params[", i, "] has dtype ", p.scalar_type(), "; a grad must match its param's dtype");
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(), " but params[", i,
                      "] has shape ", p.sizes(), "; a grad must match its param's shape");
    TORCH_CHECK_VALUE(at::get_overlap_status(p, g) == at::MemOverlapStatus::No, op, ": grads[", i,
                      "] shares memory with params[", i, "]; expected a separate grad tensor");
  }
  for (int64_t f : fresh) {
    TORCH_CHECK_INDEX(f >= 0 && f < static_cast<int64_t>(params.size()), op, ": fresh index ", f,
                      " is out of range for ", params.size(), " params");
  }
}

bool dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense(); }

Plan make_plan(at::TensorList params, const at::TensorList* grads, at::IntArrayRef fresh) {
  Plan plan;
  if (!params.empty()) plan.device = params[0].device();
  std::vector<bool> is_fresh(params.size(), false);
  for (int64_t f : fresh) is_fresh[f] = true;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    plan.any_double |= p.scalar_type() == at::kDouble;
    if (p.numel() == 0) continue;
    if (!grads) {
      plan.segments.push_back({dense(p) ? p : p.contiguous(), at::Tensor(), GradMode::kNone});
      continue;
    }
    const at::Tensor& g = (*grads)[i];
    GradMode mode = is_fresh[i] ? GradMode::kWrite : GradMode::kAccumulate;
    if (dense(p) && dense(g) && p.strides() == g.strides()) {
      plan.segments.push_back({p, g, mode});
    } else if (g.is_contiguous()) {
      plan.segments.push_back({p.contiguous(), g, mode});
    } else {
      // The grad's layout cannot be walked with p's: use a contiguous stand-in, copied back after.
      at::Tensor gc = mode == GradMode::kWrite ? at::empty(g.sizes(), g.options()) : g.contiguous();
      plan.segments.push_back({p.contiguous(), gc, mode});
      plan.writeback.emplace_back(g, gc);
    }
  }
  return plan;
}

at::Tensor empty_value(at::TensorList params, at::ScalarType dtype) {
  at::Device device = params.empty() ? at::Device(at::kCPU) : params[0].device();
  return at::zeros({}, at::TensorOptions().dtype(dtype).device(device));
}

}  // namespace

void Plan::finish() const {
  for (const auto& [user, standin] : writeback) user.copy_(standin);
}

at::Tensor l2_penalty_impl(at::TensorList params, double weight, RunKernel run) {
  validate("l2fast.l2_penalty", params, nullptr, {});
  Plan plan = make_plan(params, nullptr, {});
  if (plan.segments.empty()) return empty_value(params, plan.acc_dtype());
  return run(plan, weight, nullptr, /*reduce=*/true);
}

at::Tensor sq_norm_impl(at::TensorList tensors, RunKernel run) { return l2_penalty_impl(tensors, 1.0, run); }

std::vector<at::Tensor> l2_penalty_backward_impl(const at::Tensor& grad, at::TensorList params, double weight,
                                                 RunKernel run) {
  validate("l2fast.l2_penalty_backward", params, nullptr, {});
  TORCH_CHECK_VALUE(grad.numel() == 1, "l2fast.l2_penalty_backward: grad has shape ", grad.sizes(),
                    "; expected the 0-dim gradient of the penalty");
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  std::vector<int64_t> fresh(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    grads.push_back(at::empty_like(params[i]));
    fresh[i] = static_cast<int64_t>(i);
  }
  at::TensorList grad_list(grads);
  Plan plan = make_plan(params, &grad_list, fresh);
  if (plan.segments.empty()) return grads;
  at::Tensor g = grad.reshape({}).to(plan.device, plan.acc_dtype());
  run(plan, weight, &g, /*reduce=*/false);
  plan.finish();
  return grads;
}

at::Tensor l2_penalty_inplace_impl(at::TensorList params, at::TensorList grads, double weight,
                                   at::IntArrayRef fresh, RunKernel run) {
  validate("l2fast.l2_penalty_", params, &grads, fresh);
  Plan plan = make_plan(params, &grads, fresh);
  if (plan.segments.empty()) return empty_value(params, plan.acc_dtype());
  at::Tensor value = run(plan, weight, nullptr, /*reduce=*/true);
  plan.finish();
  return value;
}

}  // namespace l2fast
