// CUDA kernel of l2fast::adamw_: ONE launch per step for every tensor of every param group.
//
// Per element, in registers: g' = g (/ grad_scale) (negated with maximize) + 2·w·p, torch's AdamW
// update with g' in the order and precision of torch's fused CUDA kernel
// (aten/src/ATen/native/cuda/fused_adam_utils.cuh: opmath arithmetic, constants in double), and p²
// of the old p added to the chunk's partial. The per-tensor and per-group table travels as a
// __grid_constant__ kernel parameter (CUDA >= 12.1: 32 KB), or as a device table for long lists.
// The last block to finish adds the partials in chunk order (deterministic, no float atomics) and
// increments every step, so lr, step and found_inf are read on the device: no host sync, capturable.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda/atomic>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "adamw.h"

#if !defined(CUDART_VERSION) || CUDART_VERSION < 12010
#error "l2fast's CUDA kernels need CUDA >= 12.1 (32 KB kernel parameters)"
#endif

namespace l2fast {
namespace {

// ---------------------------------------------------------------------------------------------
// Machinery shared in kind with csrc/cuda/l2_penalty_kernel.cu (chunk sizing, block reduction,
// pinned tables tied to CUDA graphs). TODO(merge): take these from the kernels' shared header.
constexpr int kThreads = 256;
constexpr int64_t kMaxChunkBytes = 64 << 10;  // param bytes per chunk
constexpr int64_t kMinChunkBytes = 4 << 10;
constexpr int kBlocksPerSM = 8;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;  // valid in thread 0
}

// Pinned host tables of destroyed graphs, freed by the next call on a thread that may call CUDA.
struct Graveyard {
  std::mutex mu;
  std::vector<at::Tensor> dead;
};

Graveyard& graveyard() {
  static auto* g = new Graveyard();  // never destroyed: a graph may outlive static destructors
  return *g;
}

void bury(void* table) {
  auto* t = static_cast<at::Tensor*>(table);
  {
    std::lock_guard<std::mutex> lock(graveyard().mu);
    graveyard().dead.push_back(std::move(*t));
  }
  delete t;
}

void release_buried() {
  std::vector<at::Tensor> dead;
  std::lock_guard<std::mutex> lock(graveyard().mu);
  dead.swap(graveyard().dead);
}

// A captured copy re-reads its pinned source at every replay: the source lives as long as the graph.
void tie_to_graph(at::Tensor host, cudaStream_t stream) {
  cudaStreamCaptureStatus status;
  cudaGraph_t graph = nullptr;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph));
  TORCH_INTERNAL_ASSERT(status == cudaStreamCaptureStatusActive && graph != nullptr);
  auto* keep = new at::Tensor(std::move(host));
  cudaUserObject_t object;
  const cudaError_t err = cudaUserObjectCreate(&object, keep, bury, 1, cudaUserObjectNoDestructorSync);
  if (err != cudaSuccess) delete keep;
  C10_CUDA_CHECK(err);
  C10_CUDA_CHECK(cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove));
}
// ---------------------------------------------------------------------------------------------

enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };
enum GradKind : int32_t { kNoGrad = 0, kPlainGrad = 1, kScaledGrad = 2 };

struct TensorMeta {  // 72 bytes
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

struct GroupMeta {  // 64 bytes
  double lr, beta1, beta2, eps, weight_decay, l2_weight;
  const void* lr_ptr;  // a device lr (float32 or float64), or null: `lr`
  int32_t lr_is_double;
  int32_t flags;  // kAmsgrad | kMaximize
};

constexpr int kInlineGroups = 4;
constexpr int kSmallTable = 32;
constexpr int kMaxParamTensors = 432;

template <int N>
struct ParamTable {
  TensorMeta t[N];
  GroupMeta g[kInlineGroups];
  __device__ const TensorMeta& tensor(int i) const { return t[i]; }
  __device__ const GroupMeta& group(int k) const { return g[k]; }
};

struct DeviceTable {
  const TensorMeta* t;
  const GroupMeta* g;
  __device__ const TensorMeta& tensor(int i) const { return t[i]; }
  __device__ const GroupMeta& group(int k) const { return g[k]; }
};

struct Args {
  int ntensors;
  int64_t nchunks;
  int64_t chunk_bytes;
  unsigned int* counter;  // zero at launch
  double* partials;       // one per chunk
  void* out;              // acc_t
  const float* grad_scale;  // or null
  const float* found_inf;   // or null
  int32_t grad_kind_scaled; // grads are unscaled and written back (grad_scale given)
};

static_assert(kMaxParamTensors * sizeof(TensorMeta) + kInlineGroups * sizeof(GroupMeta) + sizeof(Args) <= 32764,
              "kernel parameters too large");

// One chunk's constants, computed once by thread 0 as torch's functor computes them per block.
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

// One element i of one tensor: load, update, store; returns p² of the old p.
template <bool AMSGRAD, int GRAD, typename T, typename opmath_t>
__device__ __forceinline__ opmath_t element(T& p, T* g, T& m, T& v, T* vmax, const Consts<opmath_t>& c) {
  opmath_t param = static_cast<opmath_t>(p);
  opmath_t grad = GRAD == kNoGrad ? opmath_t(0) : static_cast<opmath_t>(*g);
  if constexpr (GRAD == kScaledGrad) {
    grad /= c.grad_scale;
    *g = static_cast<T>(grad);
  }
  const opmath_t sq = param * param;
  opmath_t exp_avg = static_cast<opmath_t>(m), exp_avg_sq = static_cast<opmath_t>(v), max_sq = 0;
  if constexpr (AMSGRAD) max_sq = static_cast<opmath_t>(*vmax);
  adamw_math<AMSGRAD>(param, grad, exp_avg, exp_avg_sq, max_sq, c);
  p = static_cast<T>(param);
  m = static_cast<T>(exp_avg);
  v = static_cast<T>(exp_avg_sq);
  if constexpr (AMSGRAD) *vmax = static_cast<T>(max_sq);
  return sq;
}

// One chunk of one tensor: 16-byte loads of every tensor when all are aligned, element loads otherwise.
template <bool AMSGRAD, int GRAD, typename T, typename opmath_t>
__device__ __noinline__ opmath_t update_chunk(T* __restrict__ p, T* __restrict__ g, T* __restrict__ m,
                                              T* __restrict__ v, T* __restrict__ vmax, int64_t n,
                                              const Consts<opmath_t>& c) {
  constexpr int V = 16 / sizeof(T);
  using P = Pack<T, V>;
  opmath_t acc = 0;
  int64_t done = 0;
  auto aligned = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
  if (aligned(p) && aligned(m) && aligned(v) && (GRAD == kNoGrad || aligned(g)) && (!AMSGRAD || aligned(vmax))) {
    const int64_t nv = n / V;
    for (int64_t i = threadIdx.x; i < nv; i += kThreads) {
      P pp = reinterpret_cast<P*>(p)[i], mm = reinterpret_cast<P*>(m)[i], vv = reinterpret_cast<P*>(v)[i], gg, xx;
      if constexpr (GRAD != kNoGrad) gg = reinterpret_cast<P*>(g)[i];
      if constexpr (AMSGRAD) xx = reinterpret_cast<P*>(vmax)[i];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc += element<AMSGRAD, GRAD>(pp.v[k], &gg.v[k], mm.v[k], vv.v[k], &xx.v[k], c);
      }
      reinterpret_cast<P*>(p)[i] = pp;
      reinterpret_cast<P*>(m)[i] = mm;
      reinterpret_cast<P*>(v)[i] = vv;
      if constexpr (GRAD == kScaledGrad) reinterpret_cast<P*>(g)[i] = gg;
      if constexpr (AMSGRAD) reinterpret_cast<P*>(vmax)[i] = xx;
    }
    done = nv * V;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    acc += element<AMSGRAD, GRAD>(p[i], GRAD == kNoGrad ? nullptr : g + i, m[i], v[i], AMSGRAD ? vmax + i : nullptr, c);
  }
  return acc;
}

// found_inf: nothing written, the penalty summed.
template <typename T, typename opmath_t>
__device__ __noinline__ opmath_t sum_chunk(const T* __restrict__ p, int64_t n) {
  opmath_t acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const opmath_t x = static_cast<opmath_t>(p[i]);
    acc += x * x;
  }
  return acc;
}

template <typename T>
__device__ double typed_chunk(const TensorMeta& t, const GroupMeta& grp, int64_t begin, int64_t n, bool skip,
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
    const bool amsgrad = (grp.flags & kAmsgrad) != 0;
    const int kind = g == nullptr ? kNoGrad : grad_kind;
    if (amsgrad) {
      acc = kind == kNoGrad      ? update_chunk<true, kNoGrad>(p, g, m, v, vmax, n, c)
            : kind == kPlainGrad ? update_chunk<true, kPlainGrad>(p, g, m, v, vmax, n, c)
                                 : update_chunk<true, kScaledGrad>(p, g, m, v, vmax, n, c);
    } else {
      acc = kind == kNoGrad      ? update_chunk<false, kNoGrad>(p, g, m, v, vmax, n, c)
            : kind == kPlainGrad ? update_chunk<false, kPlainGrad>(p, g, m, v, vmax, n, c)
                                 : update_chunk<false, kScaledGrad>(p, g, m, v, vmax, n, c);
    }
    if (grp.l2_weight == 0) acc = 0;  // not summed (a NaN there reaches nothing)
  }
  return static_cast<double>(block_sum(acc));
}

__device__ __forceinline__ int elem_bytes(int32_t dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

template <typename acc_t, typename Table>
__global__ void __launch_bounds__(kThreads)
adamw_kernel(const __grid_constant__ Table table, const __grid_constant__ Args args) {
  __shared__ int shared_tensor;
  __shared__ Consts<float> shared_f;
  __shared__ Consts<double> shared_d;
  __shared__ bool is_last;
  const bool skip = args.found_inf != nullptr && *args.found_inf != 0.0f;
  const int grad_kind = args.grad_kind_scaled ? kScaledGrad : kPlainGrad;
  // Grid-stride over chunks: the grid size changes which block does a chunk, never the result.
  for (int64_t chunk = blockIdx.x; chunk < args.nchunks; chunk += gridDim.x) {
    if (threadIdx.x == 0) {  // the last tensor whose first chunk is <= this chunk, and its constants
      int lo = 0, hi = args.ntensors - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (table.tensor(mid).first_chunk <= chunk) lo = mid; else hi = mid - 1;
      }
      shared_tensor = lo;
      const TensorMeta& t = table.tensor(lo);
      const GroupMeta& grp = table.group(t.group);
      const double lr = grp.lr_ptr == nullptr ? grp.lr
                        : grp.lr_is_double ? *static_cast<const double*>(grp.lr_ptr)
                                           : static_cast<double>(*static_cast<const float*>(grp.lr_ptr));
      const float step_count = *t.step + 1.0f;  // torch: steps += 1 (float32) before its kernel
      const double bias_correction1 = 1 - std::pow(grp.beta1, static_cast<double>(step_count));
      const double bias_correction2 = 1 - std::pow(grp.beta2, static_cast<double>(step_count));
      const double grad_scale = args.grad_scale ? static_cast<double>(*args.grad_scale) : 1.0;
      const bool maximize = (grp.flags & kMaximize) != 0, l2 = grp.l2_weight != 0;
      if (t.dtype == kF64) {
        shared_d = {lr, grp.beta1, grp.beta2, grp.eps, grp.weight_decay, 2 * grp.l2_weight, bias_correction1,
                    std::sqrt(bias_correction2), grad_scale, maximize, l2};
      } else {
        shared_f = {lr, grp.beta1, grp.beta2, grp.eps, grp.weight_decay, static_cast<float>(2 * grp.l2_weight),
                    static_cast<float>(bias_correction1), static_cast<float>(std::sqrt(bias_correction2)), grad_scale,
                    maximize, l2};
      }
    }
    __syncthreads();
    const TensorMeta& t = table.tensor(shared_tensor);
    const GroupMeta& grp = table.group(t.group);
    const int64_t per_chunk = args.chunk_bytes / elem_bytes(t.dtype);
    const int64_t begin = (chunk - t.first_chunk) * per_chunk;
    const int64_t n = min(per_chunk, t.numel - begin);
    double acc;
    switch (t.dtype) {
      case kF64: acc = typed_chunk<double>(t, grp, begin, n, skip, grad_kind, shared_d); break;
      case kF16: acc = typed_chunk<at::Half>(t, grp, begin, n, skip, grad_kind, shared_f); break;
      case kBF16: acc = typed_chunk<at::BFloat16>(t, grp, begin, n, skip, grad_kind, shared_f); break;
      default: acc = typed_chunk<float>(t, grp, begin, n, skip, grad_kind, shared_f);
    }
    if (threadIdx.x == 0) args.partials[chunk] = grp.l2_weight * acc;
    __syncthreads();  // shared_tensor and the constants are rewritten for the next chunk
  }

  if (threadIdx.x == 0) {  // release this block's partials and step reads; the last block acquires all
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> done(*args.counter);
    is_last = done.fetch_add(1u, cuda::memory_order_acq_rel) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  double total = 0.0;
  for (int64_t c = threadIdx.x; c < args.nchunks; c += kThreads) total += __ldcg(args.partials + c);
  total = block_sum(total);
  if (threadIdx.x == 0) *static_cast<acc_t*>(args.out) = static_cast<acc_t>(total);
  if (!skip) {  // every block has read its steps: now they advance (zero-size params' too)
    for (int i = threadIdx.x; i < args.ntensors; i += kThreads) *table.tensor(i).step += 1.0f;
  }
}

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return kF32;
  }
}

template <typename acc_t, typename Table>
void launch(const Table& table, const Args& args, int64_t grid, cudaStream_t stream) {
  adamw_kernel<acc_t, Table><<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(table, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t, int N>
void launch_param_table(const std::vector<TensorMeta>& metas, const std::vector<GroupMeta>& groups, const Args& args,
                        int64_t grid, cudaStream_t stream) {
  ParamTable<N> table;
  std::memcpy(table.t, metas.data(), metas.size() * sizeof(TensorMeta));
  std::memcpy(table.g, groups.data(), groups.size() * sizeof(GroupMeta));
  launch<acc_t>(table, args, grid, stream);
}

at::Tensor run_cuda(const AdamWPlan& plan) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  if (!capturing) release_buried();

  // Chunks of a fixed number of param bytes, smaller when the total is small so that every SM gets work.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t total_bytes = 0;
  for (const AdamWSegment& s : plan.segments) total_bytes += s.numel() * s.p.element_size();
  int64_t chunk_bytes = kMaxChunkBytes;
  while (chunk_bytes > kMinChunkBytes && total_bytes < chunk_bytes * 2 * sms) chunk_bytes /= 2;

  const int ntensors = static_cast<int>(plan.segments.size());
  std::vector<TensorMeta> metas(ntensors);
  int64_t nchunks = 0;
  for (int i = 0; i < ntensors; ++i) {
    const AdamWSegment& s = plan.segments[i];
    const int64_t per_chunk = chunk_bytes / s.p.element_size();
    metas[i] = {s.p.data_ptr(),
                s.g.defined() ? s.g.data_ptr() : nullptr,
                s.m.data_ptr(),
                s.v.data_ptr(),
                s.vmax.defined() ? s.vmax.data_ptr() : nullptr,
                s.step.mutable_data_ptr<float>(),
                s.numel(),
                nchunks,
                dtype_code(s.p.scalar_type()),
                s.group};
    nchunks += (s.numel() + per_chunk - 1) / per_chunk;
  }
  std::vector<GroupMeta> groups(plan.groups.size());
  for (size_t k = 0; k < plan.groups.size(); ++k) {
    const AdamWGroup& g = plan.groups[k];
    groups[k] = {g.lr, g.beta1, g.beta2, g.eps, g.weight_decay, g.l2_weight,
                 g.lr_tensor.defined() ? g.lr_tensor.const_data_ptr() : nullptr,
                 g.lr_tensor.defined() && g.lr_tensor.scalar_type() == at::kDouble,
                 (g.amsgrad ? static_cast<int32_t>(kAmsgrad) : 0) | (g.maximize ? static_cast<int32_t>(kMaximize) : 0)};
  }
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(nchunks, static_cast<int64_t>(sms) * kBlocksPerSM));

  // Device scratch: [device table, if any][counter, padded to 16 B][double partial x nchunks]
  const bool in_params = ntensors <= kMaxParamTensors && groups.size() <= static_cast<size_t>(kInlineGroups);
  const int64_t meta_bytes = ntensors * static_cast<int64_t>(sizeof(TensorMeta));
  const int64_t table_bytes = in_params ? 0 : meta_bytes + static_cast<int64_t>(groups.size() * sizeof(GroupMeta));
  const int64_t head_bytes = (table_bytes + 15) / 16 * 16 + 16;
  const int64_t scratch_bytes = head_bytes + std::max<int64_t>(nchunks, 1) * static_cast<int64_t>(sizeof(double));
  at::Tensor scratch = at::empty({scratch_bytes}, at::TensorOptions().dtype(at::kByte).device(plan.device));
  uint8_t* base = scratch.data_ptr<uint8_t>();
  at::Tensor value = at::empty({}, at::TensorOptions().dtype(plan.acc_dtype()).device(plan.device));
  const Args args{ntensors,
                  nchunks,
                  chunk_bytes,
                  reinterpret_cast<unsigned int*>(base + head_bytes - 16),
                  reinterpret_cast<double*>(base + head_bytes),
                  value.data_ptr(),
                  plan.grad_scale.defined() ? plan.grad_scale.const_data_ptr<float>() : nullptr,
                  plan.found_inf.defined() ? plan.found_inf.const_data_ptr<float>() : nullptr,
                  plan.grad_scale.defined()};

  if (in_params) {
    C10_CUDA_CHECK(cudaMemsetAsync(args.counter, 0, sizeof(unsigned int), stream));
    auto go = [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      if (ntensors <= kSmallTable) launch_param_table<acc_t, kSmallTable>(metas, groups, args, grid, stream);
      else launch_param_table<acc_t, kMaxParamTensors>(metas, groups, args, grid, stream);
    };
    if (plan.any_double) go(double{}); else go(float{});
    return value;
  }

  // A long list: the table (and a zeroed counter) go to the device in one async copy from pinned
  // memory, allocated in relaxed capture mode (the pinned allocator may query events).
  at::Tensor host;
  {
    c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    host = at::empty({head_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }
  uint8_t* h = host.data_ptr<uint8_t>();
  std::memset(h, 0, head_bytes);
  std::memcpy(h, metas.data(), meta_bytes);
  std::memcpy(h + meta_bytes, groups.data(), groups.size() * sizeof(GroupMeta));
  scratch.narrow(0, 0, head_bytes).copy_(host, /*non_blocking=*/true);
  if (capturing) tie_to_graph(std::move(host), stream);
  const DeviceTable table{reinterpret_cast<const TensorMeta*>(base), reinterpret_cast<const GroupMeta*>(base + meta_bytes)};
  if (plan.any_double) launch<double>(table, args, grid, stream); else launch<float>(table, args, grid, stream);
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, CUDA, m) { register_adamw_kernel<run_cuda>(m, c10::DeviceType::CUDA); }

}  // namespace l2fast
