// Host side of the multi-tensor machinery (multi_tensor.cuh): where a long list's table lives on
// the device, and the counters the self-test reads (torch.ops.l2fast_cuda.*, multi_tensor.cu).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace l2fast {
namespace mt {

// A device copy of `bytes[0, n)` that work queued next on `stream` may read; `hold` keeps it alive
// until that work is queued.
//  - Outside capture: cached per device while the bytes are unchanged (a training loop passes the
//    same list every step), so a repeated call copies nothing; a new table is copied from torch's
//    pinned memory, stream-ordered. Another stream waits on the copy's event: no host sync.
//  - Under capture: the copy's host source is re-read at every replay, so it must live as long as
//    the graph. It comes from a pool of cudaHostAlloc buffers (not torch's host allocator, which
//    never reuses a block recorded during capture); the graph's user object returns it to the pool
//    when the graph is destroyed, and later captures reuse it: the pool is bounded by the tables of
//    the graphs alive at once.
const void* upload_table(const void* bytes, int64_t n, cudaStream_t stream, bool capturing, at::Tensor& hold);

// Bytes of pinned memory in the capture pool: all of them (held by live graphs, or free for the
// next capture), or only those held by graphs (`in_use`).
int64_t pinned_table_bytes(bool in_use);

// At most this many blocks per launch (0: no limit; the default). For tests: the result must not
// depend on the grid. Returns the previous limit.
int64_t set_grid_limit(int64_t blocks);
int64_t grid_limit();

}  // namespace mt
}  // namespace l2fast
