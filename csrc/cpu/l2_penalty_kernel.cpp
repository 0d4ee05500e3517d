// CPU kernel: the whole tensor list cut into equal chunks, chunks spread over threads, each chunk
// read once (sum of squares and grad update together). Partials land in a per-chunk slot and are
// added in chunk order, so the result is bit-identical whatever the thread count. Chunks and lanes
// are counted from each tensor's first element (unaligned loads), so the bits do not depend on
// where the tensors sit in memory either.
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "chunks.h"
#include "l2_penalty.h"

namespace l2fast {
namespace {

constexpr int64_t kChunk = 16384;     // elements per task: a few L1-sized strips, cheap to schedule
constexpr int64_t kSerialBelow = 1 << 18;  // elements: below ~1 MB a thread fork costs more than it saves

using cpu::Chunk;
using cpu::kRun;

// float/double with an accumulator of the same type: at::vec, four independent accumulators, each
// lane kRun terms long, then added into a double.
template <typename T, GradMode MODE>
double chunk_vectorized(const T* p, T* g, int64_t n, T scale) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec s(scale);
  auto step = [&](int64_t j, Vec& a) {
    Vec x = Vec::loadu(p + j);
    a = at::vec::fmadd(x, x, a);
    if constexpr (MODE == GradMode::kAccumulate) at::vec::fmadd(x, s, Vec::loadu(g + j)).store(g + j);
    if constexpr (MODE == GradMode::kWrite) (x * s).store(g + j);
  };
  auto add = [](Vec& a, Vec& b) { return a + b; };
  double sum = 0.0;
  int64_t i = 0;
  while (i + 4 * W <= n) {
    Vec acc[4] = {Vec(T(0)), Vec(T(0)), Vec(T(0)), Vec(T(0))};
    for (int64_t r = 0; r < kRun && i + 4 * W <= n; ++r, i += 4 * W) {
      step(i, acc[0]);
      step(i + W, acc[1]);
      step(i + 2 * W, acc[2]);
      step(i + 3 * W, acc[3]);
    }
    Vec total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    sum += static_cast<double>(at::vec::vec_reduce_all<T>(add, total));
  }
  if (i + W <= n) {  // at most 3 vectors left
    Vec acc(T(0));
    for (; i + W <= n; i += W) step(i, acc);
    sum += static_cast<double>(at::vec::vec_reduce_all<T>(add, acc));
  }
  T tail = 0;  // fewer than W elements
  for (; i < n; ++i) {
    T x = p[i];
    tail += x * x;
    if constexpr (MODE == GradMode::kAccumulate) g[i] += scale * x;
    if constexpr (MODE == GradMode::kWrite) g[i] = scale * x;
  }
  return sum + static_cast<double>(tail);
}

// float16/bfloat16, or any input accumulated in float64: convert element-wise, four accumulators
// of kRun terms each, then added into a double.
template <typename T, typename acc_t, GradMode MODE>
double chunk_converting(const T* p, T* g, int64_t n, acc_t scale) {
  double sum = 0.0;
  for (int64_t start = 0; start < n; start += 4 * kRun) {
    const int64_t end = std::min(n, start + 4 * kRun);
    acc_t acc[4] = {0, 0, 0, 0};
    for (int64_t i = start; i < end; ++i) {
      acc_t x = static_cast<acc_t>(p[i]);
      acc[i & 3] += x * x;
      if constexpr (MODE == GradMode::kAccumulate) g[i] = static_cast<T>(static_cast<acc_t>(g[i]) + scale * x);
      if constexpr (MODE == GradMode::kWrite) g[i] = static_cast<T>(scale * x);
    }
    sum += static_cast<double>((acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
  return sum;
}

template <typename T, typename acc_t, GradMode MODE>
double chunk_sum(const T* p, T* g, int64_t n, acc_t scale) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return chunk_vectorized<T, MODE>(p, g, n, scale);
  } else {
    return chunk_converting<T, acc_t, MODE>(p, g, n, scale);
  }
}

template <typename acc_t>
double run_chunk(const Segment& seg, int64_t begin, int64_t end, acc_t scale) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, seg.g.defined() ? seg.g.scalar_type() : seg.p.scalar_type(), "l2fast_cpu", [&] {
    scalar_t* g = seg.g.defined() ? seg.g.mutable_data_ptr<scalar_t>() + begin : nullptr;
    if (seg.mode == GradMode::kZero) {
      std::fill(g, g + (end - begin), scalar_t(0));
      return 0.0;
    }
    const scalar_t* p = seg.p.const_data_ptr<scalar_t>() + begin;
    switch (seg.mode) {
      case GradMode::kAccumulate:
        return chunk_sum<scalar_t, acc_t, GradMode::kAccumulate>(p, g, end - begin, scale);
      case GradMode::kWrite:
        return chunk_sum<scalar_t, acc_t, GradMode::kWrite>(p, g, end - begin, scale);
      default:
        return chunk_sum<scalar_t, acc_t, GradMode::kNone>(p, g, end - begin, scale);
    }
  });
}

// A scale that a float32 multiply takes as it is: not beyond float32's range, not subnormal.
bool fits_float(double s) {
  return s == 0.0 || (std::abs(s) >= std::numeric_limits<float>::min() && std::abs(s) <= std::numeric_limits<float>::max());
}

// One chunk's sum of squares, its grads written. A float32-accumulating call takes a grad scale it
// cannot hold (beyond float32's range, or subnormal) in float64 for that tensor, so that
// 0 * scale stays 0 and a product float32 can hold comes out right.
template <typename acc_t>
double chunk_partial(const Segment& seg, int64_t begin, int64_t end, double scale) {
  if constexpr (!std::is_same_v<acc_t, double>) {
    if (seg.mode != GradMode::kNone && !fits_float(scale)) return run_chunk<double>(seg, begin, end, scale);
  }
  return run_chunk<acc_t>(seg, begin, end, static_cast<acc_t>(scale));
}

template <typename acc_t>
double run_chunks(const Plan& plan, const std::vector<Chunk>& chunks, int64_t numel, double scale) {
  return cpu::sum_chunks(chunks, numel, kSerialBelow, [&](const Chunk& ch) {
    const Segment& seg = plan.segments[ch.segment];
    return seg.w * chunk_partial<acc_t>(seg, ch.begin, ch.end, scale * seg.w);
  });
}

at::Tensor run_cpu(const Plan& plan, double weight, const at::Tensor* grad_out, bool reduce) {
  int64_t numel;
  const std::vector<Chunk> chunks = cpu::cut_into_chunks(plan.segments, kChunk, numel);
  const double scale = 2.0 * weight * (grad_out ? grad_out->item<double>() : 1.0);
  const double total = plan.any_double ? run_chunks<double>(plan, chunks, numel, scale)
                                     : run_chunks<float>(plan, chunks, numel, scale);
  return reduce ? cpu::value_tensor(weight * total, plan.any_double) : at::Tensor();
}

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, CPU, m) { register_kernels<run_cpu>(m, c10::DeviceType::CPU); }

}  // namespace l2fast
