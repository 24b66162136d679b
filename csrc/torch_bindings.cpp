// Every actshift op schema, in one TORCH_LIBRARY. CPU implementations are registered here; CUDA
// implementations are registered from csrc/torch_bindings_cuda.cpp, compiled only when torch has CUDA.
// Python-side fake (meta) implementations live in python/actshift/ops/ so torch.compile can trace.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(actshift, m) {
  // Additive steering over rows of hidden states (see csrc/include/actshift/steer.h for the math):
  //   x [rows, d] fp32/fp16/bf16, last dim contiguous (any row stride);
  //   vectors [S, m, d] fp32, weights [S, m] fp32, strength [S] fp32: a bank of S plans;
  //   gate [rows] fp32 (optional), slot [rows] int32/int64 (optional; -1 leaves a row untouched).
  // `steer` returns a new contiguous [rows, d] tensor of x's dtype; `steer_out` writes into `out`
  // ([rows, d], x's dtype, contiguous last dim), which may be x itself for in-place steering.
  m.def("steer(Tensor x, Tensor vectors, Tensor weights, Tensor strength, Tensor? gate, "
        "Tensor? slot) -> Tensor");
  m.def("steer_out(Tensor x, Tensor vectors, Tensor weights, Tensor strength, Tensor? gate, "
        "Tensor? slot, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(actshift, CPU, m) {
  m.impl("steer", &actshift::steer_cpu);
  m.impl("steer_out", &actshift::steer_out_cpu);
}

// `import actshift._C` only needs to load this library so the static registrations above run.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
