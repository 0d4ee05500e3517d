// CUDA kernel: ONE launch per call for any number of tensors.
//
// apex's multi_tensor_l2norm and ATen's MultiTensorApply pass a few tensor pointers per launch, so
// a long list takes several launches, and the norm needs a second "cleanup" launch. Here the whole
// per-tensor table travels as a __grid_constant__ kernel parameter (CUDA >= 12.1 allows 32 KB: up
// to kMaxParamTensors tensors), so the common case has no host-to-device copy and nothing to keep
// alive under graph capture; longer lists take a device table (see device_table). Blocks walk
// chunks of a fixed byte size, each chunk's partial is stored, and the last block to finish adds
// the partials in a fixed order that depends on the chunk count only, not on the grid: the result
// is deterministic, with no float atomics and no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda/atomic>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "l2_penalty.h"

#if !defined(CUDART_VERSION) || CUDART_VERSION < 12010
#error "l2fast's CUDA kernels need CUDA >= 12.1 (32 KB kernel parameters)"
#endif

namespace l2fast {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                      // 16-byte loads in flight per thread
constexpr int64_t kMaxChunkBytes = 64 << 10;    // 16 loads of 16 bytes per thread
constexpr int64_t kMinChunkBytes = 4 << 10;     // one load per thread
constexpr int kBlocksPerSM = 8;                 // 2048 resident threads per SM on sm_80/sm_90

enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct TensorMeta {
  const void* p;  // null for GradMode::kZero
  void* g;        // null for GradMode::kNone
  int64_t numel;
  int64_t first_chunk;
  int32_t dtype;
  GradMode mode;
  double w;  // the tensor's weight multiplier; 48 bytes keep a device table 16-byte aligned
};

// Tables passed by value. 672 * 48 bytes + Args stays under the 32,764-byte parameter limit.
constexpr int kSmallTable = 32;
constexpr int kMaxParamTensors = 672;

template <int N>
struct ParamTable {
  TensorMeta t[N];
  __device__ const TensorMeta& operator[](int i) const { return t[i]; }
};

struct DeviceTable {
  const TensorMeta* t;
  __device__ const TensorMeta& operator[](int i) const { return t[i]; }
};

struct Args {
  int ntensors;
  int64_t nchunks;
  int64_t chunk_bytes;
  unsigned int* counter;  // zero at launch; reduce only
  double* partials;       // one per chunk; reduce only
  void* out;              // acc_t; null when not reducing (backward: grads only)
  double weight;
  double scale;          // 2 * weight
  const void* grad_out;  // acc_t, or null
};

static_assert(kMaxParamTensors * sizeof(TensorMeta) + sizeof(Args) <= 32764, "kernel parameters too large");

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ int elem_bytes(int32_t dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

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
  __syncthreads();  // warp_sums is reused by the next call
  return v;         // valid in thread 0
}

// One element: its square, and its grad written as MODE says.
template <GradMode MODE, typename T, typename acc_t>
__device__ __forceinline__ acc_t visit(T x, T* g, acc_t scale) {
  const acc_t v = static_cast<acc_t>(x);
  if constexpr (MODE == GradMode::kAccumulate) *g = static_cast<T>(static_cast<acc_t>(*g) + scale * v);
  if constexpr (MODE == GradMode::kWrite) *g = static_cast<T>(scale * v);
  return v * v;
}

// One chunk of one tensor: 16-byte loads when both pointers allow, element loads otherwise.
// Not inlined: each (MODE, T, acc_t) is compiled once and shared by every table size.
template <GradMode MODE, typename T, typename acc_t>
__device__ __noinline__ acc_t chunk_sum(const T* __restrict__ p, T* __restrict__ g, int64_t n, acc_t scale) {
  if constexpr (MODE == GradMode::kZero) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) g[i] = T(0);
    return acc_t(0);
  } else {
    constexpr bool kWrites = MODE != GradMode::kNone;
    constexpr int V = 16 / sizeof(T);
    using P = Pack<T, V>;
    acc_t acc = 0;
    int64_t done = 0;
    if (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (!kWrites || reinterpret_cast<uintptr_t>(g) % 16 == 0)) {
      const P* pv = reinterpret_cast<const P*>(p);
      P* gv = reinterpret_cast<P*>(g);
      const int64_t nv = n / V;
      int64_t i = threadIdx.x;
      for (; i + (kUnroll - 1) * kThreads < nv; i += kUnroll * kThreads) {
        P x[kUnroll], y[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) x[u] = pv[i + u * kThreads];
        if constexpr (MODE == GradMode::kAccumulate) {
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) y[u] = gv[i + u * kThreads];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int k = 0; k < V; ++k) acc += visit<MODE>(x[u].v[k], &y[u].v[k], scale);
          if constexpr (kWrites) gv[i + u * kThreads] = y[u];
        }
      }
      for (; i < nv; i += kThreads) {
        P x = pv[i], y;
        if constexpr (MODE == GradMode::kAccumulate) y = gv[i];
#pragma unroll
        for (int k = 0; k < V; ++k) acc += visit<MODE>(x.v[k], &y.v[k], scale);
        if constexpr (kWrites) gv[i] = y;
      }
      done = nv * V;
    }
    for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
      acc += visit<MODE>(p[i], kWrites ? g + i : nullptr, scale);
    }
    return acc;
  }
}

template <typename T, typename acc_t>
__device__ acc_t typed_chunk(const TensorMeta& m, int64_t begin, int64_t n, acc_t scale) {
  const T* p = m.p ? static_cast<const T*>(m.p) + begin : nullptr;
  T* g = m.g ? static_cast<T*>(m.g) + begin : nullptr;
  switch (m.mode) {
    case GradMode::kAccumulate: return chunk_sum<GradMode::kAccumulate>(p, g, n, scale);
    case GradMode::kWrite: return chunk_sum<GradMode::kWrite>(p, g, n, scale);
    case GradMode::kZero: return chunk_sum<GradMode::kZero>(p, g, n, scale);
    default: return chunk_sum<GradMode::kNone>(p, g, n, scale);
  }
}

template <typename acc_t, typename Table>
__global__ void __launch_bounds__(kThreads)
l2_penalty_kernel(const __grid_constant__ Table table, const __grid_constant__ Args args) {
  __shared__ int shared_tensor;
  __shared__ bool is_last;
  const double grad_scale =
      args.scale * (args.grad_out ? static_cast<double>(*static_cast<const acc_t*>(args.grad_out)) : 1.0);
  // Grid-stride over chunks: the grid size changes which block does a chunk, never the result.
  for (int64_t chunk = blockIdx.x; chunk < args.nchunks; chunk += gridDim.x) {
    if (threadIdx.x == 0) {  // the last tensor whose first chunk is <= this chunk
      int lo = 0, hi = args.ntensors - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (table[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
      }
      shared_tensor = lo;
    }
    __syncthreads();
    const TensorMeta m = table[shared_tensor];
    const int64_t per_chunk = args.chunk_bytes / elem_bytes(m.dtype);
    const int64_t begin = (chunk - m.first_chunk) * per_chunk;
    const int64_t n = min(per_chunk, m.numel - begin);
    const acc_t s = static_cast<acc_t>(m.w * grad_scale);
    acc_t acc;
    switch (m.dtype) {
      case kF64: acc = typed_chunk<double>(m, begin, n, s); break;
      case kF16: acc = typed_chunk<at::Half>(m, begin, n, s); break;
      case kBF16: acc = typed_chunk<at::BFloat16>(m, begin, n, s); break;
      default: acc = typed_chunk<float>(m, begin, n, s);
    }
    if (args.out != nullptr) {
      acc = block_sum(acc);
      if (threadIdx.x == 0) args.partials[chunk] = m.w * static_cast<double>(acc);
    }
    __syncthreads();  // shared_tensor is rewritten for the next chunk
  }
  if (args.out == nullptr) return;

  if (threadIdx.x == 0) {  // release this block's partials; the last block acquires everyone's
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> done(*args.counter);
    is_last = done.fetch_add(1u, cuda::memory_order_acq_rel) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  double total = 0.0;
  for (int64_t c = threadIdx.x; c < args.nchunks; c += kThreads) total += __ldcg(args.partials + c);
  total = block_sum(total);
  if (threadIdx.x == 0) *static_cast<acc_t*>(args.out) = static_cast<acc_t>(args.weight * total);
}

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return kF32;
  }
}

// Pinned host tables of graphs that were destroyed, released by the next call: a CUDA user object's
// destructor runs on a driver thread that may not call CUDA, which freeing pinned memory can do.
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
  delete t;  // moved from: frees nothing
}

void release_buried() {
  std::vector<at::Tensor> dead;
  {
    std::lock_guard<std::mutex> lock(graveyard().mu);
    dead.swap(graveyard().dead);
  }
}  // freed here, on a thread that may call CUDA

// A captured copy re-reads its host source at every replay: the pinned table then lives exactly as
// long as the graph (cudaGraphRetainUserObject), not the process.
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

template <typename acc_t, typename Table>
void launch(const Table& table, const Args& args, int64_t grid, cudaStream_t stream) {
  l2_penalty_kernel<acc_t, Table><<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(table, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t, int N>
void launch_param_table(const std::vector<TensorMeta>& metas, const Args& args, int64_t grid, cudaStream_t stream) {
  ParamTable<N> table;
  std::memcpy(table.t, metas.data(), metas.size() * sizeof(TensorMeta));
  launch<acc_t>(table, args, grid, stream);
}

at::Tensor run_cuda(const Plan& plan, double weight, const at::Tensor* grad_out, bool reduce) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  if (!capturing) release_buried();

  // Chunks of a fixed byte size, smaller when the total is small so that every SM gets work.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t total_bytes = 0;
  for (const Segment& seg : plan.segments) total_bytes += seg.numel() * (seg.p.defined() ? seg.p : seg.g).element_size();
  int64_t chunk_bytes = kMaxChunkBytes;
  while (chunk_bytes > kMinChunkBytes && total_bytes < chunk_bytes * 2 * sms) chunk_bytes /= 2;

  const int ntensors = static_cast<int>(plan.segments.size());
  std::vector<TensorMeta> metas(ntensors);
  int64_t nchunks = 0;
  for (int i = 0; i < ntensors; ++i) {
    const Segment& seg = plan.segments[i];
    const at::Tensor& any = seg.p.defined() ? seg.p : seg.g;
    const int64_t per_chunk = chunk_bytes / any.element_size();
    metas[i] = {seg.p.defined() ? seg.p.const_data_ptr() : nullptr, seg.g.defined() ? seg.g.mutable_data_ptr() : nullptr,
                seg.numel(), nchunks, dtype_code(any.scalar_type()), seg.mode, seg.w};
    nchunks += (seg.numel() + per_chunk - 1) / per_chunk;
  }
  const int64_t grid = std::min<int64_t>(nchunks, static_cast<int64_t>(sms) * kBlocksPerSM);

  // Device scratch: [device table, if any][counter, padded to 16 B][double partial x nchunks]
  const bool in_params = ntensors <= kMaxParamTensors;
  const int64_t table_bytes = in_params ? 0 : ntensors * static_cast<int64_t>(sizeof(TensorMeta));
  const int64_t head_bytes = table_bytes + (reduce ? 16 : 0);
  const int64_t scratch_bytes = head_bytes + (reduce ? nchunks * static_cast<int64_t>(sizeof(double)) : 0);
  at::Tensor scratch = scratch_bytes > 0
      ? at::empty({scratch_bytes}, at::TensorOptions().dtype(at::kByte).device(plan.device))
      : at::Tensor();
  uint8_t* base = scratch_bytes > 0 ? scratch.data_ptr<uint8_t>() : nullptr;

  at::Tensor value = reduce ? at::empty({}, at::TensorOptions().dtype(plan.acc_dtype()).device(plan.device)) : at::Tensor();
  Args args{ntensors, nchunks, chunk_bytes,
            reduce ? reinterpret_cast<unsigned int*>(base + table_bytes) : nullptr,
            reduce ? reinterpret_cast<double*>(base + head_bytes) : nullptr,
            reduce ? value.data_ptr() : nullptr, weight, 2.0 * weight,
            grad_out ? grad_out->const_data_ptr() : nullptr};

  if (in_params) {
    if (reduce) C10_CUDA_CHECK(cudaMemsetAsync(args.counter, 0, sizeof(unsigned int), stream));
    auto go = [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      if (ntensors <= kSmallTable) launch_param_table<acc_t, kSmallTable>(metas, args, grid, stream);
      else launch_param_table<acc_t, kMaxParamTensors>(metas, args, grid, stream);
    };
    if (plan.any_double) go(double{}); else go(float{});
    return value;
  }

  // A long list: the table (and a zeroed counter) go to the device in one async copy from pinned
  // memory. The pinned allocator may query events, which a "global" capture forbids on torch
  // versions whose host allocator is not capture-aware: allocate in relaxed mode (RAII: restored
  // on a throw too).
  at::Tensor host;
  {
    c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    host = at::empty({head_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }
  std::memcpy(host.data_ptr(), metas.data(), table_bytes);
  std::memset(host.data_ptr<uint8_t>() + table_bytes, 0, head_bytes - table_bytes);
  scratch.narrow(0, 0, head_bytes).copy_(host, /*non_blocking=*/true);  // stream-ordered: the host
  if (capturing) tie_to_graph(std::move(host), stream);                 // block waits on an event
  const DeviceTable table{reinterpret_cast<const TensorMeta*>(base)};
  if (plan.any_double) launch<double>(table, args, grid, stream); else launch<float>(table, args, grid, stream);
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, CUDA, m) { register_kernels<run_cuda>(m, c10::DeviceType::CUDA); }

}  // namespace l2fast
