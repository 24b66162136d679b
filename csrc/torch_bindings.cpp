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

  // --- steer_program: the full steering program of DESIGN.md in one pass (math and layout:
  // csrc/include/actshift/steer.h, actshift.reference.steer_program). A bank of S plans, fp32
  // unless noted, zero-padded to the largest plan:
  //   meta [S, 5] int32 {flags, k, m, n, p}, scalars [S, 2] {strength, threshold},
  //   ablate [S, K <= 16, d], targets [S, K], affine [S, 2 or 0, d] {scale, bias},
  //   vectors [S, M <= 16, d], weights [S, M], neuron_idx [S, N] int32, neuron_val [S, 2, N] {mul, add},
  //   condition [S, 1 or 0, d], monitor [S, P <= 16, d];
  //   gate [rows] fp32, slot [rows] int32/int64, row_weights [rows, M] fp32 (all optional).
  // Returns (y like `steer`, monitors [rows, P] fp32); steer_program_out writes y into `out`
  // (may be x) and returns the monitors.
  m.def("steer_program(Tensor x, Tensor meta, Tensor scalars, Tensor ablate, Tensor targets, "
        "Tensor affine, Tensor vectors, Tensor weights, Tensor neuron_idx, Tensor neuron_val, "
        "Tensor condition, Tensor monitor, Tensor? gate, Tensor? slot, Tensor? row_weights) "
        "-> (Tensor, Tensor)");
  m.def("steer_program_out(Tensor x, Tensor meta, Tensor scalars, Tensor ablate, Tensor targets, "
        "Tensor affine, Tensor vectors, Tensor weights, Tensor neuron_idx, Tensor neuron_val, "
        "Tensor condition, Tensor monitor, Tensor? gate, Tensor? slot, Tensor? row_weights, "
        "Tensor(a!) out) -> Tensor");
  // --- end steer_program

  // Percentile scaling of rows (see csrc/include/actshift/percentile.h for the math):
  //   z [N, D] fp32/fp16/bf16 (contiguous), k [N] int32 kept elements per row (1 <= k <= D),
  //   method 0 ratio, 1 scale, 2 ash_p, 3 ash_b, 4 ash_s, 5 react; clip: optional min(z, clip) first.
  // Returns (y [N, D] of z's dtype, or [0, D] for ratio; r [N] fp32 = s1/s2, or [0] for react).
  m.def("percentile_scale(Tensor z, Tensor k, int method, float? clip) -> (Tensor, Tensor)");
  // AdaSCALE statistics: Q = Σ|z − z̃| over the top-k1 of z, C_o = Σ relu(z̃) over the top-k2 of z
  // (both [N] fp32); z and z_perturbed [N, D] of one dtype.
  m.def("adascale_stats(Tensor z, Tensor z_perturbed, int k1, int k2) -> (Tensor, Tensor)");
  // --- sparse ops (math in csrc/include/actshift/sparse.h; x is [rows, n], contiguous) ---------
  // threshold: fp32 [1] (scalar) or [n] (per input channel), finite and >= 0, on x's device.
  // sparse_threshold: y = x where |x| > t else 0 (NaN stays NaN), x's dtype.
  m.def("sparse_threshold(Tensor x, Tensor threshold) -> Tensor");
  // sparse_linear: y = sparse_threshold(x, t) @ weight_t + bias, fp32 accumulation, x's dtype;
  // weight_t [in, out] contiguous (linear.weight.t()), bias [out]; both of x's dtype.
  m.def("sparse_linear(Tensor x, Tensor weight_t, Tensor threshold, Tensor? bias) -> Tensor");
  // relu_ffn: y = W_down (gate_act(W_gate x + b_gate) * up_act(W_up x + b_up)) + b_down, or the
  // non-gated form without w_up; w_gate, w_up, w_down_t all [ffn, d] of x's dtype; act 0 relu,
  // 1 fatrelu, 2 relu2, 3 drelu, 4 cats; threshold used by fatrelu and cats (0 otherwise).
  m.def("relu_ffn(Tensor x, Tensor w_gate, Tensor? w_up, Tensor w_down_t, int act, "
        "float threshold, Tensor? b_gate, Tensor? b_up, Tensor? b_down) -> Tensor");
  // --- end sparse ops ----------------------------------------------------------------------------
  // --- route: MoE routing with per-row expert edits (math: csrc/include/actshift/route.h) ------
  //   logits [rows, E] fp32/fp16/bf16 (contiguous last dim); k picks per row (1 <= k <= E);
  //   a bank of S plans or none: offsets [S, E] fp32 (strength already applied), modes [S, E]
  //   int8 (0 free, 1 off, 2 forced on); slot [rows] int32/int64 (-1: unedited; default plan 0);
  //   bias [E] fp32 (sigmoid's correction bias); kind 0 softmax, 1 sigmoid; renorm; n_group
  //   (<= 32, divides E) and topk_group (group-limited top-k, sigmoid); scale multiplies weights.
  // Returns (indices [rows, k] int64, weights [rows, k] fp32), picks in rank order.
  m.def("route(Tensor logits, int k, Tensor? offsets, Tensor? modes, Tensor? slot, Tensor? bias, "
        "int kind, bool renorm, int n_group, int topk_group, float scale) -> (Tensor, Tensor)");
  // --- end route
}

TORCH_LIBRARY_IMPL(actshift, CPU, m) {
  m.impl("steer", &actshift::steer_cpu);
  m.impl("steer_out", &actshift::steer_out_cpu);
  m.impl("steer_program", &actshift::steer_program_cpu);
  m.impl("steer_program_out", &actshift::steer_program_out_cpu);
  m.impl("percentile_scale", &actshift::percentile_scale_cpu);
  m.impl("adascale_stats", &actshift::adascale_stats_cpu);
  // sparse ops
  m.impl("sparse_threshold", &actshift::sparse_threshold_cpu);
  m.impl("sparse_linear", &actshift::sparse_linear_cpu);
  m.impl("relu_ffn", &actshift::relu_ffn_cpu);
  m.impl("route", &actshift::route_cpu);
}

// `import actshift._C` only needs to load this library so the static registrations above run.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
