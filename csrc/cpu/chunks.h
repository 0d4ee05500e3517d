// What the CPU kernels (l2_penalty_kernel.cpp, adamw_kernel.cpp) share: the list cut into chunks,
// their partials summed over threads (one float64 partial per chunk, added in chunk order, so the
// thread count never changes the bits), the length of a float32 run, and the 0-dim value they return.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace l2fast {
namespace cpu {

// Float32 running sums drift: every add rounds, and on constant values every add rounds the same
// way, so a sum of k terms can be off by about k/2 ulps. No accumulator runs longer than kRun terms
// per lane before it is added into a float64 sum (10^8 constant values stay within 1e-6 relative).
constexpr int64_t kRun = 16;

struct Chunk {
  int64_t segment;
  int64_t begin;
  int64_t end;
};

// Each of `segments` (anything with numel()) cut into chunks of at most `chunk` elements, counted
// from its first element, in list order; `numel` becomes the total number of elements.
template <typename Segments>
std::vector<Chunk> cut_into_chunks(const Segments& segments, int64_t chunk, int64_t& numel) {
  std::vector<Chunk> chunks;
  numel = 0;
  for (size_t s = 0; s < segments.size(); ++s) {
    const int64_t n = segments[s].numel();
    numel += n;
    for (int64_t b = 0; b < n; b += chunk) chunks.push_back({static_cast<int64_t>(s), b, std::min(n, b + chunk)});
  }
  return chunks;
}

// The sum of partial_of(chunk) over `chunks`, one float64 partial per chunk added in chunk order, so
// which thread computes a chunk never changes the result. Below `serial_below` elements (or on one
// thread) on this thread; else one run of consecutive chunks of about numel / threads elements per
// thread (at::parallel_for splits a range by count, and a model's small tensors make small chunks).
template <typename PartialOf>
double sum_chunks(const std::vector<Chunk>& chunks, int64_t numel, int64_t serial_below, const PartialOf& partial_of) {
  std::vector<double> partial(chunks.size());
  auto work = [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) partial[c] = partial_of(chunks[c]);
  };
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t threads = at::get_num_threads();
  if (numel < serial_below || threads == 1 || n == 1) {
    work(0, n);
  } else {
    std::vector<int64_t> bounds{0};
    int64_t done = 0;
    for (int64_t c = 0; c < n; ++c) {
      done += chunks[c].end - chunks[c].begin;
      if (done * threads >= numel * static_cast<int64_t>(bounds.size()) && c + 1 < n) bounds.push_back(c + 1);
    }
    bounds.push_back(n);
    at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) work(bounds[t], bounds[t + 1]);
    });
  }
  double total = 0.0;
  for (double x : partial) total += x;
  return total;
}

// The 0-dim result: `total` as float64, or rounded once to float32. Allocated and written directly:
// at::scalar_tensor's fill_ builds a TensorIterator, which costs as much as a tenth of the seed
// MLP's whole call.
inline at::Tensor value_tensor(double total, bool as_double) {
  at::Tensor value = at::detail::empty_cpu({}, as_double ? at::kDouble : at::kFloat);
  if (as_double) {
    *value.mutable_data_ptr<double>() = total;
  } else {
    *value.mutable_data_ptr<float>() = static_cast<float>(total);
  }
  return value;
}

}  // namespace cpu
}  // namespace l2fast
