// Op schemas (backend-independent) and the Python module that loading the library needs.
#include <Python.h>
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
