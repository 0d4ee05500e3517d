// CUDA kernel: ONE launch per call for any number of tensors.
//
// apex's multi_tensor_l2norm and ATen's MultiTensorApply pass tensor pointers as kernel arguments,
// so a long list takes several launches, and the norm needs a second "cleanup" launch plus a
// zero-filled output. Here the per-tensor table travels to the device with the (pinned, async)
// copy that also zeroes the completion counter, every block reduces one fixed chunk, and the last
// block to finish adds the per-chunk partials in chunk order: deterministic, no float atomics, no
// host synchronisation, and the copy + kernel pair is capturable in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <cstring>
#include <limits>
#include <mutex>

#include "l2_penalty.h"

namespace l2fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block: 16 vector loads of float4 per thread
constexpr int kUnroll = 4;         // vector loads in flight per thread

enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct TensorMeta {
  const void* p;
  void* g;
  int64_t numel;
  int64_t first_chunk;
  int32_t dtype;
  int32_t mode;
  int64_t pad;  // 48 bytes: keeps the table 16-byte aligned
};

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
  __syncthreads();  // warp_sums may be reused by a later call in the same block
  return v;         // valid in thread 0
}

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t visit(T x, T* g, int32_t mode, acc_t scale) {
  const acc_t v = static_cast<acc_t>(x);
  if (mode == 1) *g = static_cast<T>(static_cast<acc_t>(*g) + scale * v);
  if (mode == 2) *g = static_cast<T>(scale * v);
  return v * v;
}

// One chunk of one tensor: 16-byte loads when both pointers allow, element loads otherwise.
template <typename T, typename acc_t>
__device__ acc_t chunk_sum(const T* __restrict__ p, T* __restrict__ g, int64_t n, int32_t mode, acc_t scale) {
  constexpr int V = 16 / sizeof(T);
  using P = Pack<T, V>;
  acc_t acc = 0;
  int64_t done = 0;
  const bool aligned = reinterpret_cast<uintptr_t>(p) % 16 == 0 && (mode == 0 || reinterpret_cast<uintptr_t>(g) % 16 == 0);
  if (aligned) {
    const P* pv = reinterpret_cast<const P*>(p);
    P* gv = reinterpret_cast<P*>(g);
    const int64_t nv = n / V;
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * kThreads < nv; i += kUnroll * kThreads) {
      P x[kUnroll], y[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) x[u] = pv[i + u * kThreads];
      if (mode == 1) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) y[u] = gv[i + u * kThreads];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc += visit(x[u].v[k], &y[u].v[k], mode, scale);
        if (mode != 0) gv[i + u * kThreads] = y[u];
      }
    }
    for (; i < nv; i += kThreads) {
      P x = pv[i], y;
      if (mode == 1) y = gv[i];
#pragma unroll
      for (int k = 0; k < V; ++k) acc += visit(x.v[k], &y.v[k], mode, scale);
      if (mode != 0) gv[i] = y;
    }
    done = nv * V;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    const acc_t v = static_cast<acc_t>(p[i]);
    if (mode == 1) g[i] = static_cast<T>(static_cast<acc_t>(g[i]) + scale * v);
    if (mode == 2) g[i] = static_cast<T>(scale * v);
    acc += v * v;
  }
  return acc;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
l2_penalty_kernel(const TensorMeta* __restrict__ table, int ntensors, unsigned int* counter, double* partials,
                  acc_t* out, double weight, double scale, const acc_t* grad_out) {
  __shared__ int tensor;
  __shared__ bool is_last;
  const int64_t chunk = blockIdx.x;
  if (threadIdx.x == 0) {  // the last tensor whose first chunk is <= this chunk
    int lo = 0, hi = ntensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (table[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
    }
    tensor = lo;
  }
  __syncthreads();
  const TensorMeta m = table[tensor];
  const int64_t begin = (chunk - m.first_chunk) * kChunk;
  const int64_t n = min(kChunk, m.numel - begin);
  const acc_t s = static_cast<acc_t>(grad_out ? scale * static_cast<double>(*grad_out) : scale);
  acc_t acc;
  switch (m.dtype) {
    case kF64:
      acc = chunk_sum<double, acc_t>(static_cast<const double*>(m.p) + begin, static_cast<double*>(m.g) + begin, n, m.mode, s);
      break;
    case kF16:
      acc = chunk_sum<at::Half, acc_t>(static_cast<const at::Half*>(m.p) + begin, static_cast<at::Half*>(m.g) + begin, n, m.mode, s);
      break;
    case kBF16:
      acc = chunk_sum<at::BFloat16, acc_t>(static_cast<const at::BFloat16*>(m.p) + begin, static_cast<at::BFloat16*>(m.g) + begin, n, m.mode, s);
      break;
    default:
      acc = chunk_sum<float, acc_t>(static_cast<const float*>(m.p) + begin, static_cast<float*>(m.g) + begin, n, m.mode, s);
  }
  if (out == nullptr) return;  // backward: grads only

  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    partials[chunk] = static_cast<double>(acc);
    __threadfence();  // publish the partial before counting this block as done
    is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double total = 0.0;
  for (int64_t c = threadIdx.x; c < gridDim.x; c += kThreads) total += __ldcg(partials + c);
  total = block_sum(total);
  if (threadIdx.x == 0) {
    *out = static_cast<acc_t>(weight * total);
    *counter = 0;  // left as found (the next call re-zeroes it anyway)
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

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// A pinned allocation may query events left by earlier copies, which a "global" capture forbids on
// torch versions whose host allocator is not capture-aware: allocate in relaxed mode while capturing.
at::Tensor pinned_bytes(int64_t n) {
  const bool cap = capturing();
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cap) C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  at::Tensor t = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (cap) C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  return t;
}

// A graph's copy node re-reads its host table at every replay, so the table must outlive the graph.
// Recent torch keeps pinned blocks used during capture itself; older ones may reuse them: keep them.
void keep_alive_if_capturing(const at::Tensor& host_table) {
  if (!capturing()) return;
  static std::mutex mu;
  static std::vector<at::Tensor> kept;
  std::lock_guard<std::mutex> lock(mu);
  kept.push_back(host_table);
}

at::Tensor run_cuda(const Plan& plan, double weight, const at::Tensor* grad_out, bool reduce) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const int ntensors = static_cast<int>(plan.segments.size());
  // Layout of one device buffer: [TensorMeta x ntensors][counter, padded to 16 B][double partial x nchunks]
  const int64_t table_bytes = ntensors * static_cast<int64_t>(sizeof(TensorMeta));
  const int64_t head_bytes = table_bytes + 16;

  at::Tensor host = pinned_bytes(head_bytes);
  auto* table = reinterpret_cast<TensorMeta*>(host.data_ptr());
  int64_t nchunks = 0;
  for (int i = 0; i < ntensors; ++i) {
    const Segment& seg = plan.segments[i];
    const int64_t numel = seg.p.numel();
    table[i] = {seg.p.const_data_ptr(), seg.g.defined() ? seg.g.mutable_data_ptr() : nullptr, numel, nchunks,
                dtype_code(seg.p.scalar_type()), static_cast<int32_t>(seg.mode), 0};
    nchunks += (numel + kChunk - 1) / kChunk;
  }
  std::memset(host.data_ptr<uint8_t>() + table_bytes, 0, 16);
  TORCH_CHECK(nchunks <= std::numeric_limits<int32_t>::max(), "l2fast: ", nchunks, " chunks exceed one launch's grid");

  const int64_t partial_bytes = reduce ? nchunks * static_cast<int64_t>(sizeof(double)) : 0;
  at::Tensor dev = at::empty({head_bytes + partial_bytes}, at::TensorOptions().dtype(at::kByte).device(plan.device));
  dev.narrow(0, 0, head_bytes).copy_(host, /*non_blocking=*/true);
  keep_alive_if_capturing(host);

  uint8_t* base = dev.data_ptr<uint8_t>();
  auto* counter = reinterpret_cast<unsigned int*>(base + table_bytes);
  auto* partials = reinterpret_cast<double*>(base + head_bytes);
  at::Tensor value = reduce ? at::empty({}, at::TensorOptions().dtype(plan.acc_dtype()).device(plan.device)) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const double scale = 2.0 * weight;

  auto launch = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    l2_penalty_kernel<acc_t><<<static_cast<unsigned int>(nchunks), kThreads, 0, stream>>>(
        reinterpret_cast<const TensorMeta*>(base), ntensors, counter, partials,
        reduce ? value.data_ptr<acc_t>() : nullptr, weight, scale,
        grad_out ? grad_out->const_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (plan.any_double) launch(double{}); else launch(float{});
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, CUDA, m) { register_kernels<run_cuda>(m); }

}  // namespace l2fast
