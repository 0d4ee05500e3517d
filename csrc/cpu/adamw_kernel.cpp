// CPU kernel of l2fast::adamw_: every param cut into chunks, chunks spread over threads, each element
// read and written once: g' = g (unscaled, negated with maximize) + 2·w·p, torch's AdamW update with
// g' in torch's order of operations (aten/src/ATen/native/cpu/FusedAdamKernel.cpp: the same
// at::vec expressions, so the same bits), and p² of the old p added to the chunk's penalty partial.
// Partials are added in chunk order in float64: bit-identical whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "adamw.h"
#include "chunks.h"

namespace l2fast {
namespace {

constexpr int64_t kChunk = 8192;           // elements per partial: ~10x l2_penalty_'s work per element
constexpr int64_t kSerialBelow = 1 << 15;  // elements: below this a thread fork costs more than it saves
using cpu::Chunk;

enum class Grad { kNone, kPlain, kScaled };  // no data grad (penalty only); read; unscaled and written back

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One tensor's constants, computed in double from its group and step as torch's kernel does, then
// rounded once to the type the arithmetic runs in.
template <typename O>
struct Consts {
  using V = at::vec::Vectorized<O>;
  V lerp_coeff, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, decay, l2_scale, grad_scale;
  bool lerp_small, maximize, decays, l2;

  Consts(const AdamWGroup& g, double step, const AdamWPlan& plan) {
    const double bias_correction1 = 1 - std::pow(g.beta1, step);
    const double bias_correction2 = 1 - std::pow(g.beta2, step);
    const double step_size = g.lr / bias_correction1;
    // exp_avg.lerp_(grad, 1 - beta1) as at::vec computes it: weight w below 0.5 gives
    // exp_avg + w·(grad - exp_avg), otherwise grad + (w - 1)·(grad - exp_avg), each one fused multiply-add.
    const V lerp_weight(static_cast<O>(1 - g.beta1));
    lerp_small = std::abs(static_cast<O>(1 - g.beta1)) < O(0.5);
    lerp_coeff = lerp_small ? lerp_weight : lerp_weight - V(O(1));
    beta2 = V(static_cast<O>(g.beta2));
    one_minus_beta2 = V(static_cast<O>(1 - g.beta2));
    bc2_sqrt = V(static_cast<O>(std::sqrt(bias_correction2)));
    eps = V(static_cast<O>(g.eps));
    neg_step_size = V(static_cast<O>(-step_size));
    decays = g.weight_decay != 0;
    decay = V(static_cast<O>(1 - g.lr * g.weight_decay));
    l2 = g.l2_weight != 0;
    l2_scale = V(static_cast<O>(2 * g.l2_weight));
    maximize = g.maximize;
    grad_scale = V(plan.grad_scale.defined() ? static_cast<O>(*plan.grad_scale.const_data_ptr<float>()) : O(1));
  }
};

// Sum of squares: each float lane kRun terms long, then added into float64 (cpu::kRun: 1e8 float32
// values within 1e-6 of a float64 sum).
template <typename O>
struct SumSq {
  using V = at::vec::Vectorized<O>;
  V acc = V(O(0));
  int n = 0;
  double total = 0;

  void add(const V& x) {
    acc = at::vec::fmadd(x, x, acc);
    if (++n == cpu::kRun) flush();
  }
  void flush() {
    alignas(64) O lanes[V::size()];
    acc.store(lanes);
    for (int k = 0; k < V::size(); ++k) total += static_cast<double>(lanes[k]);
    acc = V(O(0));
    n = 0;
  }
};

// AdamW on one vector of (opmath) values, torch's at::vec expressions in torch's order. g is the data
// gradient, already unscaled and negated; p becomes the new param.
template <bool AMSGRAD, typename V, typename C>
inline void adamw_math(V& p, V g, V& m, V& v, V& vmax, const C& c) {
  // The penalty's gradient of the old p, with one rounding: g + 2·w·p exactly as L2Penalty.add_grad_ forms it.
  if (c.l2) g = at::vec::fmadd(p, c.l2_scale, g);
  if (c.decays) p = p * c.decay;
  m = at::vec::fmadd(c.lerp_coeff, g - m, c.lerp_small ? m : g);
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  V denom;
  if constexpr (AMSGRAD) {
    vmax = at::vec::maximum(vmax, v);
    denom = (vmax.sqrt() / c.bc2_sqrt) + c.eps;
  } else {
    denom = (v.sqrt() / c.bc2_sqrt) + c.eps;
  }
  p = p + c.neg_step_size * m / denom;
}

// float and double: one Vectorized<T> per block; the last, partial block through the same
// vector code (so every element gets the same arithmetic). The constants and the sum are copies
// local to the loop: Vectorized members may alias the T* stores, which would reload them every block.
template <typename T, bool AMSGRAD, Grad G>
void update_same(T* p, T* g, T* m, T* v, T* vmax, int64_t n, const Consts<T> c, SumSq<T>& total) {
  using V = at::vec::Vectorized<T>;
  SumSq<T> sq = total;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int k = static_cast<int>(std::min<int64_t>(V::size(), n - i));
    V pv = V::loadu(p + i, k), mv = V::loadu(m + i, k), vv = V::loadu(v + i, k), xv;
    V gv = G == Grad::kNone ? V(T(0)) : V::loadu(g + i, k);
    if constexpr (AMSGRAD) xv = V::loadu(vmax + i, k);
    if constexpr (G == Grad::kScaled) {
      gv = gv / c.grad_scale;
      gv.store(g + i, k);
    }
    if (c.maximize) gv = gv * V(T(-1));
    sq.add(pv);
    adamw_math<AMSGRAD>(pv, gv, mv, vv, xv, c);
    mv.store(m + i, k);
    vv.store(v + i, k);
    if constexpr (AMSGRAD) xv.store(vmax + i, k);
    pv.store(p + i, k);
  }
  total = sq;
}

// float16/bfloat16: each block converted to two float vectors, as torch's kernel does (opmath float).
template <typename T, bool AMSGRAD, Grad G>
void update_reduced(T* p, T* g, T* m, T* v, T* vmax, int64_t n, const Consts<float> c, SumSq<float>& total) {
  using L = at::vec::Vectorized<T>;
  SumSq<float> sq = total;
  using V = at::vec::Vectorized<float>;
  auto load = [](const T* x, int k) { return at::vec::convert_to_float<T>(L::loadu(x, k)); };
  auto store = [](T* x, int k, const V& a, const V& b) { at::vec::convert_from_float<T>(a, b).store(x, k); };
  for (int64_t i = 0; i < n; i += L::size()) {
    const int k = static_cast<int>(std::min<int64_t>(L::size(), n - i));
    auto [p0, p1] = load(p + i, k);
    auto [m0, m1] = load(m + i, k);
    auto [v0, v1] = load(v + i, k);
    V g0(0.f), g1(0.f), x0, x1;
    if constexpr (G != Grad::kNone) std::tie(g0, g1) = load(g + i, k);
    if constexpr (AMSGRAD) std::tie(x0, x1) = load(vmax + i, k);
    if constexpr (G == Grad::kScaled) {
      g0 = g0 / c.grad_scale;
      g1 = g1 / c.grad_scale;
      store(g + i, k, g0, g1);
    }
    if (c.maximize) {
      g0 = g0 * V(-1.f);
      g1 = g1 * V(-1.f);
    }
    sq.add(p0);
    sq.add(p1);
    adamw_math<AMSGRAD>(p0, g0, m0, v0, x0, c);
    adamw_math<AMSGRAD>(p1, g1, m1, v1, x1, c);
    store(m + i, k, m0, m1);
    store(v + i, k, v0, v1);
    if constexpr (AMSGRAD) store(vmax + i, k, x0, x1);
    store(p + i, k, p0, p1);
  }
  total = sq;
}

// found_inf is not 0: nothing is written, the penalty is still summed.
template <typename T>
void sum_only(const T* p, int64_t n, SumSq<opmath_t<T>>& sq) {
  using L = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += L::size()) {
    const int k = static_cast<int>(std::min<int64_t>(L::size(), n - i));
    if constexpr (std::is_same_v<T, opmath_t<T>>) {
      sq.add(L::loadu(p + i, k));
    } else {
      auto [a, b] = at::vec::convert_to_float<T>(L::loadu(p + i, k));
      sq.add(a);
      sq.add(b);
    }
  }
}

template <typename T, bool AMSGRAD, Grad G>
void update(const AdamWSegment& s, int64_t b, int64_t n, const Consts<opmath_t<T>>& c, SumSq<opmath_t<T>>& sq) {
  T* p = s.p.mutable_data_ptr<T>() + b;
  T* g = G == Grad::kNone ? nullptr : s.g.mutable_data_ptr<T>() + b;
  T* m = s.m.mutable_data_ptr<T>() + b;
  T* v = s.v.mutable_data_ptr<T>() + b;
  T* vmax = AMSGRAD ? s.vmax.mutable_data_ptr<T>() + b : nullptr;
  if constexpr (std::is_same_v<T, opmath_t<T>>) {
    update_same<T, AMSGRAD, G>(p, g, m, v, vmax, n, c, sq);
  } else {
    update_reduced<T, AMSGRAD, G>(p, g, m, v, vmax, n, c, sq);
  }
}

// One chunk [b, e) of segment s: its penalty partial, w·Σp² (0 for weight 0: that p is not summed).
template <typename T>
double run_chunk(const AdamWPlan& plan, const AdamWSegment& s, int64_t b, int64_t e, bool skip) {
  using O = opmath_t<T>;
  const AdamWGroup& group = plan.groups[s.group];
  SumSq<O> sq;
  if (skip) {
    if (group.l2_weight == 0) return 0.0;
    sum_only<T>(s.p.const_data_ptr<T>() + b, e - b, sq);
  } else {
    const double step = static_cast<double>(*s.step.const_data_ptr<float>() + 1.0f);  // torch: += 1 in float32
    const Consts<O> c(group, step, plan);
    const Grad grad = !s.g.defined() ? Grad::kNone : plan.grad_scale.defined() ? Grad::kScaled : Grad::kPlain;
    auto go = [&](auto ams, auto kind) { update<T, decltype(ams)::value, decltype(kind)::value>(s, b, e - b, c, sq); };
    using Yes = std::true_type;
    using No = std::false_type;
    using None = std::integral_constant<Grad, Grad::kNone>;
    using Plain = std::integral_constant<Grad, Grad::kPlain>;
    using Scaled = std::integral_constant<Grad, Grad::kScaled>;
    if (group.amsgrad) {
      grad == Grad::kNone ? go(Yes{}, None{}) : grad == Grad::kPlain ? go(Yes{}, Plain{}) : go(Yes{}, Scaled{});
    } else {
      grad == Grad::kNone ? go(No{}, None{}) : grad == Grad::kPlain ? go(No{}, Plain{}) : go(No{}, Scaled{});
    }
    if (group.l2_weight == 0) return 0.0;
  }
  sq.flush();
  return group.l2_weight * sq.total;
}

at::Tensor run_cpu(const AdamWPlan& plan) {
  // not 0 (GradScaler gives 1; a sum over devices or a NaN too) skips, as in the CUDA kernel
  const bool skip = plan.found_inf.defined() && *plan.found_inf.const_data_ptr<float>() != 0.0f;
  int64_t numel;
  const std::vector<Chunk> chunks = cpu::cut_into_chunks(plan.segments, kChunk, numel);
  const double total = cpu::sum_chunks(chunks, numel, kSerialBelow, [&](const Chunk& ch) {
    const AdamWSegment& s = plan.segments[ch.segment];
    return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.p.scalar_type(), "l2fast_adamw_cpu",
                                           [&] { return run_chunk<scalar_t>(plan, s, ch.begin, ch.end, skip); });
  });
  if (!skip) {
    for (const AdamWSegment& s : plan.segments) *s.step.mutable_data_ptr<float>() += 1.0f;
  }
  return cpu::value_tensor(total, plan.any_double);
}

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, CPU, m) { register_adamw_kernel<run_cpu>(m, c10::DeviceType::CPU); }

}  // namespace l2fast
