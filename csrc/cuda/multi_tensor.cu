// Host side of the multi-tensor machinery: long lists' device tables (cached outside capture, from
// a pinned pool tied to the graph under capture), the grid limit for tests, and the counters the
// self-test reads through torch.ops.l2fast_cuda.
#include "multi_tensor.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace l2fast {
namespace mt {
namespace {

// --- the capture pool ------------------------------------------------------------------------------

struct PinnedBlock {
  void* ptr;
  size_t bytes;
};

// Pinned buffers for captured tables, in power-of-two sizes from 64 KiB. give_back runs in a CUDA
// user object's destructor, on a driver thread that must not call CUDA: it only takes the mutex,
// and no thread calls CUDA while holding it.
class PinnedPool {
 public:
  PinnedBlock take(size_t n) {
    size_t size = 64 << 10;
    while (size < n) size *= 2;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        PinnedBlock b{it->second, size};
        free_.erase(it);
        return b;
      }
    }
    void* ptr = nullptr;
    {
      // A stream capturing in "global" mode forbids an allocation that may synchronize: this one
      // is not a stream operation, so let it through for this thread.
      const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      C10_CUDA_CHECK(cudaHostAlloc(&ptr, size, cudaHostAllocDefault));
    }
    bytes_.fetch_add(static_cast<int64_t>(size), std::memory_order_relaxed);
    return {ptr, size};
  }

  void give_back(PinnedBlock b) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace(b.bytes, b.ptr);
  }

  // All the pool's bytes, or those held by graphs (not in the free list).
  int64_t bytes(bool in_use) {
    int64_t total = bytes_.load(std::memory_order_relaxed);
    if (!in_use) return total;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [size, ptr] : free_) total -= static_cast<int64_t>(size);
    return total;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  std::atomic<int64_t> bytes_{0};
};

PinnedPool& pool() {
  static auto* p = new PinnedPool();  // never destroyed: a graph may outlive static destructors
  return *p;
}

void return_to_pool(void* block) {
  auto* b = static_cast<PinnedBlock*>(block);
  pool().give_back(*b);
  delete b;
}

// The block now belongs to the graph `stream` is capturing: returned to the pool once the graph
// (and every executable instantiated from it) is destroyed and its last replay has finished.
void tie_to_graph(PinnedBlock block, cudaStream_t stream) {
  cudaStreamCaptureStatus status;
  cudaGraph_t graph = nullptr;
#if CUDART_VERSION >= 13000
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph));
#else
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo_v2(stream, &status, nullptr, &graph, nullptr, nullptr));
#endif
  TORCH_INTERNAL_ASSERT(status == cudaStreamCaptureStatusActive && graph != nullptr);
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);  // not stream work
  auto* keep = new PinnedBlock(block);
  cudaUserObject_t object;
  const cudaError_t err = cudaUserObjectCreate(&object, keep, return_to_pool, 1, cudaUserObjectNoDestructorSync);
  if (err != cudaSuccess) return_to_pool(keep);
  C10_CUDA_CHECK(err);
  C10_CUDA_CHECK(cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove));
}

const void* upload_captured(const void* bytes, int64_t n, cudaStream_t stream, at::Tensor& hold) {
  hold = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
  const PinnedBlock block = pool().take(static_cast<size_t>(n));
  std::memcpy(block.ptr, bytes, static_cast<size_t>(n));
  tie_to_graph(block, stream);
  C10_CUDA_CHECK(cudaMemcpyAsync(hold.data_ptr(), block.ptr, static_cast<size_t>(n), cudaMemcpyHostToDevice, stream));
  return hold.data_ptr();
}

// --- the device-table cache --------------------------------------------------------------------------

constexpr size_t kCachedPerDevice = 4;  // a training loop's lists: the penalty's, an optimizer's, ...

struct CachedTable {
  int device = -1;
  std::vector<uint8_t> bytes;
  at::Tensor table;  // on `device`, allocated on `stream`
  cudaStream_t stream = nullptr;
  cudaEvent_t copied = nullptr;  // recorded on `stream` after the copy
  uint64_t last_use = 0;
};

struct TableCache {
  std::mutex mu;
  std::vector<CachedTable> entries;
  uint64_t clock = 0;
};

TableCache& cache() {
  static auto* c = new TableCache();  // never destroyed: its tensors must not be freed after CUDA shuts down
  return *c;
}

const void* upload_cached(const void* bytes, int64_t n, cudaStream_t stream, at::Tensor& hold) {
  const int device = c10::cuda::current_device();
  TableCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  CachedTable* victim = nullptr;
  size_t on_device = 0;
  for (CachedTable& e : c.entries) {
    if (e.device != device) continue;
    ++on_device;
    if (static_cast<int64_t>(e.bytes.size()) == n && std::memcmp(e.bytes.data(), bytes, n) == 0) {
      e.last_use = ++c.clock;
      if (e.stream != stream) {  // another stream: wait for the copy, and keep the table until this one is done too
        C10_CUDA_CHECK(cudaStreamWaitEvent(stream, e.copied, 0));
        c10::cuda::CUDACachingAllocator::recordStream(e.table.storage().data_ptr(),
                                                      c10::cuda::getStreamFromExternal(stream, device));
      }
      hold = e.table;
      return hold.data_ptr();
    }
    if (victim == nullptr || e.last_use < victim->last_use) victim = &e;
  }
  if (on_device < kCachedPerDevice) {
    c.entries.emplace_back();
    victim = &c.entries.back();
  }
  // Pinned source from torch's host allocator, which reuses a block once its copy has run.
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes, static_cast<size_t>(n));
  at::Tensor table = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  table.copy_(host, /*non_blocking=*/true);  // on the current stream, which is `stream`
  if (victim->copied == nullptr) C10_CUDA_CHECK(cudaEventCreateWithFlags(&victim->copied, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(victim->copied, stream));
  victim->device = device;
  victim->bytes.assign(static_cast<const uint8_t*>(bytes), static_cast<const uint8_t*>(bytes) + n);
  victim->table = table;
  victim->stream = stream;
  victim->last_use = ++c.clock;
  hold = std::move(table);
  return hold.data_ptr();
}

std::atomic<int64_t> g_grid_limit{0};

}  // namespace

const void* upload_table(const void* bytes, int64_t n, cudaStream_t stream, bool capturing, at::Tensor& hold) {
  TORCH_INTERNAL_ASSERT(stream == at::cuda::getCurrentCUDAStream().stream(), "upload_table: not the current stream");
  return capturing ? upload_captured(bytes, n, stream, hold) : upload_cached(bytes, n, stream, hold);
}

int64_t pinned_table_bytes(bool in_use) { return pool().bytes(in_use); }

int64_t set_grid_limit(int64_t blocks) {
  TORCH_CHECK_VALUE(blocks >= 0, "l2fast_cuda.set_grid_limit: blocks is ", blocks, "; expected 0 (no limit) or more");
  return g_grid_limit.exchange(blocks);
}

int64_t grid_limit() { return g_grid_limit.load(std::memory_order_relaxed); }

}  // namespace mt
}  // namespace l2fast

// Internal counters and knobs for l2fast's tests and self-test (not part of the API).
TORCH_LIBRARY(l2fast_cuda, m) {
  m.def("pinned_table_bytes(bool in_use=False) -> int", &l2fast::mt::pinned_table_bytes);
  m.def("set_grid_limit(int blocks) -> int", &l2fast::mt::set_grid_limit);
}
