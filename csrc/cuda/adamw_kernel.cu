// CUDA kernel of l2fast::adamw_: ONE launch per step for every tensor of every param group.
//
// Per element, in registers: g' = g (/ grad_scale) (negated with maximize) + 2·w·p, torch's AdamW
// update with g' in the order and precision of torch's fused CUDA kernel
// (aten/src/ATen/native/cuda/fused_adam_utils.cuh: opmath arithmetic, constants in double), and p²
// of the old p added to the chunk's partial.
//
// The launch is l2_penalty_'s (multi_tensor.cuh): the per-tensor table as a __grid_constant__
// parameter in the smallest of 32, 64, 128, 256 or 448 entries (a 72-byte record), a device table
// beyond (cached while unchanged, from the capture pool under CUDA-graph capture); the param groups
// (up to 4) in the arguments, more in a device table of their own; chunks of a byte size chosen from
// the list alone; one wave of resident blocks, each walking a contiguous range of chunks. The sum
// is the penalty kernel's: within a chunk, 16-byte groups of elements, thread t taking groups t,
// t + 256, ... with one opmath accumulator per position in the group (at most 16 terms each in a
// 64 KB chunk), one float64 partial per chunk, added by the last block in an order that depends on
// the number of chunks only. So the value's bits depend on the values and the list, not on the GPU,
// the grid or the addresses. The last block also increments every step, so lr, step and found_inf
// are read on the device: no host sync, capturable.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstring>

#include "adamw.h"
#include "multi_tensor.cuh"

namespace l2fast {
namespace {

using mt::kThreads;

enum GradKind : int32_t { kNoGrad = 0, kPlainGrad = 1, kScaledGrad = 2 };

struct TensorMeta {
  void* p;
  void* g;     // null: no data grad (the penalty's gradient alone)
  void* m;
  void* v;
  void* vmax;  // amsgrad groups only
  float* step;
  int64_t numel;
  int64_t first_chunk;
  int32_t dtype;
  int32_t group;
};
static_assert(sizeof(TensorMeta) == 72, "TensorMeta must have no padding (device tables compare bytes)");

struct GroupMeta {
  double lr, beta1, beta2, eps, weight_decay, l2_weight;
  const void* lr_ptr;  // a device lr (float32 or float64), or null: `lr`
  int32_t lr_is_double;
  int32_t flags;  // kAmsgrad | kMaximize
};
static_assert(sizeof(GroupMeta) == 64, "GroupMeta must have no padding (device tables compare bytes)");

constexpr int kArgGroups = 4;  // groups carried in Args; more go to a device table

struct Args {
  int ntensors;
  int32_t scaled;  // grad_scale given: grads are unscaled and written back
  int64_t nchunks;
  int64_t chunk_bytes;
  mt::Reduction red;
  void* out;                     // float64 when out_double, else float32
  const float* grad_scale;       // or null
  const float* found_inf;        // or null
  const GroupMeta* group_table;  // more than kArgGroups groups; null: `groups`
  int32_t out_double;
  GroupMeta groups[kArgGroups];
};

static_assert(mt::max_param_tensors<TensorMeta, Args>() == 448, "the docs say 448 tensors in the parameters");

__device__ __forceinline__ const GroupMeta& group_of(const Args& a, int k) {
  return a.group_table != nullptr ? a.group_table[k] : a.groups[k];
}

// One tensor's constants, computed once per tensor by thread 0 as torch's functor computes them per block.
template <typename opmath_t>
struct Consts {
  double lr, beta1, beta2, eps, weight_decay;
  opmath_t l2_scale, bias_correction1, bias_correction2_sqrt;
  double grad_scale;
  bool maximize, l2;
};

// torch's adam_math for one element (ADAMW mode), with the penalty's gradient of the old param
// added after maximize's negation: fma(p, 2w, g), one rounding, as l2_penalty_'s kernels form it.
template <bool AMSGRAD, typename opmath_t>
__device__ __forceinline__ void adamw_math(opmath_t& param, opmath_t grad, opmath_t& exp_avg, opmath_t& exp_avg_sq,
                                           opmath_t& max_exp_avg_sq, const Consts<opmath_t>& c) {
  if (c.maximize) grad = -grad;
  if (c.l2) grad = fma(param, c.l2_scale, grad);
  if (c.weight_decay != 0) param -= c.lr * c.weight_decay * param;
  exp_avg = c.beta1 * exp_avg + (1 - c.beta1) * grad;
  exp_avg_sq = c.beta2 * exp_avg_sq + (1 - c.beta2) * grad * grad;
  const opmath_t step_size = c.lr / c.bias_correction1;
  opmath_t denom;
  if constexpr (AMSGRAD) {
    max_exp_avg_sq = std::max(max_exp_avg_sq, exp_avg_sq);
    denom = (std::sqrt(max_exp_avg_sq) / c.bias_correction2_sqrt) + c.eps;
  } else {
    denom = (std::sqrt(exp_avg_sq) / c.bias_correction2_sqrt) + c.eps;
  }
  param -= step_size * exp_avg / denom;
}

// One element: the old p² into `acc` (one fma, as the penalty kernel sums), then updated in place.
// g and vmax are only touched as GRAD and AMSGRAD say.
template <bool AMSGRAD, int GRAD, typename T, typename opmath_t>
__device__ __forceinline__ void element(T& p, T& g, T& m, T& v, T& vmax, const Consts<opmath_t>& c, opmath_t& acc) {
  opmath_t param = static_cast<opmath_t>(p);
  opmath_t grad = GRAD == kNoGrad ? opmath_t(0) : static_cast<opmath_t>(g);
  if constexpr (GRAD == kScaledGrad) {
    grad /= c.grad_scale;
    g = static_cast<T>(grad);
  }
  acc = fma(param, param, acc);
  opmath_t exp_avg = static_cast<opmath_t>(m), exp_avg_sq = static_cast<opmath_t>(v), max_sq = 0;
  if constexpr (AMSGRAD) max_sq = static_cast<opmath_t>(vmax);
  adamw_math<AMSGRAD>(param, grad, exp_avg, exp_avg_sq, max_sq, c);
  p = static_cast<T>(param);
  m = static_cast<T>(exp_avg);
  v = static_cast<T>(exp_avg_sq);
  if constexpr (AMSGRAD) vmax = static_cast<T>(max_sq);
}

// The penalty kernel's walk of a chunk of n elements: groups of V elements (16 bytes), thread t
// taking groups t, t + kThreads, ... in order; the last group may be partial. group(q, count) does
// elements [q·V, q·V + count): element q·V + k goes to accumulator k, whichever way it is loaded.
template <int V, typename Group>
__device__ __forceinline__ void walk(int64_t n, Group&& group) {
  const int64_t groups = (n + V - 1) / V;
  for (int64_t q = threadIdx.x; q < groups; q += kThreads) group(q, static_cast<int>(min(int64_t{V}, n - q * V)));
}

__device__ __forceinline__ bool aligned(const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; }

// Group q of x, elements [0, count) (the rest 0): one 16-byte load when `vec`, else element loads.
template <int V, typename T>
__device__ __forceinline__ mt::Pack<T, V> load_group(const T* x, int64_t q, int count, bool vec) {
  if (vec) return reinterpret_cast<const mt::Pack<T, V>*>(x)[q];
  mt::Pack<T, V> r;
#pragma unroll
  for (int k = 0; k < V; ++k) r.v[k] = k < count ? x[q * V + k] : T(0);
  return r;
}

template <int V, typename T>
__device__ __forceinline__ void store_group(T* x, int64_t q, int count, bool vec, const mt::Pack<T, V>& r) {
  if (vec) {
    reinterpret_cast<mt::Pack<T, V>*>(x)[q] = r;
    return;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k < count) x[q * V + k] = r.v[k];
  }
}

// One chunk of one tensor updated; returns the thread's sum of the old p² (its accumulators added).
// The lanes past a partial group's end hold 0: their p² adds exactly 0, and they are not stored.
template <bool AMSGRAD, int GRAD, typename T, typename opmath_t>
__device__ __forceinline__ opmath_t update_chunk(T* __restrict__ p, T* __restrict__ g, T* __restrict__ m,
                                              T* __restrict__ v, T* __restrict__ vmax, int64_t n,
                                              const Consts<opmath_t>& c) {
  constexpr int V = 16 / sizeof(T);
  using P = mt::Pack<T, V>;
  opmath_t acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = opmath_t(0);
  const bool all_aligned =
      aligned(p) && aligned(m) && aligned(v) && (GRAD == kNoGrad || aligned(g)) && (!AMSGRAD || aligned(vmax));
  walk<V>(n, [&](int64_t q, int count) {
    const bool vec = all_aligned && count == V;
    P pp = load_group<V>(p, q, count, vec), mm = load_group<V>(m, q, count, vec), vv = load_group<V>(v, q, count, vec);
    P gg, xx;
    if constexpr (GRAD != kNoGrad) gg = load_group<V>(g, q, count, vec);
    if constexpr (AMSGRAD) xx = load_group<V>(vmax, q, count, vec);
#pragma unroll
    for (int k = 0; k < V; ++k) element<AMSGRAD, GRAD>(pp.v[k], gg.v[k], mm.v[k], vv.v[k], xx.v[k], c, acc[k]);
    store_group<V>(p, q, count, vec, pp);
    store_group<V>(m, q, count, vec, mm);
    store_group<V>(v, q, count, vec, vv);
    if constexpr (GRAD == kScaledGrad) store_group<V>(g, q, count, vec, gg);
    if constexpr (AMSGRAD) store_group<V>(vmax, q, count, vec, xx);
  });
  return mt::sum_lanes(acc);
}

// found_inf: nothing written, the old p² summed as update_chunk sums it.
template <typename T, typename opmath_t>
__device__ __forceinline__ opmath_t sum_chunk(const T* __restrict__ p, int64_t n) {
  constexpr int V = 16 / sizeof(T);
  opmath_t acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = opmath_t(0);
  const bool all_aligned = aligned(p);
  walk<V>(n, [&](int64_t q, int count) {
    const mt::Pack<T, V> x = load_group<V>(p, q, count, all_aligned && count == V);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const opmath_t y = static_cast<opmath_t>(x.v[k]);
      acc[k] = fma(y, y, acc[k]);
    }
  });
  return mt::sum_lanes(acc);
}

// One chunk of a tensor of type T: the block's sum of the old p² (valid in thread 0; 0 for weight 0).
template <typename T>
__device__ __forceinline__ double typed_chunk(const TensorMeta& t, const GroupMeta& grp, int64_t begin, int64_t n, bool skip,
                              int grad_kind, const Consts<at::opmath_type<T>>& c) {
  using opmath_t = at::opmath_type<T>;
  T* p = static_cast<T*>(t.p) + begin;
  opmath_t acc;
  if (skip) {
    if (grp.l2_weight == 0) return 0.0;
    acc = sum_chunk<T, opmath_t>(p, n);
  } else {
    T* g = t.g ? static_cast<T*>(t.g) + begin : nullptr;
    T* m = static_cast<T*>(t.m) + begin;
    T* v = static_cast<T*>(t.v) + begin;
    T* vmax = t.vmax ? static_cast<T*>(t.vmax) + begin : nullptr;
    const int kind = g == nullptr ? kNoGrad : grad_kind;
    if ((grp.flags & kAmsgrad) != 0) {
      acc = kind == kNoGrad      ? update_chunk<true, kNoGrad>(p, g, m, v, vmax, n, c)
            : kind == kPlainGrad ? update_chunk<true, kPlainGrad>(p, g, m, v, vmax, n, c)
                                 : update_chunk<true, kScaledGrad>(p, g, m, v, vmax, n, c);
    } else {
      acc = kind == kNoGrad      ? update_chunk<false, kNoGrad>(p, g, m, v, vmax, n, c)
            : kind == kPlainGrad ? update_chunk<false, kPlainGrad>(p, g, m, v, vmax, n, c)
                                 : update_chunk<false, kScaledGrad>(p, g, m, v, vmax, n, c);
    }
    if (grp.l2_weight == 0) return 0.0;  // not summed (a NaN there reaches nothing)
  }
  return static_cast<double>(mt::block_sum(acc));
}

// Thread 0: the constants of a tensor's update, from its group, its step and grad_scale.
__device__ __forceinline__ void set_consts(const float* step, int32_t dtype, const GroupMeta& grp, const Args& args,
                                        Consts<float>& cf, Consts<double>& cd) {
  const double lr = grp.lr_ptr == nullptr ? grp.lr
                    : grp.lr_is_double    ? *static_cast<const double*>(grp.lr_ptr)
                                          : static_cast<double>(*static_cast<const float*>(grp.lr_ptr));
  const float step_count = *step + 1.0f;  // torch: steps += 1 (float32) before its kernel
  const double bias_correction1 = 1 - std::pow(grp.beta1, static_cast<double>(step_count));
  const double bias_correction2 = 1 - std::pow(grp.beta2, static_cast<double>(step_count));
  const double grad_scale = args.grad_scale ? static_cast<double>(*args.grad_scale) : 1.0;
  const bool maximize = (grp.flags & kMaximize) != 0, l2 = grp.l2_weight != 0;
  if (dtype == mt::kF64) {
    cd = {lr, grp.beta1, grp.beta2, grp.eps, grp.weight_decay, 2 * grp.l2_weight, bias_correction1,
          std::sqrt(bias_correction2), grad_scale, maximize, l2};
  } else {
    cf = {lr, grp.beta1, grp.beta2, grp.eps, grp.weight_decay, static_cast<float>(2 * grp.l2_weight),
          static_cast<float>(bias_correction1), static_cast<float>(std::sqrt(bias_correction2)), grad_scale,
          maximize, l2};
  }
}

// Every function the kernel calls per chunk is inlined: across a real call (the ABI keeps few
// registers), the chunk walk's state would be spilled.
template <typename Table>
__global__ void __launch_bounds__(kThreads)
adamw_kernel(const __grid_constant__ Table table, const __grid_constant__ Args args) {
  __shared__ Consts<float> consts_f;
  __shared__ Consts<double> consts_d;
  const bool skip = args.found_inf != nullptr && *args.found_inf != 0.0f;
  const int grad_kind = args.scaled ? kScaledGrad : kPlainGrad;
  int64_t consts_of = -1;  // first_chunk of the tensor whose constants are in shared memory
  mt::for_each_chunk(table, args.ntensors, args.nchunks, [&](const TensorMeta& t, int64_t local, int64_t chunk) {
    const GroupMeta& grp = group_of(args, t.group);
    if (!skip && t.first_chunk != consts_of) {  // block-uniform: the next tensor in this block's range
      __syncthreads();  // the previous tensor's chunks are done with the constants
      if (threadIdx.x == 0) set_consts(t.step, t.dtype, grp, args, consts_f, consts_d);
      __syncthreads();
      consts_of = t.first_chunk;
    }
    const int64_t per_chunk = args.chunk_bytes / mt::elem_bytes(t.dtype);
    const int64_t begin = local * per_chunk;
    const int64_t n = min(per_chunk, t.numel - begin);
    double sum;
    switch (t.dtype) {
      case mt::kF64: sum = typed_chunk<double>(t, grp, begin, n, skip, grad_kind, consts_d); break;
      case mt::kF16: sum = typed_chunk<at::Half>(t, grp, begin, n, skip, grad_kind, consts_f); break;
      case mt::kBF16: sum = typed_chunk<at::BFloat16>(t, grp, begin, n, skip, grad_kind, consts_f); break;
      default: sum = typed_chunk<float>(t, grp, begin, n, skip, grad_kind, consts_f);
    }
    if (threadIdx.x == 0) args.red.partials[chunk] = grp.l2_weight * sum;
  });
  // Every block has read its steps before it arrives: the last one may advance them.
  double total;
  if (!mt::last_block_total(args.red, args.nchunks, total)) return;
  if (threadIdx.x == 0) {
    if (args.out_double) *static_cast<double*>(args.out) = total;
    else *static_cast<float*>(args.out) = static_cast<float>(total);
  }
  if (!skip) {  // zero-size params' steps too
    for (int i = threadIdx.x; i < args.ntensors; i += kThreads) *table[i].step += 1.0f;
  }
}

at::Tensor run_cuda(const AdamWPlan& plan) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;

  int64_t total_bytes = 0;
  for (const AdamWSegment& s : plan.segments) total_bytes += s.numel() * s.p.element_size();
  mt::Chunks chunks{mt::chunk_bytes_for(total_bytes)};
  const int ntensors = static_cast<int>(plan.segments.size());
  std::vector<TensorMeta> metas(ntensors);
  for (int i = 0; i < ntensors; ++i) {
    const AdamWSegment& s = plan.segments[i];
    metas[i] = {s.p.data_ptr(),
                s.g.defined() ? s.g.data_ptr() : nullptr,
                s.m.data_ptr(),
                s.v.data_ptr(),
                s.vmax.defined() ? s.vmax.data_ptr() : nullptr,
                s.step.mutable_data_ptr<float>(),
                s.numel(),
                chunks.add(s.numel(), s.p.element_size()),
                mt::dtype_code(s.p.scalar_type()),
                s.group};
  }
  std::vector<GroupMeta> groups(plan.groups.size());
  for (size_t k = 0; k < plan.groups.size(); ++k) {
    const AdamWGroup& g = plan.groups[k];
    groups[k] = {g.lr, g.beta1, g.beta2, g.eps, g.weight_decay, g.l2_weight,
                 g.lr_tensor.defined() ? g.lr_tensor.const_data_ptr() : nullptr,
                 g.lr_tensor.defined() && g.lr_tensor.scalar_type() == at::kDouble,
                 (g.amsgrad ? static_cast<int32_t>(kAmsgrad) : 0) | (g.maximize ? static_cast<int32_t>(kMaximize) : 0)};
  }

  at::Tensor value = at::empty({}, at::TensorOptions().dtype(plan.acc_dtype()).device(plan.device));
  at::Tensor scratch, group_table;
  Args args{};
  args.ntensors = ntensors;
  args.scaled = plan.grad_scale.defined();
  args.nchunks = chunks.count;
  args.chunk_bytes = chunks.chunk_bytes;
  args.red = mt::reduction(chunks.count, plan.device, stream, scratch);
  args.out = value.data_ptr();
  args.out_double = plan.any_double;
  args.grad_scale = plan.grad_scale.defined() ? plan.grad_scale.const_data_ptr<float>() : nullptr;
  args.found_inf = plan.found_inf.defined() ? plan.found_inf.const_data_ptr<float>() : nullptr;
  if (groups.size() <= static_cast<size_t>(kArgGroups)) {
    std::memcpy(args.groups, groups.data(), groups.size() * sizeof(GroupMeta));
  } else {  // as a long list's table: cached while unchanged, tied to the graph under capture
    args.group_table = static_cast<const GroupMeta*>(mt::upload_table(
        groups.data(), static_cast<int64_t>(groups.size() * sizeof(GroupMeta)), stream, capturing, group_table));
  }
  mt::with_table<TensorMeta, Args>(metas, stream, capturing, [&](const auto& table) {
    mt::launch<&adamw_kernel<std::decay_t<decltype(table)>>>(table, args, args.nchunks, stream);
  });
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, CUDA, m) { register_adamw_kernel<run_cuda>(m, c10::DeviceType::CUDA); }

}  // namespace l2fast
