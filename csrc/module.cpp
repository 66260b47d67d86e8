// The extension's Python module. It has no functions: importing it loads the shared library,
// whose static initializers register every op with the dispatcher (TORCH_LIBRARY_*). Its
// attributes record how it was built, for mlkernels.build_info().
#include <Python.h>

#ifndef MLK_TORCH_VERSION
#error "setup.py defines MLK_TORCH_VERSION"
#endif
#ifndef MLK_CUDA_ARCHS
#define MLK_CUDA_ARCHS ""
#endif

static struct PyModuleDef mlkernels_module = {PyModuleDef_HEAD_INIT, "_C", "mlkernels compiled ops",
                                              -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&mlkernels_module);
  if (module == nullptr) return nullptr;
#ifdef MLK_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", MLK_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", MLK_CUDA_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
