#include "l2_penalty.h"

#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace l2fast {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense(); }

}  // namespace

// name: the list as the op's schema calls it ("params", or sq_norm's "tensors").
void check_param(const char* op, const char* name, at::TensorList params, size_t i) {
  const at::Tensor& p = params[i];
  TORCH_CHECK_VALUE(p.defined(), op, ": ", name, "[", i, "] is an undefined tensor");
  check_layout(op, name, i, p);
  TORCH_CHECK_TYPE(is_supported_dtype(p.scalar_type()), op, ": ", name, "[", i, "] has dtype ", p.scalar_type(),
                   "; expected a floating-point tensor (float32, float64, float16 or bfloat16)");
  TORCH_CHECK_VALUE(p.device() == params[0].device(), op, ": ", name, "[", i, "] is on ", p.device(), " but ", name,
                    "[0] is on ", params[0].device(), "; all tensors must be on one device");
}

namespace {

// The multiplier of params[i] in the plan: 0 (not read) when the tensor's effective weight
// weight * weights[i] is 0, whatever the tensor holds (0 * NaN would be NaN).
double tensor_weight(double weight, Weights weights, size_t i) {
  if (weight == 0.0) return 0.0;
  return weights ? (*weights)[i] : 1.0;
}

// The plan's segment for params[i] and its grad g (w != 0), or for a fresh grad with w == 0.
void add_segment(Plan& plan, const at::Tensor& p, const at::Tensor& g, bool is_fresh, double w) {
  if (w == 0.0) {  // p is not read; a fresh grad is zero-filled, an existing one left alone
    if (!is_fresh) return;
    if (dense(g)) {
      plan.segments.push_back({at::Tensor(), g, GradMode::kZero, 0.0});
    } else {
      plan.in_place = false;
      at::Tensor gc = at::empty(g.sizes(), g.options());
      plan.segments.push_back({at::Tensor(), gc, GradMode::kZero, 0.0});
      plan.writeback.emplace_back(g, gc);
    }
    return;
  }
  const GradMode mode = is_fresh ? GradMode::kWrite : GradMode::kAccumulate;
  if (dense(p) && dense(g) && p.strides() == g.strides()) {
    plan.segments.push_back({p, g, mode, w});
    return;
  }
  plan.in_place = false;
  if (g.is_contiguous()) {
    plan.segments.push_back({p.contiguous(), g, mode, w});
  } else {
    // The grad's layout cannot be walked with p's: use a contiguous stand-in, copied back after.
    at::Tensor gc = mode == GradMode::kWrite ? at::empty(g.sizes(), g.options()) : g.contiguous();
    plan.segments.push_back({p.contiguous(), gc, mode, w});
    plan.writeback.emplace_back(g, gc);
  }
}

// Checks the inputs and builds the plan in one pass over the tensors: with 100,000 tensors each
// TensorImpl is a cache miss, so a second pass costs about as much as the first. The plan writes
// nothing the caller can see (only its own stand-ins), and everything, aliasing included, is
// checked before a kernel runs: an op that rejects its input modifies nothing.
// Every tensor is checked whatever its weight; a tensor of effective weight 0 is then left out of the plan.
// own_grads: the grads were just made by the op itself (empty_like of params already checked):
// neither is checked again.
Plan checked_plan(const char* op, const char* name, at::TensorList params, const at::TensorList* grads,
                  at::IntArrayRef fresh, double weight, Weights weights, bool own_grads = false) {
  if (grads) {
    TORCH_CHECK_VALUE(grads->size() == params.size(), op, ": got ", params.size(), " params but ", grads->size(),
                      " grads; expected one grad per param");
  }
  std::vector<bool> is_fresh(params.size(), false);
  for (int64_t f : fresh) {
    TORCH_CHECK_INDEX(f >= 0 && f < static_cast<int64_t>(params.size()), op, ": fresh index ", f,
                      " is out of range for ", params.size(), " params");
    is_fresh[f] = true;
  }
  // Outside inference mode an inference tensor may not be written in place (torch's own rule). Checked
  // here, where each grad is read anyway, rather than in a pass of its own in the ADInplaceOrView kernel.
  const bool refuse_inference = grads && !own_grads && !c10::InferenceMode::is_enabled();
  Plan plan;
  if (!params.empty()) plan.device = params[0].device();
  plan.segments.reserve(params.size());
  const bool check_memory = grads && !own_grads;
  MemoryCheck memory({{name, false}, {"grads", true}});
  if (check_memory) {
    memory.reserve(0, params.size());
    memory.reserve(1, params.size());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (!own_grads) check_param(op, name, params, i);
    plan.any_double |= p.scalar_type() == at::kDouble;
    const double w = tensor_weight(weight, weights, i);
    if (!grads) {
      if (p.numel() != 0 && w != 0.0) plan.segments.push_back({dense(p) ? p : p.contiguous(), at::Tensor(), GradMode::kNone, w});
      continue;
    }
    const at::Tensor& g = (*grads)[i];
    if (own_grads) {
      if (p.numel() != 0) add_segment(plan, p, g, is_fresh[i], w);
      continue;
    }
    TORCH_CHECK_VALUE(g.defined(), op, ": grads[", i, "] is an undefined tensor");
    check_layout(op, "grads", i, g);
    TORCH_CHECK(!(refuse_inference && g.is_inference()), op, ": grads[", i, "] is an inference tensor; it may "
                "only be updated in place inside torch.inference_mode()");
    TORCH_CHECK_VALUE(g.device() == p.device(), op, ": grads[", i, "] is on ", g.device(), " but params[", i,
                      "] is on ", p.device(), "; a grad must be on its param's device");
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ", g.scalar_type(),
                     " but params[", i, "] has dtype ", p.scalar_type(), "; a grad must match its param's dtype");
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(), " but params[", i,
                      "] has shape ", p.sizes(), "; a grad must match its param's shape");
    if (p.numel() == 0) continue;
    memory.add(0, i, p);
    memory.add(1, i, g);
    add_segment(plan, p, g, is_fresh[i], w);
  }
  if (check_memory) memory.check(op);
  return plan;
}

at::Tensor empty_value(at::TensorList params, at::ScalarType dtype) {
  at::Device device = params.empty() ? at::Device(at::kCPU) : params[0].device();
  return at::zeros({}, at::TensorOptions().dtype(dtype).device(device));
}

}  // namespace

namespace {

const char* layout_name(at::Layout layout) {
  switch (layout) {
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    case at::kJagged: return "torch.jagged";
    default: return "torch.strided";
  }
}

}  // namespace

void check_layout(const char* op, const char* name, size_t i, const at::Tensor& t) {
  constexpr auto kNotDense =  // functionality bits only: a plain mask test
      c10::sparse_ks | c10::sparse_csr_ks | c10::mkldnn_ks | c10::DispatchKeySet(c10::DispatchKey::Quantized);
  if (C10_LIKELY(!t.key_set().has_any(kNotDense))) return;  // the common case: one mask test
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", name, "[", i, "] is a ", layout_name(t.layout()),
                   " tensor; l2fast's kernels take dense (torch.strided) tensors, e.g. call .to_dense() first");
  TORCH_CHECK_TYPE(!t.is_quantized(), op, ": ", name, "[", i, "] is a quantized tensor (dtype ", t.scalar_type(),
                   "); expected a floating-point tensor, e.g. call .dequantize() first");
}

void check_weights(const char* op, double weight, Weights weights, size_t n) {
  // The kernels scale grads by (2·weight)·weights[i]: refused where that overflows float64, since an
  // infinite scale turns a zero param's grad into NaN. Negative weights are allowed.
  TORCH_CHECK_VALUE(std::isfinite(weight), op, ": weight is ", weight, "; expected a finite number");
  TORCH_CHECK_VALUE(std::isfinite(2.0 * weight), op, ": weight is ", weight, "; its gradient scale 2·weight "
                    "overflows float64; expected |weight| <= ", std::numeric_limits<double>::max() / 2);
  if (!weights) return;
  TORCH_CHECK_VALUE(weights->size() == n, op, ": got ", weights->size(), " weights for ", n,
                    " params; expected one weight per param");
  for (size_t i = 0; i < n; ++i) {
    const double w = (*weights)[i];
    TORCH_CHECK_VALUE(std::isfinite(w), op, ": weights[", i, "] is ", w, "; expected a finite number");
    TORCH_CHECK_VALUE(std::isfinite(2.0 * weight * w), op, ": weights[", i, "] is ", w, " and weight is ", weight,
                      "; the gradient scale 2·weight·weights[", i, "] overflows float64");
  }
}

namespace {
RunKernel kernels[static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)] = {};
}  // namespace

RunKernel kernel_for(c10::DeviceType type) { return kernels[static_cast<size_t>(type)]; }

void set_kernel(c10::DeviceType type, RunKernel run) { kernels[static_cast<size_t>(type)] = run; }

namespace {

// The value ops (sq_norm, l2_penalty): nothing written.
at::Tensor value_impl(const char* op, const char* name, at::TensorList params, double weight, Weights weights, RunKernel run) {
  check_weights(op, weight, weights, params.size());
  Plan plan = checked_plan(op, name, params, nullptr, {}, weight, weights);
  if (plan.segments.empty()) return empty_value(params, plan.acc_dtype());
  return run(plan, weight, nullptr, /*reduce=*/true);
}

// l2_penalty_; *in_place (when given) says whether the plan read and wrote the caller's tensors only.
at::Tensor inplace_impl(at::TensorList params, at::TensorList grads, double weight, at::IntArrayRef fresh,
                        Weights weights, RunKernel run, bool* in_place) {
  constexpr const char* op = "l2fast.l2_penalty_";
  check_weights(op, weight, weights, params.size());
  Plan plan = checked_plan(op, "params", params, &grads, fresh, weight, weights);
  if (in_place) *in_place = plan.in_place;
  if (plan.segments.empty()) return empty_value(params, plan.acc_dtype());
  at::Tensor value = run(plan, weight, nullptr, /*reduce=*/true);
  plan.finish();
  return value;
}

}  // namespace

at::Tensor l2_penalty_impl(at::TensorList params, double weight, Weights weights, RunKernel run) {
  return value_impl("l2fast.l2_penalty", "params", params, weight, weights, run);
}

at::Tensor sq_norm_impl(at::TensorList tensors, RunKernel run) {
  return value_impl("l2fast.sq_norm", "tensors", tensors, 1.0, std::nullopt, run);
}

std::vector<at::Tensor> l2_penalty_backward_impl(const at::Tensor& grad, at::TensorList params, double weight,
                                                 Weights weights, RunKernel run) {
  constexpr const char* op = "l2fast.l2_penalty_backward";
  check_weights(op, weight, weights, params.size());
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad has shape ", grad.sizes(),
                    "; expected the 0-dim gradient of the penalty");
  for (size_t i = 0; i < params.size(); ++i) check_param(op, "params", params, i);
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  std::vector<int64_t> fresh(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    grads.push_back(at::empty_like(params[i]));
    fresh[i] = static_cast<int64_t>(i);
  }
  at::TensorList grad_list(grads);
  Plan plan = checked_plan(op, "params", params, &grad_list, fresh, weight, weights, /*own_grads=*/true);
  if (plan.segments.empty()) return grads;
  at::Tensor g = grad.reshape({}).to(plan.device, plan.acc_dtype());
  run(plan, weight, &g, /*reduce=*/false);
  plan.finish();
  return grads;
}

at::Tensor l2_penalty_inplace_impl(at::TensorList params, at::TensorList grads, double weight,
                                   at::IntArrayRef fresh, Weights weights, RunKernel run) {
  return inplace_impl(params, grads, weight, fresh, weights, run, nullptr);
}

// The address of the data, not the storage object: validation places tensors by address (MemoryCheck),
// and two storages may hold one memory. Nothing else of a tensor's identity enters the verdict.
void append_key(std::vector<int64_t>& key, const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  key.push_back(reinterpret_cast<intptr_t>(impl->data()));
  key.push_back(static_cast<int64_t>(impl->dtype().toScalarType()));
  key.push_back(static_cast<int64_t>(impl->device_type()) << 8 | static_cast<uint8_t>(impl->device().index()));
  key.push_back(impl->dim());
  key.insert(key.end(), impl->sizes().begin(), impl->sizes().end());
  key.insert(key.end(), impl->strides().begin(), impl->strides().end());
}

namespace {

// Everything checked_plan's verdict on (params, grads, weight, weights) depends on, flattened.
// Layout, inference-ness and autograd keys are not in it: the caller admits only plain tensors.
void key_of(std::vector<int64_t>& key, at::TensorList params, at::TensorList grads, double weight,
            Weights weights) {
  key.clear();
  auto add_double = [&key](double x) {
    int64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    key.push_back(bits);
  };
  add_double(weight);
  key.push_back(weights ? static_cast<int64_t>(weights->size()) : -1);
  if (weights) {
    for (double w : *weights) add_double(w);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    append_key(key, params[i]);
    append_key(key, grads[i]);
  }
}

}  // namespace

at::Tensor l2_penalty_inplace_cached(Validated& seen, at::TensorList params, at::TensorList grads, double weight,
                                     at::IntArrayRef fresh, Weights weights, RunKernel run) {
  std::unique_lock<std::mutex> lock(seen.busy, std::try_to_lock);
  if (!lock.owns_lock() || !fresh.empty()) {  // a fresh grad is a new tensor: nothing to reuse
    if (lock.owns_lock()) seen.key.clear();
    return l2_penalty_inplace_impl(params, grads, weight, fresh, weights, run);
  }
  thread_local std::vector<int64_t> key;
  key_of(key, params, grads, weight, weights);
  if (key != seen.key) {
    seen.key.clear();
    at::Tensor value = inplace_impl(params, grads, weight, fresh, weights, run, &seen.in_place);  // throws: no key
    seen.key.swap(key);
    return value;
  }
  // The plan checked_plan made last time for the same tensors, every grad accumulated: in place, or
  // with the same stand-ins made anew.
  Plan plan;
  plan.device = params[0].device();
  plan.segments.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    plan.any_double |= params[i].scalar_type() == at::kDouble;
    const double w = tensor_weight(weight, weights, i);
    if (params[i].numel() == 0 || w == 0.0) continue;
    if (seen.in_place) {
      plan.segments.push_back({params[i], grads[i], GradMode::kAccumulate, w});
    } else {
      add_segment(plan, params[i], grads[i], /*is_fresh=*/false, w);
    }
  }
  if (plan.segments.empty()) return empty_value(params, plan.acc_dtype());
  at::Tensor value = run(plan, weight, nullptr, /*reduce=*/true);
  plan.finish();
  return value;
}

}  // namespace l2fast
