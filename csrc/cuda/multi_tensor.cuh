// One-launch multi-tensor kernels: the machinery shared by l2fast's CUDA kernels.
//
//  - A per-tensor table (`Meta`, one entry per tensor, in list order) travels as a __grid_constant__
//    kernel parameter in one of a few sizes (32, 64, 128, 256 or as many as 32 KB of parameters
//    hold), so a short list pays for the table it has; longer lists read a device table
//    (multi_tensor.h: cached while its bytes are unchanged, tied to the graph under capture).
//  - Work is cut into chunks of a fixed byte size, chosen from the list's total bytes alone (never
//    from the device), so chunk boundaries are the same on every GPU; `Meta::first_chunk` is the
//    global index of a tensor's first chunk.
//  - Each block walks one contiguous range of chunks, tensors in list order (one binary search
//    per block), so a long list costs no search per chunk.
//  - Reductions are deterministic: one double partial per chunk, and the last block to finish adds
//    them in a fixed order that depends on the number of chunks only: no float atomics, and the
//    grid (which depends on the device) decides who computes a chunk, never the result.
//
// A kernel using it: `template <typename Table> __global__ void k(const __grid_constant__ Table t,
// const __grid_constant__ Args a)` calling for_each_chunk(t, ...) and, to reduce, last_block_total;
// the host counts chunks with Chunks, allocates the partials with reduction(), and calls
// with_table(metas, ...) and launch<k<Table>>(). Used by l2_penalty_kernel.cu and adamw_kernel.cu.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda/atomic>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "multi_tensor.h"

#if !defined(CUDART_VERSION) || CUDART_VERSION < 12010
#error "l2fast's CUDA kernels need CUDA >= 12.1 (32 KB kernel parameters)"
#endif

namespace l2fast {
namespace mt {

constexpr int kThreads = 256;

// A tensor's element type, as the per-tensor records carry it.
enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return kF32;
  }
}

__host__ __device__ __forceinline__ int elem_bytes(int32_t dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

// N elements loaded or stored with one 16-byte access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// --- tables ------------------------------------------------------------------------------------

template <typename Meta, int N>
struct ParamTable {
  Meta t[N];
  __device__ const Meta& operator[](int i) const { return t[i]; }
};

template <typename Meta>
struct DeviceTable {
  const Meta* t;
  __device__ const Meta& operator[](int i) const { return t[i]; }
};

constexpr size_t kParamBytes = 32764;  // kernel parameter space from CUDA 12.1 on Volta and newer

// The most tensors whose table fits the parameter space beside Args.
template <typename Meta, typename Args>
constexpr int max_param_tensors() {
  return static_cast<int>((kParamBytes - sizeof(Args)) / sizeof(Meta)) / 16 * 16;
}

template <typename Meta, int N>
ParamTable<Meta, N> param_table(const std::vector<Meta>& metas) {
  ParamTable<Meta, N> table;
  std::memcpy(table.t, metas.data(), metas.size() * sizeof(Meta));
  return table;
}

// Calls launch(table) with the smallest table type that holds `metas`: a ParamTable of 32, 64,
// 128, 256 or max_param_tensors entries, else a DeviceTable (its upload queued on `stream`). Meta
// must have no padding: a device table is reused while its bytes compare equal.
template <typename Meta, typename Args, typename Launch>
void with_table(const std::vector<Meta>& metas, cudaStream_t stream, bool capturing, Launch&& launch) {
  constexpr int kMax = max_param_tensors<Meta, Args>();
  static_assert(kMax >= 256, "Meta too large for the table sizes");
  const size_t n = metas.size();
  if (n <= 32) return launch(param_table<Meta, 32>(metas));
  if (n <= 64) return launch(param_table<Meta, 64>(metas));
  if (n <= 128) return launch(param_table<Meta, 128>(metas));
  if (n <= 256) return launch(param_table<Meta, 256>(metas));
  if (n <= static_cast<size_t>(kMax)) return launch(param_table<Meta, kMax>(metas));
  at::Tensor hold;  // keeps the device table alive until the launch is queued
  const void* t = upload_table(metas.data(), static_cast<int64_t>(n * sizeof(Meta)), stream, capturing, hold);
  launch(DeviceTable<Meta>{static_cast<const Meta*>(t)});
}

// --- chunks and the grid ---------------------------------------------------------------------------

constexpr int64_t kMaxChunkBytes = 64 << 10;  // 16 loads of 16 bytes per thread
constexpr int64_t kMinChunkBytes = 4 << 10;   // one load per thread
constexpr int64_t kTargetChunks = 512;        // about 4 blocks on each SM of a 132-SM GPU

// Chunk size for a list of `total_bytes`: 64 KB, halved down to 4 KB while there would be fewer
// than kTargetChunks chunks, so a small list still spreads over the GPU. A function of the list
// only: the same chunks (and so the same bits) on every device.
inline int64_t chunk_bytes_for(int64_t total_bytes) {
  int64_t chunk = kMaxChunkBytes;
  while (chunk > kMinChunkBytes && total_bytes < chunk * kTargetChunks) chunk /= 2;
  return chunk;
}

// The chunks of a list, counted tensor by tensor in list order: add() returns a tensor's first chunk.
struct Chunks {
  int64_t chunk_bytes;  // chunk_bytes_for(the list's total bytes)
  int64_t count = 0;

  int64_t add(int64_t numel, int64_t element_size) {
    const int64_t first = count, per_chunk = chunk_bytes / element_size;
    count += (numel + per_chunk - 1) / per_chunk;
    return first;
  }
};

// Blocks of `kernel` resident per SM at kThreads threads, asked once per device.
template <auto kernel>
int blocks_per_sm(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  std::atomic<int>& slot = cache.at(static_cast<size_t>(device));
  int blocks = slot.load(std::memory_order_relaxed);
  if (blocks == 0) {
    // May load the kernel's module: not a stream operation, allowed while a stream captures.
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
    blocks = std::max(blocks, 1);
    slot.store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// One wave of resident blocks (at most one block per chunk), or fewer under set_grid_limit.
template <auto kernel>
int64_t grid_for(int64_t nchunks) {
  const int device = c10::cuda::current_device();
  const int64_t sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  int64_t grid = std::min<int64_t>(nchunks, sms * blocks_per_sm<kernel>(device));
  const int64_t limit = grid_limit();
  if (limit > 0) grid = std::min(grid, limit);
  return std::max<int64_t>(grid, 1);
}

// Launches `kernel` (one instantiation per table type) over grid_for<kernel>(nchunks) blocks.
template <auto kernel, typename Table, typename Args>
void launch(const Table& table, const Args& args, int64_t nchunks, cudaStream_t stream) {
  const int64_t grid = grid_for<kernel>(nchunks);
  kernel<<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(table, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --- device side -----------------------------------------------------------------------------------

// The tensor holding chunk c: the last whose first_chunk <= c. Every thread searches alike.
template <typename Table>
__device__ int tensor_of(const Table& table, int ntensors, int64_t c) {
  int lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].first_chunk <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// f(meta, chunk index within its tensor, global chunk index) for this block's chunks: the range
// [b·n/g, (b+1)·n/g), in order. Block-uniform: f may use __syncthreads.
template <typename Table, typename F>
__device__ void for_each_chunk(const Table& table, int ntensors, int64_t nchunks, F&& f) {
  const int64_t first = blockIdx.x * nchunks / gridDim.x;
  const int64_t last = (blockIdx.x + 1) * nchunks / gridDim.x;
  if (first >= last) return;
  int t = tensor_of(table, ntensors, first);
  for (int64_t c = first; c < last; ++c) {
    while (t + 1 < ntensors && table[t + 1].first_chunk <= c) ++t;
    const auto m = table[t];
    f(m, c - m.first_chunk, c);
  }
}

// The sum of a thread's V accumulators, as a pairwise tree (V a power of two).
template <int V, typename T>
__device__ __forceinline__ T sum_lanes(T (&acc)[V]) {
#pragma unroll
  for (int s = V / 2; s > 0; s /= 2) {
#pragma unroll
    for (int k = 0; k < s; ++k) acc[k] += acc[k + s];
  }
  return acc[0];
}

// Sum over the block in a fixed order (shuffle tree, then the warps' sums); valid in thread 0.
template <typename T>
__device__ T block_sum(T v) {
  static_assert(kThreads % 32 == 0 && kThreads / 32 <= 32, "one warp sums the warps");
  __shared__ T warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : T(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // warp_sums is reused by the next call
  return v;
}

// Where a reducing kernel keeps its per-chunk partials; `counter` is zero at launch.
struct Reduction {
  unsigned int* counter;
  double* partials;  // one per chunk, written by the block that computed it
};

// Device scratch for a reduction over `nchunks` chunks, held by `hold`: [counter, padded to 16 B]
// [double partial x nchunks], the counter zeroed on `stream` before the launch.
inline Reduction reduction(int64_t nchunks, c10::Device device, cudaStream_t stream, at::Tensor& hold) {
  hold = at::empty({16 + nchunks * static_cast<int64_t>(sizeof(double))}, at::TensorOptions().dtype(at::kByte).device(device));
  uint8_t* base = hold.data_ptr<uint8_t>();
  const Reduction r{reinterpret_cast<unsigned int*>(base), reinterpret_cast<double*>(base + 16)};
  C10_CUDA_CHECK(cudaMemsetAsync(r.counter, 0, sizeof(unsigned int), stream));
  return r;
}

// Called by every block once all its partials are stored. Returns true in the last block to
// arrive, with the sum of every chunk's partial in `total` (valid in thread 0): each thread adds
// chunks t, t + kThreads, ... in order, then block_sum. The order depends on nchunks alone.
__device__ inline bool last_block_total(const Reduction& r, int64_t nchunks, double& total) {
  __shared__ bool is_last;
  if (threadIdx.x == 0) {  // release this block's partials; the last block acquires everyone's
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> done(*r.counter);
    is_last = done.fetch_add(1u, cuda::memory_order_acq_rel) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return false;
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < nchunks; c += kThreads) sum += __ldcg(r.partials + c);
  total = block_sum(sum);
  return true;
}

}  // namespace mt
}  // namespace l2fast
