// MemoryCheck (l2_penalty.h): which tensors of one call share bytes of memory, decided exactly.
//
// Tensors are placed by the addresses of their data, not by storage object: two storages may hold one
// memory (torch.from_numpy twice on one array). Their byte ranges, sorted, fall into components of
// ranges that intersect; a tensor alone in its component shares nothing with the others. A component
// without a written tensor is never inspected (params are only read). One that only dense tensors form
// is decided by its ranges, since a dense tensor fills its range. Otherwise the component's elements
// are enumerated once, into a bitmap over its span (or, where the span is far larger than the elements,
// a sorted list of their byte runs): linear in the elements of the tensors that must be inspected.
#include "l2_penalty.h"

#include <c10/util/SmallVector.h>
#include <c10/util/llvmMathExtras.h>

#include <algorithm>
#include <numeric>

namespace l2fast {
namespace {

using Extent = MemoryCheck::Extent;

struct Dim {
  int64_t size;
  int64_t stride;  // in elements
};

// t's dimensions of size > 1 (the others place no element apart).
c10::SmallVector<Dim, 6> dims_of(const c10::TensorImpl& t) {
  c10::SmallVector<Dim, 6> dims;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  for (size_t k = 0; k < sizes.size(); ++k) {
    if (sizes[k] > 1) dims.push_back({sizes[k], strides[k]});
  }
  return dims;
}

// Whether no two elements of t share memory, from its strides alone (sufficient, not necessary): with
// the dimensions in increasing stride, each stride steps past the farthest element the smaller ones reach.
bool strides_apart(const c10::TensorImpl& t) {
  auto dims = dims_of(t);
  std::sort(dims.begin(), dims.end(), [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  int64_t reach = 0;
  for (const Dim& d : dims) {
    if (d.stride <= reach) return false;
    reach += (d.size - 1) * d.stride;
  }
  return true;
}

// Calls f(offset, bytes) for each run of adjacent elements of t, offsets in bytes from its first
// element, the innermost loop over the smallest stride; stops when f returns false (and returns false).
template <typename F>
bool for_each_run(const c10::TensorImpl& t, F&& f) {
  auto dims = dims_of(t);
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& a, const Dim& b) { return a.stride > b.stride; });
  const int64_t item = static_cast<int64_t>(t.itemsize());
  int64_t run = item;
  if (!dims.empty() && dims.back().stride == 1) {  // contiguous rows: one run each
    run *= dims.back().size;
    dims.pop_back();
  }
  if (dims.empty()) return f(int64_t(0), run);
  const Dim inner = dims.back();
  dims.pop_back();
  c10::SmallVector<int64_t, 6> idx(dims.size(), 0);
  int64_t base = 0;  // in elements
  for (;;) {
    for (int64_t i = 0, at = base; i < inner.size; ++i, at += inner.stride) {
      if (!f(at * item, run)) return false;
    }
    size_t k = dims.size();
    for (;;) {  // the next index of the outer dimensions, last fastest
      if (k == 0) return true;
      --k;
      if (++idx[k] < dims[k].size) {
        base += dims[k].stride;
        break;
      }
      base -= (dims[k].size - 1) * dims[k].stride;
      idx[k] = 0;
    }
  }
}

// Natural merge sort: tensors come mostly in allocation order (tens of ascending runs for 100,000
// tensors), so merging the runs costs O(n log runs) against std::sort's O(n log n). One scratch
// buffer for all passes: std::inplace_merge would allocate (and page-fault) one per merge.
template <typename T, typename Less>
void sort_runs(std::vector<T>& v, Less less) {
  std::vector<size_t> bounds{0};
  for (size_t i = 1; i < v.size(); ++i) {
    if (less(v[i], v[i - 1])) bounds.push_back(i);
  }
  bounds.push_back(v.size());
  if (bounds.size() <= 2) return;  // already sorted
  std::vector<T> scratch(v.size());
  std::vector<T>* from = &v;
  std::vector<T>* to = &scratch;
  std::vector<size_t> merged;
  while (bounds.size() > 2) {
    const size_t runs = bounds.size() - 1;
    merged.assign(1, 0);
    for (size_t k = 0; k < runs; k += 2) {
      const auto first = from->begin();
      const size_t last = bounds[std::min(k + 2, runs)];
      if (k + 1 < runs) {
        std::merge(first + bounds[k], first + bounds[k + 1], first + bounds[k + 1], first + last,
                   to->begin() + bounds[k], less);
      } else {
        std::copy(first + bounds[k], first + last, to->begin() + bounds[k]);
      }
      merged.push_back(last);
    }
    std::swap(from, to);
    bounds.swap(merged);
  }
  if (from != &v) v.swap(scratch);
}

constexpr size_t kNone = static_cast<size_t>(-1);

struct Conflict {
  size_t a = kNone;  // a written tensor (the position of its extent in the component) ...
  size_t b = kNone;  // ... and one it shares memory with (b == a: it overlaps itself)
  bool found() const { return a != kNone; }
};

// A run of bytes [lo, hi) of the component's member `member`.
struct Run {
  int64_t lo;
  int64_t hi;
  size_t member;
};

// Over runs sorted by lo: the first run that intersects an earlier one where one of the two is written.
// Exact: of the earlier runs, the one reaching farthest intersects the current one if any does.
template <typename Written>
Conflict sweep(const std::vector<Run>& runs, Written written) {
  const Run* any = nullptr;  // the earlier run reaching farthest
  const Run* out = nullptr;  // the same among written runs
  for (const Run& r : runs) {
    const bool w = written(r.member);
    if (w && any && r.lo < any->hi) return {r.member, any->member};
    if (out && r.lo < out->hi) return {out->member, r.member};
    if (!any || r.hi > any->hi) any = &r;
    if (w && (!out || r.hi > out->hi)) out = &r;
  }
  return {};
}

class Bitmap {
 public:
  explicit Bitmap(int64_t bits) : words_(static_cast<size_t>((bits + 63) / 64), 0) {}

  // The first bit of [lo, hi) that is set (-1: none); with `set`, sets the bits it passed.
  int64_t first_set(int64_t lo, int64_t hi, bool set) {
    if (hi - lo == 1) {  // one element of the unit's size: the common case of strided views
      uint64_t& word = words_[static_cast<size_t>(lo >> 6)];
      const uint64_t bit = uint64_t(1) << (lo & 63);
      if (word & bit) return lo;
      if (set) word |= bit;
      return -1;
    }
    const int64_t last = (hi - 1) >> 6;
    for (int64_t w = lo >> 6; w <= last; ++w) {
      uint64_t mask = ~uint64_t(0);
      if (w == lo >> 6) mask &= ~uint64_t(0) << (lo & 63);
      if (w == last) mask &= ~uint64_t(0) >> (63 - ((hi - 1) & 63));
      uint64_t& word = words_[static_cast<size_t>(w)];
      if (const uint64_t hit = word & mask) return (w << 6) + c10::llvm::countTrailingZeros(hit);
      if (set) word |= mask;
    }
    return -1;
  }

 private:
  std::vector<uint64_t> words_;
};

// Whether member m has an element on unit `unit` (units of 2^shift bytes from `lo`).
bool covers(const Extent& m, uintptr_t lo, int shift, int64_t unit) {
  const int64_t start = static_cast<int64_t>(m.begin - lo);
  return !for_each_run(*m.t, [&](int64_t off, int64_t bytes) {
    return !((start + off) >> shift <= unit && unit < (start + off + bytes) >> shift);
  });
}

// The exact answer for a component whose members' ranges intersect: its elements enumerated once.
Conflict exact(const std::vector<const Extent*>& members, uintptr_t lo, uintptr_t hi) {
  // The unit: the largest number of bytes that every element's start and size are multiples of (a
  // power of 2, as it divides an element size).
  int64_t unit = 0, units = 0;  // units: the elements' units, summed
  for (const Extent* m : members) {
    const int64_t item = static_cast<int64_t>(m->t->itemsize());
    unit = std::gcd(std::gcd(unit, item), static_cast<int64_t>(m->begin - lo));
    for (const Dim& d : dims_of(*m->t)) unit = std::gcd(unit, d.stride * item);
  }
  for (const Extent* m : members) units += m->t->numel() * static_cast<int64_t>(m->t->itemsize()) / unit;
  const int64_t span = static_cast<int64_t>(hi - lo) / unit;
  const int shift = static_cast<int>(c10::llvm::countTrailingZeros(static_cast<uint64_t>(unit)));
  auto written = [&members](size_t k) { return members[k]->written; };

  if (span / 64 > units) {  // a bitmap would dwarf the elements: sort their runs instead
    std::vector<Run> runs;
    for (size_t k = 0; k < members.size(); ++k) {
      const int64_t start = static_cast<int64_t>(members[k]->begin - lo);
      for_each_run(*members[k]->t, [&](int64_t off, int64_t bytes) {
        runs.push_back({start + off, start + off + bytes, k});
        return true;
      });
    }
    std::sort(runs.begin(), runs.end(), [](const Run& x, const Run& y) { return x.lo < y.lo; });
    return sweep(runs, written);
  }

  // Written members first, each marking its units; then the read-only ones, each testing them.
  std::vector<size_t> order(members.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_partition(order.begin(), order.end(), written);
  Bitmap bits(span);
  for (size_t pos = 0; pos < order.size(); ++pos) {
    const Extent& m = *members[order[pos]];
    const int64_t start = static_cast<int64_t>(m.begin - lo);
    int64_t hit = -1;
    for_each_run(*m.t, [&](int64_t off, int64_t bytes) {
      hit = bits.first_set((start + off) >> shift, (start + off + bytes) >> shift, m.written);
      return hit < 0;
    });
    if (hit < 0) continue;
    // Who marked it: an earlier written member, or else (when m is written) m itself.
    for (size_t q = 0; q < pos && members[order[q]]->written; ++q) {
      if (covers(*members[order[q]], lo, shift, hit)) return {order[q], order[pos]};
    }
    return {order[pos], order[pos]};
  }
  return {};
}

// The conflict within one component (members sorted by begin, ranges chained by intersection).
Conflict component_conflict(const std::vector<const Extent*>& members, uintptr_t hi) {
  bool any_written = false, all_dense = true;
  for (const Extent* m : members) {
    any_written |= m->written;
    all_dense &= m->dense;
  }
  if (!any_written) return {};
  if (members.size() == 1 && (all_dense || strides_apart(*members[0]->t))) return {};
  if (all_dense) {  // every intersection of ranges is shared memory
    std::vector<Run> runs;
    runs.reserve(members.size());
    for (size_t k = 0; k < members.size(); ++k) {
      runs.push_back({static_cast<int64_t>(members[k]->begin - members[0]->begin),
                      static_cast<int64_t>(members[k]->end - members[0]->begin), k});
    }
    return sweep(runs, [&members](size_t k) { return members[k]->written; });
  }
  return exact(members, members[0]->begin, hi);
}

}  // namespace

void MemoryCheck::add(size_t list, size_t index, const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return;
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const auto begin = reinterpret_cast<uintptr_t>(impl->data());
  const int64_t item = static_cast<int64_t>(impl->itemsize());
  const bool dense = impl->is_non_overlapping_and_dense();
  int64_t span = impl->numel();  // elements from the first to one past the last
  if (!dense) {
    span = 1;  // torch strides are never negative
    const auto sizes = impl->sizes();
    const auto strides = impl->strides();
    for (size_t k = 0; k < sizes.size(); ++k) span += (sizes[k] - 1) * strides[k];
  }
  const c10::Device device = impl->device();
  extents_[list].push_back({begin, begin + static_cast<uintptr_t>(span * item), impl, static_cast<uint32_t>(index),
                            static_cast<int16_t>(static_cast<int>(device.type()) << 8 |
                                                 static_cast<uint8_t>(device.index())),
                            static_cast<uint8_t>(list), lists_[list].written, dense});
}

void MemoryCheck::check(const char* op) {
  auto before = [](const Extent& x, const Extent& y) {
    return x.device != y.device ? x.device < y.device : x.begin < y.begin;
  };
  for (auto& v : extents_) sort_runs(v, before);
  c10::SmallVector<size_t, 4> next(extents_.size(), 0);
  // The component being gathered: extents in order of begin, each intersecting the range before it.
  std::vector<const Extent*> members;
  uintptr_t hi = 0;
  auto decide = [&] {
    if (members.size() > 1 || (members[0]->written && !members[0]->dense)) {
      const Conflict c = component_conflict(members, hi);
      if (c.found()) refuse(op, *members[c.a], *members[c.b]);
    }
    members.clear();
  };
  for (;;) {
    const Extent* e = nullptr;  // the next extent of the lists merged
    size_t from = 0;
    for (size_t k = 0; k < extents_.size(); ++k) {
      if (next[k] < extents_[k].size() && (!e || before(extents_[k][next[k]], *e))) {
        e = &extents_[k][next[k]];
        from = k;
      }
    }
    if (!e) break;
    ++next[from];
    if (!members.empty() && (e->device != members[0]->device || e->begin >= hi)) decide();
    hi = members.empty() ? e->end : std::max(hi, e->end);
    members.push_back(e);
  }
  if (!members.empty()) decide();
}

void MemoryCheck::refuse(const char* op, const Extent& a, const Extent& b) const {
  if (&a == &b) {
    TORCH_CHECK_VALUE(false, op, ": ", lists_[a.list].name, "[", a.index, "] has elements that share memory (an "
                      "expanded or overlapping strided view?); expected a tensor that can be written element by "
                      "element");
  }
  // A written tensor first; of two written ones, the later.
  const bool a_first = !b.written || std::make_pair(a.list, a.index) > std::make_pair(b.list, b.index);
  const Extent& x = a_first ? a : b;
  const Extent& y = a_first ? b : a;
  std::string written;
  for (const List& l : lists_) {
    if (l.written) written += std::string(written.empty() ? "" : ", ") + l.name;
  }
  TORCH_CHECK_VALUE(false, op, ": ", lists_[x.list].name, "[", x.index, "] shares memory with ", lists_[y.list].name,
                    "[", y.index, "]; the op writes ", written,
                    " in place, so each of those must have memory of its own, shared with no other tensor it is given");
}

void check_no_shared_memory(const char* op, std::initializer_list<MemoryCheck::Tensors> lists) {
  c10::SmallVector<MemoryCheck::List, 4> roles;
  for (const auto& l : lists) roles.push_back({l.name, l.written});
  MemoryCheck memory(roles);
  size_t k = 0;
  for (const auto& l : lists) {
    memory.reserve(k, l.tensors.size());
    for (size_t i = 0; i < l.tensors.size(); ++i) memory.add(k, i, l.tensors[i]);
    ++k;
  }
  memory.check(op);
}

}  // namespace l2fast
