// Host-side declarations and argument checks of the torch-facing op implementations.
// Checks raise ValueError/TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) naming the argument,
// so direct torch.ops.actshift.* calls fail as clearly as the Python wrappers.
#pragma once

#include <optional>

#include <ATen/ATen.h>

namespace actshift {

at::Tensor steer_cpu(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                     const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                     const std::optional<at::Tensor>& slot);
void steer_out_cpu(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                   const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                   const std::optional<at::Tensor>& slot, at::Tensor& out);

// --- steer_program (the full steering program; schema in torch_bindings.cpp) -------------------
// The per-plan tensors of a bank, in schema order.
struct SteerProgram {
  const at::Tensor& meta;
  const at::Tensor& scalars;
  const at::Tensor& ablate;
  const at::Tensor& targets;
  const at::Tensor& affine;
  const at::Tensor& vectors;
  const at::Tensor& weights;
  const at::Tensor& neuron_idx;
  const at::Tensor& neuron_val;
  const at::Tensor& condition;
  const at::Tensor& monitor;
};
std::tuple<at::Tensor, at::Tensor> steer_program_cpu(
    const at::Tensor& x, const at::Tensor& meta, const at::Tensor& scalars, const at::Tensor& ablate,
    const at::Tensor& targets, const at::Tensor& affine, const at::Tensor& vectors,
    const at::Tensor& weights, const at::Tensor& neuron_idx, const at::Tensor& neuron_val,
    const at::Tensor& condition, const at::Tensor& monitor, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& slot, const std::optional<at::Tensor>& row_weights);
at::Tensor steer_program_out_cpu(
    const at::Tensor& x, const at::Tensor& meta, const at::Tensor& scalars, const at::Tensor& ablate,
    const at::Tensor& targets, const at::Tensor& affine, const at::Tensor& vectors,
    const at::Tensor& weights, const at::Tensor& neuron_idx, const at::Tensor& neuron_val,
    const at::Tensor& condition, const at::Tensor& monitor, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& slot, const std::optional<at::Tensor>& row_weights,
    at::Tensor& out);
// Validates shapes, dtypes, devices and contiguity of every steer_program argument (any backend).
void check_steer_program_args(const at::Tensor& x, const SteerProgram& p,
                              const std::optional<at::Tensor>& gate,
                              const std::optional<at::Tensor>& slot,
                              const std::optional<at::Tensor>& row_weights);
// Validates the *values* of meta (counts within the padded sizes, known flags, parts present for
// their flags) and neuron_idx (in [0, d)); reads host memory, so CPU only. GPU kernels clamp instead.
void check_steer_program_values(const at::Tensor& x, const SteerProgram& p);
// The monitors output of steer_program: [rows, P] fp32 on x's device.
at::Tensor steer_program_monitors(const at::Tensor& x, const SteerProgram& p);
// --- end steer_program

std::tuple<at::Tensor, at::Tensor> percentile_scale_cpu(const at::Tensor& z, const at::Tensor& k,
                                                        int64_t method, std::optional<double> clip);
std::tuple<at::Tensor, at::Tensor> adascale_stats_cpu(const at::Tensor& z,
                                                      const at::Tensor& z_perturbed, int64_t k1,
                                                      int64_t k2);

#ifdef ACTSHIFT_WITH_CUDA
at::Tensor steer_cuda(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                      const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& slot);
void steer_out_cuda(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                    const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                    const std::optional<at::Tensor>& slot, at::Tensor& out);
std::tuple<at::Tensor, at::Tensor> percentile_scale_cuda(const at::Tensor& z, const at::Tensor& k,
                                                         int64_t method,
                                                         std::optional<double> clip);
std::tuple<at::Tensor, at::Tensor> adascale_stats_cuda(const at::Tensor& z,
                                                       const at::Tensor& z_perturbed, int64_t k1,
                                                       int64_t k2);
#endif

// Validates the steer arguments (shapes, dtypes, devices, contiguity) for any backend. Slot *values*
// are checked by the CPU op before it writes anything; on CUDA an out-of-range slot leaves its row
// untouched.
void check_steer_args(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                      const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& slot);

// Checks the `out` of steer_out / steer_program_out (`op` names it in messages): x's shape, dtype
// and device, a contiguous last dim, no internal overlap, and either exactly x (in place) or no
// element shared with x.
void check_steer_out(const at::Tensor& x, const at::Tensor& out, const char* op = "steer");

// Validates the percentile_scale arguments (z [N, D] float, k [N] int32 on z's device with values
// checked on the CPU only, method in range, clip finite) for any backend.
void check_percentile_args(const at::Tensor& z, const at::Tensor& k, int64_t method,
                           std::optional<double> clip);
// Validates the adascale_stats arguments (same-shaped float z and z_perturbed, 1 <= k1, k2 <= D).
void check_adascale_args(const at::Tensor& z, const at::Tensor& z_perturbed, int64_t k1, int64_t k2);
// The outputs of percentile_scale for `method`: y ([N, D], or [0, D] for ratio) and r ([N], or [0]
// for react).
std::tuple<at::Tensor, at::Tensor> percentile_outputs(const at::Tensor& z, int64_t method);

// --- sparse ops (sparse_threshold, sparse_linear, relu_ffn; math in actshift/sparse.h) ---------
at::Tensor sparse_threshold_cpu(const at::Tensor& x, const at::Tensor& threshold);
at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& weight_t,
                             const at::Tensor& threshold, const std::optional<at::Tensor>& bias);
at::Tensor relu_ffn_cpu(const at::Tensor& x, const at::Tensor& w_gate,
                        const std::optional<at::Tensor>& w_up, const at::Tensor& w_down_t,
                        int64_t act, double threshold, const std::optional<at::Tensor>& b_gate,
                        const std::optional<at::Tensor>& b_up,
                        const std::optional<at::Tensor>& b_down);
#ifdef ACTSHIFT_WITH_CUDA
at::Tensor sparse_threshold_cuda(const at::Tensor& x, const at::Tensor& threshold);
at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& weight_t,
                              const at::Tensor& threshold, const std::optional<at::Tensor>& bias);
at::Tensor relu_ffn_cuda(const at::Tensor& x, const at::Tensor& w_gate,
                         const std::optional<at::Tensor>& w_up, const at::Tensor& w_down_t,
                         int64_t act, double threshold, const std::optional<at::Tensor>& b_gate,
                         const std::optional<at::Tensor>& b_up,
                         const std::optional<at::Tensor>& b_down);
#endif
// Validate the sparse ops' arguments for any backend (dtypes, shapes, devices, contiguity, act
// code, threshold finite and >= 0; a threshold tensor's values on the CPU only). `op` names the op
// in messages (sparse_linear reuses the threshold check).
void check_sparse_threshold_args(const at::Tensor& x, const at::Tensor& threshold,
                                 const char* op = "sparse_threshold");
void check_sparse_linear_args(const at::Tensor& x, const at::Tensor& weight_t,
                              const at::Tensor& threshold, const std::optional<at::Tensor>& bias);
void check_relu_ffn_args(const at::Tensor& x, const at::Tensor& w_gate,
                         const std::optional<at::Tensor>& w_up, const at::Tensor& w_down_t,
                         int64_t act, double threshold, const std::optional<at::Tensor>& b_gate,
                         const std::optional<at::Tensor>& b_up,
                         const std::optional<at::Tensor>& b_down);
// --- end sparse ops ------------------------------------------------------------------------------

// --- route (MoE routing with per-row expert edits; math in actshift/route.h) ----------------------
std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits, int64_t k,
                                             const std::optional<at::Tensor>& offsets,
                                             const std::optional<at::Tensor>& modes,
                                             const std::optional<at::Tensor>& slot,
                                             const std::optional<at::Tensor>& bias, int64_t kind,
                                             bool renorm, int64_t n_group, int64_t topk_group,
                                             double scale);
#ifdef ACTSHIFT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits, int64_t k,
                                              const std::optional<at::Tensor>& offsets,
                                              const std::optional<at::Tensor>& modes,
                                              const std::optional<at::Tensor>& slot,
                                              const std::optional<at::Tensor>& bias, int64_t kind,
                                              bool renorm, int64_t n_group, int64_t topk_group,
                                              double scale);
#endif
// Shapes, dtypes, devices, contiguity and the scalar arguments, for any backend.
void check_route_args(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& offsets,
                      const std::optional<at::Tensor>& modes, const std::optional<at::Tensor>& slot,
                      const std::optional<at::Tensor>& bias, int64_t kind, int64_t n_group,
                      int64_t topk_group, double scale);
// Values of the bank (finite offsets, known modes, forced <= k, live >= k per plan) and of slot
// (in [-1, S)); reads host memory, so CPU only.
void check_route_values(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& offsets,
                        const std::optional<at::Tensor>& modes, const std::optional<at::Tensor>& slot);
// (indices [rows, k] int64, weights [rows, k] fp32) on logits' device.
std::tuple<at::Tensor, at::Tensor> route_outputs(const at::Tensor& logits, int64_t k);
// --- end route -----------------------------------------------------------------------------------

}  // namespace actshift
