// Op schemas (backend-independent) and the Python module that loading the library needs.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

extern "C" {
// `import l2fast._C` runs the static TORCH_LIBRARY registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(l2fast, m) {
  // sum(x^2) over every element of every tensor; float64 if any input is float64, else float32.
  m.def("sq_norm(Tensor[] tensors) -> Tensor");
  // weight * sum(p^2); differentiable (see l2fast/ops.py).
  m.def("l2_penalty(Tensor[] params, float weight) -> Tensor");
  // grads[i] = 2 * weight * grad * params[i], in one multi-tensor kernel.
  m.def("l2_penalty_backward(Tensor grad, Tensor[] params, float weight) -> Tensor[]");
  // grads[i] += 2 * weight * params[i] (or = for the indices in `fresh`) and returns weight * sum(p^2),
  // reading each param once.
  m.def("l2_penalty_(Tensor[] params, Tensor(a!)[] grads, float weight, int[] fresh=[]) -> Tensor");
}

// Reached only when no backend kernel applies: an empty tensor list (no device to dispatch on) or
// tensors on a device l2fast has no kernel for.
namespace {

#ifdef WITH_CUDA
constexpr const char* kKernelDevices = "cpu and cuda";
#else
constexpr const char* kKernelDevices = "cpu (this build has no CUDA kernels)";
#endif

at::Tensor zero_if_empty(const char* op, at::TensorList params) {
  TORCH_CHECK_NOT_IMPLEMENTED(params.empty(), op, ": params[0] is on ", params[0].device(),
                              "; l2fast has kernels for ", kKernelDevices, " tensors only");
  return at::zeros({}, at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(l2fast, CompositeExplicitAutograd, m) {
  m.impl("sq_norm", [](at::TensorList t) { return zero_if_empty("l2fast.sq_norm", t); });
  m.impl("l2_penalty", [](at::TensorList p, double) { return zero_if_empty("l2fast.l2_penalty", p); });
  m.impl("l2_penalty_backward", [](const at::Tensor&, at::TensorList p, double) {
    zero_if_empty("l2fast.l2_penalty_backward", p);
    return std::vector<at::Tensor>();
  });
  m.impl("l2_penalty_", [](at::TensorList p, at::TensorList, double, at::IntArrayRef) {
    return zero_if_empty("l2fast.l2_penalty_", p);
  });
}
