// The Python module l2fast._C. Importing it runs the ops' static registrations; it also holds one
// direct call, `_add_grad_`, through which L2Penalty.add_grad_ runs l2_penalty_ without the
// dispatcher: a torch.ops call costs ~3 µs plus ~0.25 µs per tensor (boxing the lists, reading every
// tensor's keys), about as much as the seed MLP's whole pass over memory.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <vector>

#include "adamw.h"
#include "l2_penalty.h"

namespace {

// The keys of a plain CPU or CUDA tensor outside inference mode: nothing that a dispatcher call would
// send elsewhere (Python subclasses and modes, functionalization, vmap, sparse, ...).
bool plain(const at::Tensor& t) {
  static const c10::DispatchKeySet kPlain{c10::DispatchKey::CPU,          c10::DispatchKey::CUDA,
                                          c10::DispatchKey::AutogradCPU,  c10::DispatchKey::AutogradCUDA,
                                          c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutocastCPU,
                                          c10::DispatchKey::AutocastCUDA};
  const c10::DispatchKeySet ks = t.key_set();
  return kPlain.isSupersetOf(ks) && ks.has(c10::DispatchKey::ADInplaceOrView);
}

constexpr const char* kCapsule = "l2fast.Validated";

// Whether `groups` (L2Penalty.param_groups) is still what `watch` recorded when the penalty was built:
// a tuple of (group dict, its "params" list, a tuple of that list's items, its "weight" or `missing`,
// a tuple of its keys) per group. The recorded objects are held by `watch`, so none can be freed and
// another take its address: comparing addresses is comparing identities, as L2Penalty._stale does in
// Python. The keys are compared so that a key added later (a typo) is refused at the next call.
bool unchanged(PyObject* groups, PyObject* watch, PyObject* missing) {
  static PyObject* const kParams = PyUnicode_InternFromString("params");
  static PyObject* const kWeight = PyUnicode_InternFromString("weight");
  if (!PyList_Check(groups) || !PyTuple_Check(watch) || PyList_GET_SIZE(groups) != PyTuple_GET_SIZE(watch)) {
    return false;
  }
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(watch); ++k) {
    PyObject* entry = PyTuple_GET_ITEM(watch, k);
    PyObject* group = PyList_GET_ITEM(groups, k);
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 5 || PyTuple_GET_ITEM(entry, 0) != group ||
        !PyDict_CheckExact(group)) {
      return false;
    }
    PyObject* keys = PyTuple_GET_ITEM(entry, 4);
    if (!PyTuple_Check(keys) || PyDict_GET_SIZE(group) != PyTuple_GET_SIZE(keys)) return false;
    Py_ssize_t pos = 0, k_pos = 0;
    PyObject* key;
    while (PyDict_Next(group, &pos, &key, nullptr)) {  // insertion order: the order tuple(group) recorded
      if (key != PyTuple_GET_ITEM(keys, k_pos++)) return false;
    }
    PyObject* members = PyDict_GetItem(group, kParams);  // borrowed; never raises
    PyObject* weight = PyDict_GetItem(group, kWeight);
    PyObject* items = PyTuple_GET_ITEM(entry, 2);
    if (members != PyTuple_GET_ITEM(entry, 1) || (weight ? weight : missing) != PyTuple_GET_ITEM(entry, 3) ||
        !PyList_Check(members) || !PyTuple_Check(items) || PyList_GET_SIZE(members) != PyTuple_GET_SIZE(items)) {
      return false;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(items); ++i) {
      if (PyList_GET_ITEM(members, i) != PyTuple_GET_ITEM(items, i)) return false;
    }
  }
  return true;
}

// Whether a torch.ops call would hand obj to a __torch_function__ of its type (torch's own
// has_torch_function test, which libtorch_python does not export): any Tensor subclass, except those
// whose __torch_function__ is torch's disabled one (nn.Parameter).
bool overrides_torch_function(PyObject* obj) {
  if (THPVariable_CheckExact(obj) ||
      at::impl::PythonTorchFunctionTLS::get_disabled_state() != at::impl::TorchFunctionDisabledState::ENABLED) {
    return false;
  }
  static PyObject* const disabled = [] {
    PyObject* torch_c = PyImport_ImportModule("torch._C");
    PyObject* impl = torch_c ? PyObject_GetAttrString(torch_c, "_disabled_torch_function_impl") : nullptr;
    Py_XDECREF(torch_c);
    if (!impl) PyErr_Clear();
    return impl;  // kept for the process's life, as torch keeps it
  }();
  PyObject* attr = PyObject_GetAttrString(obj, "__torch_function__");
  if (!attr) {
    PyErr_Clear();
    return false;
  }
  const bool overrides = attr != disabled;
  Py_DECREF(attr);
  return overrides;
}

// A plain tensor held by obj, or nullptr. `checked`: a type seen in this call that is a tensor type
// without a __torch_function__ of its own (nn.Parameter's is torch's disabled one), so a list of one
// type is asked once.
const at::Tensor* plain_tensor(PyObject* obj, PyTypeObject*& checked) {
  if (obj == nullptr) return nullptr;
  if (Py_TYPE(obj) != checked) {
    if (!THPVariable_Check(obj) || overrides_torch_function(obj)) return nullptr;
    checked = Py_TYPE(obj);
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  return plain(t) ? &t : nullptr;
}

// _validated() -> a capsule holding an empty l2fast::Validated, for _add_grad_.
PyObject* validated(PyObject* /*module*/, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
  return PyCapsule_New(new l2fast::Validated(), kCapsule, [](PyObject* capsule) {
    delete static_cast<l2fast::Validated*>(PyCapsule_GetPointer(capsule, kCapsule));
  });
  END_HANDLE_TH_ERRORS
}

// _add_grad_(groups, watch, missing, params: list[Tensor], weight: float, weights: float64 Tensor | None,
//            validated: capsule) -> Tensor | None
//
// For each param p with grad g: g += 2·weight·w·p (a None grad becomes a new one, set as p.grad);
// returns the value. Exactly what torch.ops.l2fast.l2_penalty_ does through its Autograd,
// ADInplaceOrView and backend kernels, with the same checks and errors, but only where the dispatcher
// would run those three and nothing else: no thread-local modes (TorchFunctionMode, TorchDispatchMode,
// inference mode, autocast, vmap, ...), and params with no __torch_function__ or dispatch keys of
// their own. Otherwise it returns None and writes nothing, and the
// caller goes through torch.ops. It also returns None when `groups` changed since `watch` was recorded
// (the caller rebuilds `params`). `validated` lets calls with the same tensors skip the checks.
PyObject* add_grad(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 7 && PyList_Check(args[3]) && PyFloat_Check(args[4]) &&
                       (args[5] == Py_None || THPVariable_Check(args[5])) && PyCapsule_IsValid(args[6], kCapsule),
                   "l2fast._C._add_grad_(groups, watch, missing, params: list, weight: float, "
                   "weights: Tensor | None, validated)");
  if (!unchanged(args[0], args[1], args[2])) Py_RETURN_NONE;
  args += 3;
  auto* seen = static_cast<l2fast::Validated*>(PyCapsule_GetPointer(args[3], kCapsule));
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  const Py_ssize_t n = PyList_GET_SIZE(args[0]);
  if (tls.included_ != c10::default_included_set || tls.excluded_ != c10::default_excluded_set || n == 0 ||
      at::impl::torch_function_mode_enabled()) {  // a TorchFunctionMode sees torch.ops calls: let it
    Py_RETURN_NONE;
  }
  PyTypeObject* checked = nullptr;  // a type seen in this call with no __torch_function__ of its own
  std::vector<at::Tensor> params, grads;
  std::vector<int64_t> fresh;
  params.reserve(n);
  grads.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* p = plain_tensor(PyList_GET_ITEM(args[0], i), checked);
    if (p == nullptr) Py_RETURN_NONE;
    params.push_back(*p);
    grads.push_back(p->grad());
    if (!grads.back().defined()) {
      fresh.push_back(i);
    } else if (!plain(grads.back())) {
      Py_RETURN_NONE;
    }
  }
  const l2fast::RunKernel run = l2fast::kernel_for(params[0].device().type());
  if (run == nullptr) Py_RETURN_NONE;  // torch.ops says why
  for (int64_t i : fresh) grads[i] = at::empty_like(params[i]);
  const double weight = PyFloat_AS_DOUBLE(args[1]);
  l2fast::Weights weights;
  if (args[2] != Py_None) {
    const at::Tensor& w = THPVariable_Unpack(args[2]);
    TORCH_CHECK_TYPE(w.scalar_type() == at::kDouble && w.dim() == 1 && w.is_contiguous() && w.is_cpu(),
                     "l2fast._C._add_grad_: weights must be a contiguous 1-D float64 CPU tensor");
    weights = at::ArrayRef<double>(w.const_data_ptr<double>(), w.numel());
  }
  at::Tensor value;
  {
    RECORD_FUNCTION("l2fast::l2_penalty_", c10::ArrayRef<const c10::IValue>{});
    pybind11::gil_scoped_release no_gil;  // as torch.ops calls do
    l2fast::refuse_grads_in_graph(grads);
    value = l2fast::l2_penalty_inplace_cached(*seen, params, grads, weight, fresh, weights, run);
    l2fast::bump_versions(grads);
  }
  for (int64_t i : fresh) params[i].mutable_grad() = grads[i];
  return THPVariable_Wrap(std::move(value));
  END_HANDLE_TH_ERRORS
}

// _check_no_shared_memory(op: str, lists: list[tuple[str, list[Tensor], bool]]) -> None
//
// l2fast::MemoryCheck over (name, tensors, written) lists: a ValueError when a written tensor shares
// memory with another listed tensor or with itself. The check l2_penalty_ makes, for any op that writes
// several lists in place (an optimizer's params and moments).
PyObject* check_no_shared_memory(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* op = nullptr;
  PyObject* lists = nullptr;
  if (!PyArg_ParseTuple(args, "sO!", &op, &PyList_Type, &lists)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(lists);
  std::vector<l2fast::MemoryCheck::List> roles;
  std::vector<std::vector<at::Tensor>> tensors(n);
  for (Py_ssize_t k = 0; k < n; ++k) {
    const char* name = nullptr;
    PyObject* items = nullptr;
    int written = 0;
    TORCH_CHECK_TYPE(PyTuple_Check(PyList_GET_ITEM(lists, k)) &&
                         PyArg_ParseTuple(PyList_GET_ITEM(lists, k), "sO!p", &name, &PyList_Type, &items, &written),
                     "l2fast._C._check_no_shared_memory: lists[", k, "] is not a (name, list of tensors, written) tuple");
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); ++i) {
      PyObject* t = PyList_GET_ITEM(items, i);
      TORCH_CHECK_TYPE(THPVariable_Check(t), "l2fast._C._check_no_shared_memory: ", name, "[", i, "] is not a tensor");
      tensors[k].push_back(THPVariable_Unpack(t));
    }
    roles.push_back({name, written != 0});
  }
  l2fast::MemoryCheck memory(roles);
  for (Py_ssize_t k = 0; k < n; ++k) {
    for (size_t i = 0; i < tensors[k].size(); ++i) memory.add(k, i, tensors[k][i]);
  }
  memory.check(op);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}
PyObject* adamw_cache(PyObject* module, PyObject* unused);
PyObject* adamw_step(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

PyMethodDef methods[] = {
    {"_add_grad_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(add_grad)), METH_FASTCALL,
     "l2_penalty_ over params and their .grad without the dispatcher (L2Penalty.add_grad_'s fast path); "
     "None when the call must go through torch.ops."},
    {"_validated", validated, METH_NOARGS, "A new, empty validation cache for _add_grad_."},
    {"_check_no_shared_memory", check_no_shared_memory, METH_VARARGS,
     "Refuses a written tensor sharing memory with another listed tensor: (op, [(name, tensors, written)])."},
    {"_adamw_step_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(adamw_step)), METH_FASTCALL,
     "l2fast.optim.AdamW's step over plain tensors without the dispatcher; None when it must go through torch.ops."},
    {"_adamw_cache", adamw_cache, METH_NOARGS, "A new, empty validation cache for _adamw_step_."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

// ---------------------------------------------------------------------------------------------
// l2fast.optim.AdamW's direct call: the step's tensors and hyperparameters read from the optimizer's
// param_groups and state in C, then the adamw_ kernel without the dispatcher (a torch.ops call
// boxes six tensor lists: ~3 µs plus ~0.25 µs per tensor, and the Python that builds the lists costs
// more than the seed MLP's whole kernel).
namespace {

constexpr const char* kAdamWCapsule = "l2fast.AdamWValidated";

PyObject* adamw_cache(PyObject* /*module*/, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
  return PyCapsule_New(new l2fast::AdamWValidated(), kAdamWCapsule, [](PyObject* capsule) {
    delete static_cast<l2fast::AdamWValidated*>(PyCapsule_GetPointer(capsule, kAdamWCapsule));
  });
  END_HANDLE_TH_ERRORS
}

// A real number (not a bool) as a double.
bool as_double(PyObject* obj, double* out) {
  if (PyFloat_Check(obj)) {
    *out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (PyLong_Check(obj) && !PyBool_Check(obj)) {
    *out = PyLong_AsDouble(obj);
    if (*out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

// _adamw_step_(param_groups: list[dict], state: dict, grad_scale, found_inf, cache) -> Tensor | None
//
// What AdamW._step_slow does through torch.ops.l2fast.adamw_, with the same checks and errors, where
// that would run the op's Autograd, ADInplaceOrView and backend kernels and nothing else: no
// thread-local mode, plain CPU/CUDA tensors, every param to update with its state, float
// hyperparameters (lr also a plain tensor), grad_scale/found_inf None or float32 on the params'
// device. Otherwise it returns None having written nothing, and the caller takes the op path (which
// initialises state and says what is wrong). A param without a grad: skipped when its weight is 0,
// updated with the penalty's gradient alone when it requires grad, else (frozen) only in the value.
PyObject* adamw_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 5 && PyList_Check(args[0]) && PyDict_Check(args[1]) &&
                       PyCapsule_IsValid(args[4], kAdamWCapsule),
                   "l2fast._C._adamw_step_(param_groups: list, state: dict, grad_scale, found_inf, cache)");
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  if (tls.included_ != c10::default_included_set || tls.excluded_ != c10::default_excluded_set ||
      at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NONE;
  }
  static PyObject* const kKeys[] = {
      PyUnicode_InternFromString("params"),       PyUnicode_InternFromString("lr"),
      PyUnicode_InternFromString("betas"),        PyUnicode_InternFromString("eps"),
      PyUnicode_InternFromString("weight_decay"), PyUnicode_InternFromString("weight"),
      PyUnicode_InternFromString("amsgrad"),      PyUnicode_InternFromString("maximize"),
      PyUnicode_InternFromString("step"),         PyUnicode_InternFromString("exp_avg"),
      PyUnicode_InternFromString("exp_avg_sq"),   PyUnicode_InternFromString("max_exp_avg_sq")};
  enum { kParams, kLr, kBetas, kEps, kWd, kWeight, kAms, kMax, kStep, kExpAvg, kExpAvgSq, kMaxExpAvgSq };
  PyObject* const groups = args[0];
  PyObject* const state = args[1];
  const Py_ssize_t G = PyList_GET_SIZE(groups);
  PyTypeObject* checked = nullptr;

  std::vector<at::Tensor> params, m, v, vmax, steps, frozen;
  c10::List<std::optional<at::Tensor>> grads, lr_tensors;
  std::vector<int64_t> sizes(G, 0), flags(G, 0);
  std::vector<double> lr(G), beta1(G), beta2(G), eps(G), wd(G), l2(G), frozen_w;
  bool any_lr_tensor = false, any_double = false;
  for (Py_ssize_t k = 0; k < G; ++k) {
    PyObject* group = PyList_GET_ITEM(groups, k);
    if (!PyDict_Check(group)) Py_RETURN_NONE;
    PyObject* members = PyDict_GetItem(group, kKeys[kParams]);  // borrowed; never raises
    PyObject* betas = PyDict_GetItem(group, kKeys[kBetas]);
    PyObject* lr_obj = PyDict_GetItem(group, kKeys[kLr]);
    PyObject* ams = PyDict_GetItem(group, kKeys[kAms]);
    PyObject* maxi = PyDict_GetItem(group, kKeys[kMax]);
    if (!members || !PyList_Check(members) || !betas || !PyTuple_Check(betas) || PyTuple_GET_SIZE(betas) != 2 ||
        !lr_obj || !ams || !PyBool_Check(ams) || !maxi || !PyBool_Check(maxi)) {
      Py_RETURN_NONE;
    }
    PyObject* eps_obj = PyDict_GetItem(group, kKeys[kEps]);
    PyObject* wd_obj = PyDict_GetItem(group, kKeys[kWd]);
    PyObject* w_obj = PyDict_GetItem(group, kKeys[kWeight]);
    if (!eps_obj || !wd_obj || !w_obj || !as_double(eps_obj, &eps[k]) || !as_double(wd_obj, &wd[k]) ||
        !as_double(w_obj, &l2[k]) || !as_double(PyTuple_GET_ITEM(betas, 0), &beta1[k]) ||
        !as_double(PyTuple_GET_ITEM(betas, 1), &beta2[k])) {
      Py_RETURN_NONE;
    }
    lr_tensors.push_back(std::nullopt);
    if (!as_double(lr_obj, &lr[k])) {
      const at::Tensor* t = plain_tensor(lr_obj, checked);
      if (t == nullptr) Py_RETURN_NONE;
      lr_tensors.set(k, *t);  // the op reads a CPU one on the host, a device one in the kernel
      any_lr_tensor = true;
      lr[k] = 0.0;
    }
    const bool amsgrad = ams == Py_True;
    flags[k] = (amsgrad ? l2fast::kAmsgrad : 0) | (maxi == Py_True ? l2fast::kMaximize : 0);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(members); ++i) {
      PyObject* item = PyList_GET_ITEM(members, i);
      const at::Tensor* p = plain_tensor(item, checked);
      if (p == nullptr) Py_RETURN_NONE;
      any_double |= p->scalar_type() == at::kDouble;
      const at::Tensor& g = p->grad();
      if (!g.defined()) {
        if (l2[k] == 0.0) continue;  // as torch: no grad, no update
        if (!p->requires_grad()) {    // frozen: in the value only
          frozen.push_back(*p);
          frozen_w.push_back(l2[k]);
          continue;
        }
      } else if (!plain(g)) {
        Py_RETURN_NONE;
      }
      PyObject* s = PyDict_GetItem(state, item);
      if (s == nullptr || !PyDict_Check(s)) Py_RETURN_NONE;  // no state yet: the op path makes it
      const at::Tensor* step = plain_tensor(PyDict_GetItem(s, kKeys[kStep]), checked);
      const at::Tensor* ea = plain_tensor(PyDict_GetItem(s, kKeys[kExpAvg]), checked);
      const at::Tensor* eas = plain_tensor(PyDict_GetItem(s, kKeys[kExpAvgSq]), checked);
      const at::Tensor* mx = amsgrad ? plain_tensor(PyDict_GetItem(s, kKeys[kMaxExpAvgSq]), checked) : nullptr;
      if (!step || !ea || !eas || (amsgrad && !mx) || step->scalar_type() != at::kFloat ||
          step->device() != p->device() || step->dim() != 0) {
        Py_RETURN_NONE;  // the op path makes or converts them
      }
      params.push_back(*p);
      grads.push_back(g.defined() ? std::optional<at::Tensor>(g) : std::nullopt);
      m.push_back(*ea);
      v.push_back(*eas);
      if (amsgrad) vmax.push_back(*mx);
      steps.push_back(*step);
      ++sizes[k];
    }
  }
  if (params.empty()) Py_RETURN_NONE;
  const l2fast::RunAdamW run = l2fast::adamw_kernel_for(params[0].device().type());
  if (run == nullptr) Py_RETURN_NONE;
  for (size_t k = 0; any_lr_tensor && k < lr_tensors.size(); ++k) {  // the slow path converts the others
    const std::optional<at::Tensor> t = lr_tensors.get(k);
    if (t.has_value() && !l2fast::usable_lr_tensor(*t, params[0].device())) Py_RETURN_NONE;
  }
  std::optional<at::Tensor> scale_inf[2];
  for (int j = 0; j < 2; ++j) {
    PyObject* obj = args[2 + j];
    if (obj == Py_None) continue;
    const at::Tensor* t = plain_tensor(obj, checked);
    if (t == nullptr || t->scalar_type() != at::kFloat || t->device() != params[0].device()) Py_RETURN_NONE;
    scale_inf[j] = *t;
  }
  if (!any_lr_tensor) lr_tensors.clear();
  auto* seen = static_cast<l2fast::AdamWValidated*>(PyCapsule_GetPointer(args[4], kAdamWCapsule));
  at::Tensor value;
  {
    RECORD_FUNCTION("l2fast::adamw_", c10::ArrayRef<const c10::IValue>{});
    pybind11::gil_scoped_release no_gil;  // as torch.ops calls do
    const l2fast::AdamWArgs a{params, grads, m, v, vmax, steps, sizes, lr, beta1, beta2, eps, wd, l2, flags,
                              lr_tensors, scale_inf[0], scale_inf[1]};
    {
      at::AutoDispatchBelowADInplaceOrView below;  // where the op's backend kernel runs: stand-ins copy back
      value = l2fast::adamw_cached(*seen, a, run);  // into leaf params without autograd seeing it
    }
    l2fast::adamw_bump_versions(a);
    if (!frozen.empty()) {
      at::NoGradGuard no_grad;
      value = value + l2fast::l2_penalty(frozen, 1.0, l2fast::Weights(at::ArrayRef<double>(frozen_w)));
    }
    if (any_double && value.scalar_type() != at::kDouble) value = value.to(at::kDouble);
  }
  return THPVariable_Wrap(std::move(value));
  END_HANDLE_TH_ERRORS
}

}  // namespace
