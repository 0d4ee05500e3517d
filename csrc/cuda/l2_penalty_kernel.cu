// CUDA kernel: ONE launch per call for any number of tensors.
//
// apex's multi_tensor_l2norm and ATen's MultiTensorApply pass a few tensor pointers per launch, so
// a long list takes several launches, and the norm needs a second "cleanup" launch. Here the whole
// per-tensor table travels with the launch (multi_tensor.cuh: a kernel parameter up to 672
// tensors, a device table beyond), blocks walk chunks of a fixed byte size, each chunk's partial is
// stored, and the last block adds the partials in a fixed order.
//
// What the bits depend on: the values, each tensor's memory layout (strides) and the list (its
// dtypes and sizes set the chunks). Not the addresses (every element goes to the same thread and
// accumulator whether 16-byte loads are possible or not), not the GPU (chunks are sized from the
// list alone; the grid decides who computes a chunk, not how), not the stream.
#include <ATen/cuda/CUDAContext.h>

#include <cfloat>

#include "l2_penalty.h"
#include "multi_tensor.cuh"

namespace l2fast {
namespace {

using mt::kThreads;
using mt::kBF16;
using mt::kF16;
using mt::kF64;

constexpr int kUnroll = 4;  // 16-byte loads in flight per thread

struct TensorMeta {
  const void* p;  // null for GradMode::kZero
  void* g;        // null for GradMode::kNone
  int64_t numel;
  int64_t first_chunk;
  int32_t dtype;
  GradMode mode;
  double w;  // the tensor's weight multiplier; 48 bytes, no padding (device tables compare bytes)
};
static_assert(sizeof(TensorMeta) == 48, "TensorMeta must have no padding");

struct Args {
  int ntensors;
  int64_t nchunks;
  int64_t chunk_bytes;
  mt::Reduction red;     // reduce only
  void* out;             // acc_t; null when not reducing (backward: grads only)
  double weight;
  double scale;          // 2 * weight
  const void* grad_out;  // acc_t, or null
};

static_assert(mt::max_param_tensors<TensorMeta, Args>() == 672, "the README says 672");

__device__ __forceinline__ float mul_add(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double mul_add(double a, double b, double c) { return __fma_rn(a, b, c); }

// A scale that a float32 multiply takes as it is: not beyond float32's range, not subnormal.
__device__ __forceinline__ bool fits_float(double s) { return s == 0.0 || (fabs(s) >= FLT_MIN && fabs(s) <= FLT_MAX); }

// One element: its square into `acc`, its grad written as MODE says.
template <GradMode MODE, typename T, typename acc_t>
__device__ __forceinline__ void visit(T x, T& g, acc_t scale, acc_t& acc) {
  const acc_t v = static_cast<acc_t>(x);
  acc = mul_add(v, v, acc);
  if constexpr (MODE == GradMode::kAccumulate) g = static_cast<T>(mul_add(scale, v, static_cast<acc_t>(g)));
  if constexpr (MODE == GradMode::kWrite) g = static_cast<T>(scale * v);
}

// One chunk of one tensor, n elements. Elements come in groups of V (16 bytes); thread t takes
// groups t, t + kThreads, ... in order and keeps one accumulator per position in the group, so a
// float32 running sum is at most 16 terms long (a 64 KB chunk) and an element's accumulator does
// not depend on the pointer: 16-byte loads when both pointers allow, element loads otherwise,
// same bits. Not inlined: each (MODE, T, acc_t) is compiled once and shared by every table size.
template <GradMode MODE, typename T, typename acc_t>
__device__ __noinline__ acc_t chunk_sum(const T* __restrict__ p, T* __restrict__ g, int64_t n, acc_t scale) {
  if constexpr (MODE == GradMode::kZero) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) g[i] = T(0);
    return acc_t(0);
  } else {
    constexpr bool kWrites = MODE != GradMode::kNone;
    constexpr int V = 16 / sizeof(T);
    using P = mt::Pack<T, V>;
    acc_t acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = acc_t(0);
    const int64_t groups = n / V;
    int64_t q = threadIdx.x;
    if (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (!kWrites || reinterpret_cast<uintptr_t>(g) % 16 == 0)) {
      const P* pv = reinterpret_cast<const P*>(p);
      P* gv = reinterpret_cast<P*>(g);
      for (; q + (kUnroll - 1) * kThreads < groups; q += kUnroll * kThreads) {
        P x[kUnroll], y[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) x[u] = pv[q + u * kThreads];
        if constexpr (MODE == GradMode::kAccumulate) {
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) y[u] = gv[q + u * kThreads];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int k = 0; k < V; ++k) visit<MODE>(x[u].v[k], y[u].v[k], scale, acc[k]);
          if constexpr (kWrites) gv[q + u * kThreads] = y[u];
        }
      }
      for (; q < groups; q += kThreads) {
        P x = pv[q], y;
        if constexpr (MODE == GradMode::kAccumulate) y = gv[q];
#pragma unroll
        for (int k = 0; k < V; ++k) visit<MODE>(x.v[k], y.v[k], scale, acc[k]);
        if constexpr (kWrites) gv[q] = y;
      }
    } else {
      T unused;
      for (; q < groups; q += kThreads) {
#pragma unroll
        for (int k = 0; k < V; ++k) visit<MODE>(p[q * V + k], kWrites ? g[q * V + k] : unused, scale, acc[k]);
      }
    }
    // The last, partial group goes to the thread that would have taken group `groups`, last in its order.
    if (threadIdx.x == groups % kThreads) {
      T unused;
      for (int64_t i = groups * V; i < n; ++i) {
        visit<MODE>(p[i], kWrites ? g[i] : unused, scale, acc[i - groups * V]);
      }
    }
    return mt::sum_lanes(acc);
  }
}

// One chunk of one tensor of type T, summed in acc_t: returns the block's sum (thread 0) when reducing.
template <typename T, typename acc_t>
__device__ double run_chunk(const TensorMeta& m, int64_t begin, int64_t n, acc_t scale, bool reduce) {
  const T* p = m.p ? static_cast<const T*>(m.p) + begin : nullptr;
  T* g = m.g ? static_cast<T*>(m.g) + begin : nullptr;
  acc_t acc;
  switch (m.mode) {
    case GradMode::kAccumulate: acc = chunk_sum<GradMode::kAccumulate>(p, g, n, scale); break;
    case GradMode::kWrite: acc = chunk_sum<GradMode::kWrite>(p, g, n, scale); break;
    case GradMode::kZero: acc = chunk_sum<GradMode::kZero>(p, g, n, scale); break;
    default: acc = chunk_sum<GradMode::kNone>(p, g, n, scale);
  }
  return reduce ? static_cast<double>(mt::block_sum(acc)) : 0.0;
}

// A float32-accumulating kernel takes a grad scale it cannot hold (beyond float32's range, or
// subnormal) in float64 for that tensor, so that 0 * scale stays 0 and a product float32 can hold
// comes out right.
template <typename T, typename acc_t>
__device__ double typed_chunk(const TensorMeta& m, int64_t begin, int64_t n, double scale, bool reduce) {
  if constexpr (!std::is_same_v<acc_t, double>) {
    if (m.mode != GradMode::kNone && !fits_float(scale)) return run_chunk<T, double>(m, begin, n, scale, reduce);
  }
  return run_chunk<T, acc_t>(m, begin, n, static_cast<acc_t>(scale), reduce);
}

template <typename acc_t, typename Table>
__global__ void __launch_bounds__(kThreads)
l2_penalty_kernel(const __grid_constant__ Table table, const __grid_constant__ Args args) {
  const bool reduce = args.out != nullptr;
  const double grad_scale =
      args.scale * (args.grad_out ? static_cast<double>(*static_cast<const acc_t*>(args.grad_out)) : 1.0);
  mt::for_each_chunk(table, args.ntensors, args.nchunks, [&](const TensorMeta& m, int64_t local, int64_t chunk) {
    const int64_t per_chunk = args.chunk_bytes / mt::elem_bytes(m.dtype);
    const int64_t begin = local * per_chunk;
    const int64_t n = min(per_chunk, m.numel - begin);
    const double s = m.w * grad_scale;
    double sum;
    switch (m.dtype) {
      case kF16: sum = typed_chunk<at::Half, acc_t>(m, begin, n, s, reduce); break;
      case kBF16: sum = typed_chunk<at::BFloat16, acc_t>(m, begin, n, s, reduce); break;
      case kF64:
        if constexpr (std::is_same_v<acc_t, double>) {  // a float64 tensor makes the whole call float64
          sum = typed_chunk<double, acc_t>(m, begin, n, s, reduce);
          break;
        }
        [[fallthrough]];
      default: sum = typed_chunk<float, acc_t>(m, begin, n, s, reduce);
    }
    if (reduce && threadIdx.x == 0) args.red.partials[chunk] = m.w * sum;
  });
  double total;
  if (reduce && mt::last_block_total(args.red, args.nchunks, total) && threadIdx.x == 0) {
    *static_cast<acc_t*>(args.out) = static_cast<acc_t>(args.weight * total);
  }
}

at::Tensor run_cuda(const Plan& plan, double weight, const at::Tensor* grad_out, bool reduce) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;

  int64_t total_bytes = 0;
  for (const Segment& seg : plan.segments) total_bytes += seg.numel() * (seg.p.defined() ? seg.p : seg.g).element_size();
  mt::Chunks chunks{mt::chunk_bytes_for(total_bytes)};

  const int ntensors = static_cast<int>(plan.segments.size());
  std::vector<TensorMeta> metas(ntensors);
  for (int i = 0; i < ntensors; ++i) {
    const Segment& seg = plan.segments[i];
    const at::Tensor& any = seg.p.defined() ? seg.p : seg.g;
    metas[i] = {seg.p.defined() ? seg.p.const_data_ptr() : nullptr, seg.g.defined() ? seg.g.mutable_data_ptr() : nullptr,
                seg.numel(), chunks.add(seg.numel(), any.element_size()), mt::dtype_code(any.scalar_type()), seg.mode,
                seg.w};
  }

  at::Tensor value, scratch;
  Args args{ntensors, chunks.count, chunks.chunk_bytes, {nullptr, nullptr}, nullptr, weight, 2.0 * weight,
            grad_out ? grad_out->const_data_ptr() : nullptr};
  if (reduce) {
    value = at::empty({}, at::TensorOptions().dtype(plan.acc_dtype()).device(plan.device));
    args.red = mt::reduction(chunks.count, plan.device, stream, scratch);
    args.out = value.data_ptr();
  }
  mt::with_table<TensorMeta, Args>(metas, stream, capturing, [&](const auto& table) {
    using Table = std::decay_t<decltype(table)>;
    if (plan.any_double) {
      mt::launch<&l2_penalty_kernel<double, Table>>(table, args, args.nchunks, stream);
    } else {
      mt::launch<&l2_penalty_kernel<float, Table>>(table, args, args.nchunks, stream);
    }
  });
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, CUDA, m) { register_kernels<run_cuda>(m, c10::DeviceType::CUDA); }

}  // namespace l2fast
