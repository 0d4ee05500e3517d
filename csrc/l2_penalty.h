// The multi-tensor plan shared by the CPU and CUDA kernels: inputs validated, every tensor
// reduced to a dense buffer that a kernel may walk as flat memory.
#pragma once

#include <ATen/ATen.h>

#include <c10/util/SmallVector.h>

#include <initializer_list>
#include <mutex>
#include <utility>
#include <vector>

#include "ops.h"
#include "plan.h"

namespace l2fast {

enum class GradMode : int32_t {
  kNone = 0,        // read p only
  kAccumulate = 1,  // g += scale * p
  kWrite = 2,       // g  = scale * p (a fresh grad)
  kZero = 3,        // g  = 0, p not read (a fresh grad whose tensor weight is 0)
};

struct Segment {
  at::Tensor p;  // dense, numel > 0; undefined for kZero
  at::Tensor g;  // undefined for kNone; else dense, and for kAccumulate/kWrite with p's strides
  GradMode mode;
  double w;      // the tensor's weight multiplier (never 0 except for kZero)

  int64_t numel() const { return p.defined() ? p.numel() : g.numel(); }
};

struct Plan : PlanBase {
  std::vector<Segment> segments;
  bool in_place = true;  // every segment reads and writes the caller's own tensors (no stand-in)
};

// What a backend kernel does with a plan: returns weight * sum_s w_s * sum(p_s^2) as a 0-dim
// acc_dtype tensor (when `reduce`), and writes each segment's grad with
// scale = 2 * weight * w_s * (*grad_out if given).
using RunKernel = at::Tensor (*)(const Plan& plan, double weight, const at::Tensor* grad_out, bool reduce);

// Refuses any tensor the op writes that shares a byte of memory with another tensor of the call, or
// with itself, naming both (`grads[1] shares memory with params[0]`, `grads[1] has elements that share
// memory`); tensors that are only read may share memory with each other. Exact at any size: tensors are
// placed by the address of their data (not by storage object), grouped into components of intersecting
// byte ranges in O(n log n), and only the elements of a component that holds a written tensor and is
// not decided by its ranges are enumerated, once. For one list at a time, in one call:
//   check_no_shared_memory(op, {{"params", params, false}, {"grads", grads, true}});
// or, to add each tensor while another pass over the lists has it in cache, add() then check().
class MemoryCheck {
 public:
  struct List {
    const char* name;  // as errors name it: "grads"
    bool written;      // the op writes these tensors
  };
  struct Tensors {
    const char* name;
    at::TensorList tensors;
    bool written;
  };
  // Where one non-empty tensor's bytes lie: [begin, end), from its first element's first byte to its
  // last element's last byte.
  struct Extent {
    uintptr_t begin;
    uintptr_t end;
    const c10::TensorImpl* t;  // alive until check() returns: the caller's tensors
    uint32_t index;
    int16_t device;  // type and index
    uint8_t list;
    bool written;
    bool dense;  // its elements fill [begin, end)
  };

  explicit MemoryCheck(c10::ArrayRef<List> lists) : lists_(lists.begin(), lists.end()), extents_(lists.size()) {}
  void reserve(size_t list, size_t n) { extents_[list].reserve(n); }
  // lists[list][index] is t. Undefined and empty tensors hold no memory: skipped.
  void add(size_t list, size_t index, const at::Tensor& t);
  // Throws a ValueError naming the first conflict found; nothing else.
  void check(const char* op);

 private:
  void refuse(const char* op, const Extent& a, const Extent& b) const;

  c10::SmallVector<List, 4> lists_;
  // Per list: each list comes sorted, or nearly (allocation order), and is sorted on its own; check()
  // walks them merged. One vector for all would be sorted in more passes (its runs are the lists' runs
  // together), measured 16% more validation time for 100,000 params and grads.
  c10::SmallVector<std::vector<Extent>, 4> extents_;
};

void check_no_shared_memory(const char* op, std::initializer_list<MemoryCheck::Tensors> lists);

// Rejects name[i] (one of params) when undefined, not dense, not float32/64/16/bf16, or not on
// params[0]'s device.
void check_param(const char* op, const char* name, at::TensorList params, size_t i);

// Rejects a tensor that is not dense (sparse, mkldnn, ...) or is quantized, naming its layout.
void check_layout(const char* op, const char* name, size_t i, const at::Tensor& t);

// What an op's fallback (no kernel applies) says (csrc/ops.cpp): check_layout for each defined
// name[i], then, for a non-empty list, that its device has no l2fast kernel.
void check_layouts(const char* op, const char* name, at::TensorList tensors);
void refuse_device(const char* op, const char* name, at::TensorList tensors);

// Rejects a non-finite `weight`, a `weights` list whose length is not n, or a non-finite entry.
void check_weights(const char* op, double weight, Weights weights, size_t n);

// The ops, written once over a backend's kernel.
at::Tensor sq_norm_impl(at::TensorList tensors, RunKernel run);
at::Tensor l2_penalty_impl(at::TensorList params, double weight, Weights weights, RunKernel run);
std::vector<at::Tensor> l2_penalty_backward_impl(const at::Tensor& grad, at::TensorList params, double weight,
                                                 Weights weights, RunKernel run);
at::Tensor l2_penalty_inplace_impl(at::TensorList params, at::TensorList grads, double weight,
                                   at::IntArrayRef fresh, Weights weights, RunKernel run);

// What the last successful validation of one caller's (params, grads, weight, weights) depended on:
// every tensor's data address, dtype, device, sizes and strides, and the weights. A caller that passes
// the same tensors again and again (L2Penalty) keeps one, and while nothing in it changes the checks
// (the shared-memory check included) are skipped.
struct Validated {
  std::vector<int64_t> key;
  bool in_place = false;  // the plan read and wrote the caller's tensors only (no stand-ins)
  std::mutex busy;        // two threads with one cache: the second validates in full and keeps nothing
};

// Appends what a validation's verdict on t depends on: its data address, dtype, device, sizes, strides.
void append_key(std::vector<int64_t>& key, const at::Tensor& t);

// l2_penalty_inplace_impl with a Validated cache.
at::Tensor l2_penalty_inplace_cached(Validated& seen, at::TensorList params, at::TensorList grads, double weight,
                                     at::IntArrayRef fresh, Weights weights, RunKernel run);

// Each backend's kernel by device type (nullptr: none), for the one caller that skips the dispatcher.
RunKernel kernel_for(c10::DeviceType type);
void set_kernel(c10::DeviceType type, RunKernel run);

// What l2_penalty_'s Autograd kernel checks and its ADInplaceOrView kernel does (csrc/autograd.cpp).
void refuse_grads_in_graph(at::TensorList grads);
void bump_versions(at::TensorList grads);

}  // namespace l2fast

#include <torch/library.h>

namespace l2fast {

// Registers the four ops for one backend (CPU, CUDA) over that backend's kernel.
template <RunKernel run>
void register_kernels(torch::Library& m, c10::DeviceType type) {
  set_kernel(type, run);
  m.impl("sq_norm", [](at::TensorList t) { return sq_norm_impl(t, run); });
  m.impl("l2_penalty", [](at::TensorList p, double w, Weights ws) { return l2_penalty_impl(p, w, ws, run); });
  m.impl("l2_penalty_backward", [](const at::Tensor& g, at::TensorList p, double w, Weights ws) {
    return l2_penalty_backward_impl(g, p, w, ws, run);
  });
  m.impl("l2_penalty_", [](at::TensorList p, at::TensorList g, double w, at::IntArrayRef fresh, Weights ws) {
    return l2_penalty_inplace_impl(p, g, w, fresh, ws, run);
  });
}

}  // namespace l2fast
