// The multi-tensor plan shared by the CPU and CUDA kernels: inputs validated, every tensor
// reduced to a dense buffer that a kernel may walk as flat memory.
#pragma once

#include <ATen/ATen.h>

#include <mutex>
#include <utility>
#include <vector>

#include "ops.h"

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

struct Plan {
  std::vector<Segment> segments;
  // (user's grad, dense stand-in): copied back after the kernel when a grad was not dense.
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;
  at::Device device = at::kCPU;
  bool any_double = false;  // accumulate in float64 when any input is float64
  bool in_place = true;     // every segment reads and writes the caller's own tensors (no stand-in)

  at::ScalarType acc_dtype() const { return any_double ? at::kDouble : at::kFloat; }
  void finish() const;
};

// What a backend kernel does with a plan: returns weight * sum_s w_s * sum(p_s^2) as a 0-dim
// acc_dtype tensor (when `reduce`), and writes each segment's grad with
// scale = 2 * weight * w_s * (*grad_out if given).
using RunKernel = at::Tensor (*)(const Plan& plan, double weight, const at::Tensor* grad_out, bool reduce);

// Where a non-empty strided tensor lives: its storage, and [first byte, one past the last byte)
// within it. Keyed by storage, not address, so that validation need not load each StorageImpl:
// tensors of different storages never share memory (at::get_overlap_status agrees).
struct Extent {
  const void* storage;
  int64_t begin;
  int64_t end;
  int64_t index;
};
Extent extent_of(const at::Tensor& t, int64_t index);
// Whether two tensors whose extents intersect share an element's memory (exact for interleaved views).
bool share_memory(const at::Tensor& a, const at::Tensor& b);
// Rejects params[i] when undefined, not dense, not float32/64/16/bf16, or not on params[0]'s device.
void check_param(const char* op, at::TensorList params, size_t i);

// Rejects a tensor that is not dense (sparse, mkldnn, ...) or is quantized, naming its layout.
void check_layout(const char* op, const char* name, size_t i, const at::Tensor& t);
// Rejects a non-finite `weight`, a `weights` list whose length is not n, or a non-finite entry.
void check_weights(const char* op, double weight, Weights weights, size_t n);

// The ops, written once over a backend's kernel.
at::Tensor sq_norm_impl(at::TensorList tensors, RunKernel run);
at::Tensor l2_penalty_impl(at::TensorList params, double weight, Weights weights, RunKernel run);
std::vector<at::Tensor> l2_penalty_backward_impl(const at::Tensor& grad, at::TensorList params, double weight,
                                                 Weights weights, RunKernel run);
at::Tensor l2_penalty_inplace_impl(at::TensorList params, at::TensorList grads, double weight,
                                   at::IntArrayRef fresh, Weights weights, RunKernel run);

// What the last successful validation of one caller's (params, grads, weight) depended on: every
// tensor's identity, storage and offset, dtype, device, sizes and strides. A caller that passes the same tensors
// again and again (L2Penalty) keeps one, and while nothing in it changes the checks are skipped.
struct Validated {
  std::vector<int64_t> key;
  std::mutex busy;  // two threads with one cache: the second validates in full and keeps nothing
};

// Appends what a validation's verdict on t depends on (identity, storage, offset, dtype, device, sizes, strides).
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
