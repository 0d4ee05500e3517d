// What the plans of l2fast's ops (l2_penalty.h's Plan, adamw.h's AdamWPlan) have in common: the dense
// stand-ins to copy back after the kernel, the device, and the dtype values are accumulated in.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace l2fast {

struct PlanBase {
  // (user's tensor, dense stand-in): copied back after the kernel when a written tensor was not dense.
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;
  at::Device device = at::kCPU;
  bool any_double = false;  // accumulate in float64 when any input is float64

  at::ScalarType acc_dtype() const { return any_double ? at::kDouble : at::kFloat; }
  void finish() const {
    for (const auto& [user, standin] : writeback) user.copy_(standin);
  }
};

}  // namespace l2fast
