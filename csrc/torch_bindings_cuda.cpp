// CUDA implementations of the actshift ops, registered for the CUDA dispatch key. Compiled only
// when torch has CUDA (ACTSHIFT_WITH_CUDA). This file is the only bridge between tensors and the
// torch-free launchers of csrc/cuda: it validates, allocates the outputs, picks the device and
// stream, and turns launch errors into Python exceptions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/percentile.h"
#include "cuda/route.h"
#include "cuda/steer.h"
#include "ops.h"
// sparse ops
#include "cuda/relu_ffn.h"
#include "cuda/sparse_linear.h"
#include "cuda/sparse_threshold.h"

namespace actshift {

namespace {

// The launchers' element type; every op's checks admit exactly these three dtypes.
cuda::DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat  ? cuda::DType::kFloat32
         : t.scalar_type() == at::kHalf ? cuda::DType::kFloat16
                                        : cuda::DType::kBFloat16;
}

// The checks admit per-row tensors (gate, slot, row_weights) of any row stride; the CUDA kernels
// index them densely, so a strided one (an expanded per-row value) becomes a small dense copy.
std::optional<at::Tensor> dense_rows(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Launches the kernel into `out` (already checked against x); x and every argument are on the
// current CUDA device.
void launch(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
            const at::Tensor& strength, const std::optional<at::Tensor>& gate_arg,
            const std::optional<at::Tensor>& slot_arg, at::Tensor& out) {
  const std::optional<at::Tensor> gate = dense_rows(gate_arg), slot = dense_rows(slot_arg);
  const cudaError_t err = cuda::launch_steer(
      dtype_of(x), x.const_data_ptr(), x.stride(0), out.mutable_data_ptr(), out.stride(0),
      x.size(0), x.size(1), vectors.const_data_ptr<float>(), weights.const_data_ptr<float>(),
      strength.const_data_ptr<float>(), vectors.size(0), static_cast<int>(vectors.size(1)),
      gate.has_value() ? gate->const_data_ptr<float>() : nullptr,
      slot.has_value() ? slot->const_data_ptr() : nullptr,
      slot.has_value() && slot->scalar_type() == at::kLong, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "steer: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Every op's shared checks put all its tensors on the device of its first input (`arg`), so
// checking that one covers them all.
void check_cuda(const at::Tensor& t, const char* op, const char* arg = "x") {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", arg, " must be a CUDA tensor for the cuda backend, got ",
                    t.device());
}

// --- steer_program
// Launches the program into `out` and `monitors` (both allocated and checked by the caller).
void launch_program(const at::Tensor& x, const SteerProgram& p,
                    const std::optional<at::Tensor>& gate_arg,
                    const std::optional<at::Tensor>& slot_arg,
                    const std::optional<at::Tensor>& row_weights_arg, at::Tensor& out,
                    at::Tensor& monitors) {
  if (x.size(0) == 0) return;
  const std::optional<at::Tensor> gate = dense_rows(gate_arg), slot = dense_rows(slot_arg),
                                  row_weights = dense_rows(row_weights_arg);
  // The launcher stages a row in shared memory; the bound depends on the device.
  const int64_t max_d = cuda::program_max_hidden_size();
  TORCH_CHECK_VALUE(x.size(1) <= max_d, "steer_program: x has hidden size ", x.size(1),
                    "; the cuda backend holds a row in shared memory, up to ", max_d,
                    " on this device (use backend='cpu')");
  const auto ptr = [](const at::Tensor& t) { return t.numel() > 0 ? t.const_data_ptr<float>() : nullptr; };
  const cuda::SteerProgramBank bank{
      p.meta.const_data_ptr<int32_t>(), p.scalars.const_data_ptr<float>(), ptr(p.ablate),
      ptr(p.targets), ptr(p.affine), ptr(p.vectors), ptr(p.weights),
      p.neuron_idx.numel() > 0 ? p.neuron_idx.const_data_ptr<int32_t>() : nullptr,
      ptr(p.neuron_val), ptr(p.condition), ptr(p.monitor), p.meta.size(0), p.ablate.size(1),
      p.vectors.size(1), p.neuron_idx.size(1), p.monitor.size(1)};
  const cudaError_t err = cuda::launch_steer_program(
      dtype_of(x), x.const_data_ptr(), x.stride(0), out.mutable_data_ptr(), out.stride(0),
      x.size(0), x.size(1), bank, gate.has_value() ? gate->const_data_ptr<float>() : nullptr,
      slot.has_value() ? slot->const_data_ptr() : nullptr,
      slot.has_value() && slot->scalar_type() == at::kLong,
      row_weights.has_value() ? row_weights->const_data_ptr<float>() : nullptr,
      monitors.mutable_data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "steer_program: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}
// --- end steer_program

}  // namespace

at::Tensor steer_cuda(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                      const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& slot) {
  check_steer_args(x, vectors, weights, strength, gate, slot);
  check_cuda(x, "steer");
  // The launch targets the current device; make that x's device for the rest of this call.
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  launch(x, vectors, weights, strength, gate, slot, y);
  return y;
}

void steer_out_cuda(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                    const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                    const std::optional<at::Tensor>& slot, at::Tensor& out) {
  check_steer_args(x, vectors, weights, strength, gate, slot);
  check_cuda(x, "steer");
  check_steer_out(x, out);
  const c10::cuda::CUDAGuard device_guard(x.device());
  launch(x, vectors, weights, strength, gate, slot, out);
}

std::tuple<at::Tensor, at::Tensor> percentile_scale_cuda(const at::Tensor& z, const at::Tensor& k,
                                                         int64_t method,
                                                         std::optional<double> clip) {
  check_percentile_args(z, k, method, clip);
  check_cuda(z, "percentile_scale", "z");
  const c10::cuda::CUDAGuard device_guard(z.device());
  auto [y, r] = percentile_outputs(z, method);
  // The kernel reads k only for methods that select; a k outside [1, D] (not checked for CUDA
  // tensors, which would need a device sync) gives that row NaN in y and r.
  const cudaError_t err = cuda::launch_percentile_scale(
      dtype_of(z), z.const_data_ptr(), y.numel() > 0 ? y.mutable_data_ptr() : nullptr,
      r.numel() > 0 ? r.mutable_data_ptr<float>() : nullptr, k.const_data_ptr<int32_t>(), z.size(0),
      z.size(1), static_cast<int>(method), clip.has_value(), static_cast<float>(clip.value_or(0.0)),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "percentile_scale: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {y, r};
}

std::tuple<at::Tensor, at::Tensor> adascale_stats_cuda(const at::Tensor& z,
                                                       const at::Tensor& z_perturbed, int64_t k1,
                                                       int64_t k2) {
  check_adascale_args(z, z_perturbed, k1, k2);
  check_cuda(z, "adascale_stats", "z");
  const c10::cuda::CUDAGuard device_guard(z.device());
  const at::TensorOptions fp32 = z.options().dtype(at::kFloat);
  at::Tensor q = at::empty({z.size(0)}, fp32);
  at::Tensor c_o = at::empty({z.size(0)}, fp32);
  const cudaError_t err = cuda::launch_adascale_stats(
      dtype_of(z), z.const_data_ptr(), z_perturbed.const_data_ptr(), q.mutable_data_ptr<float>(),
      c_o.mutable_data_ptr<float>(), z.size(0), z.size(1), static_cast<int>(k1),
      static_cast<int>(k2), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "adascale_stats: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {q, c_o};
}

// --- sparse ops (kernels: csrc/cuda/sparse_threshold.cu, sparse_linear.cu, relu_ffn.cu) ---------

namespace {

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

}  // namespace

at::Tensor sparse_threshold_cuda(const at::Tensor& x, const at::Tensor& threshold) {
  check_sparse_threshold_args(x, threshold);
  check_cuda(x, "sparse_threshold");
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  // Threshold values are not checked on the GPU (a device sync); the wrapper checks them eagerly.
  const cudaError_t err = cuda::launch_sparse_threshold(
      dtype_of(x), x.const_data_ptr(), x.stride(0), y.mutable_data_ptr(), x.size(0), x.size(1),
      threshold.const_data_ptr<float>(), threshold.numel() > 1, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sparse_threshold: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return y;
}

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& weight_t,
                              const at::Tensor& threshold, const std::optional<at::Tensor>& bias) {
  check_sparse_linear_args(x, weight_t, threshold, bias);
  check_cuda(x, "sparse_linear");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t rows = x.size(0), out = weight_t.size(1);
  at::Tensor y = at::empty({rows, out}, x.options());
  // fp32 split-K accumulator from the caching allocator (stream-ordered, so graph capture works).
  at::Tensor workspace = at::empty({rows * out}, x.options().dtype(at::kFloat));
  const cudaError_t err = cuda::launch_sparse_linear(
      dtype_of(x), x.const_data_ptr(), x.stride(0), weight_t.const_data_ptr(),
      threshold.const_data_ptr<float>(), threshold.numel() > 1, data_or_null(bias),
      y.mutable_data_ptr(), workspace.mutable_data_ptr<float>(), rows, x.size(1), out,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sparse_linear: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return y;
}

at::Tensor relu_ffn_cuda(const at::Tensor& x, const at::Tensor& w_gate,
                         const std::optional<at::Tensor>& w_up, const at::Tensor& w_down_t,
                         int64_t act, double threshold, const std::optional<at::Tensor>& b_gate,
                         const std::optional<at::Tensor>& b_up,
                         const std::optional<at::Tensor>& b_down) {
  check_relu_ffn_args(x, w_gate, w_up, w_down_t, act, threshold, b_gate, b_up, b_down);
  check_cuda(x, "relu_ffn");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t rows = x.size(0), d = x.size(1), ffn = w_gate.size(0);
  at::Tensor y = at::empty({rows, d}, x.options());
  // The fp32 down-projection accumulator [rows, d] followed by the fp32 hidden h [rows, ffn].
  at::Tensor workspace = at::empty({rows * (ffn + d)}, x.options().dtype(at::kFloat));
  const cudaError_t err = cuda::launch_relu_ffn(
      dtype_of(x), x.const_data_ptr(), x.stride(0), w_gate.const_data_ptr(), data_or_null(w_up),
      w_down_t.const_data_ptr(), static_cast<int>(act), static_cast<float>(threshold),
      data_or_null(b_gate), data_or_null(b_up), data_or_null(b_down), y.mutable_data_ptr(),
      workspace.mutable_data_ptr<float>(), rows, d, ffn, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "relu_ffn: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

// --- end sparse ops ------------------------------------------------------------------------------
// --- steer_program
// Metadata values are not checked here (that would read device memory and sync): the kernel clamps
// counts to the padded sizes and skips neuron indices outside [0, d).
std::tuple<at::Tensor, at::Tensor> steer_program_cuda(
    const at::Tensor& x, const at::Tensor& meta, const at::Tensor& scalars, const at::Tensor& ablate,
    const at::Tensor& targets, const at::Tensor& affine, const at::Tensor& vectors,
    const at::Tensor& weights, const at::Tensor& neuron_idx, const at::Tensor& neuron_val,
    const at::Tensor& condition, const at::Tensor& monitor, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& slot, const std::optional<at::Tensor>& row_weights) {
  const SteerProgram p{meta,    scalars,    ablate,     targets,   affine, vectors,
                       weights, neuron_idx, neuron_val, condition, monitor};
  check_steer_program_args(x, p, gate, slot, row_weights);
  check_cuda(x, "steer_program");
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor monitors = steer_program_monitors(x, p);
  launch_program(x, p, gate, slot, row_weights, y, monitors);
  return {y, monitors};
}

at::Tensor steer_program_out_cuda(
    const at::Tensor& x, const at::Tensor& meta, const at::Tensor& scalars, const at::Tensor& ablate,
    const at::Tensor& targets, const at::Tensor& affine, const at::Tensor& vectors,
    const at::Tensor& weights, const at::Tensor& neuron_idx, const at::Tensor& neuron_val,
    const at::Tensor& condition, const at::Tensor& monitor, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& slot, const std::optional<at::Tensor>& row_weights,
    at::Tensor& out) {
  const SteerProgram p{meta,    scalars,    ablate,     targets,   affine, vectors,
                       weights, neuron_idx, neuron_val, condition, monitor};
  check_steer_program_args(x, p, gate, slot, row_weights);
  check_cuda(x, "steer_program_out");
  check_steer_out(x, out, "steer_program_out");
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor monitors = steer_program_monitors(x, p);
  launch_program(x, p, gate, slot, row_weights, out, monitors);
  return monitors;
}
// --- end steer_program

// --- route
std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits, int64_t k,
                                              const std::optional<at::Tensor>& offsets,
                                              const std::optional<at::Tensor>& modes,
                                              const std::optional<at::Tensor>& slot,
                                              const std::optional<at::Tensor>& bias, int64_t kind,
                                              bool renorm, int64_t n_group, int64_t topk_group,
                                              double scale) {
  check_route_args(logits, k, offsets, modes, slot, bias, kind, n_group, topk_group, scale);
  check_cuda(logits, "route", "logits");
  TORCH_CHECK_VALUE(logits.size(1) <= cuda::kRouteMaxExperts && k <= cuda::kRouteMaxK,
                    "route: the cuda backend routes up to ", cuda::kRouteMaxExperts, " experts and k <= ",
                    cuda::kRouteMaxK, ", got E=", logits.size(1), ", k=", k, " (use backend='triton')");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  auto [idx, w] = route_outputs(logits, k);
  const cudaError_t err = cuda::launch_route(
      dtype_of(logits), logits.const_data_ptr(), logits.stride(0), logits.size(0), logits.size(1), k,
      offsets.has_value() ? offsets->const_data_ptr<float>() : nullptr,
      modes.has_value() ? modes->const_data_ptr<int8_t>() : nullptr,
      offsets.has_value() ? offsets->size(0) : 0, slot.has_value() ? slot->const_data_ptr() : nullptr,
      slot.has_value() && slot->scalar_type() == at::kLong,
      bias.has_value() ? bias->const_data_ptr<float>() : nullptr, static_cast<int>(kind), renorm,
      n_group, topk_group, static_cast<float>(scale), idx.mutable_data_ptr<int64_t>(),
      w.mutable_data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "route: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {idx, w};
}
// --- end route

}  // namespace actshift

TORCH_LIBRARY_IMPL(actshift, CUDA, m) {
  m.impl("steer_program", &actshift::steer_program_cuda);
  m.impl("steer_program_out", &actshift::steer_program_out_cuda);
  m.impl("steer", &actshift::steer_cuda);
  m.impl("steer_out", &actshift::steer_out_cuda);
  m.impl("percentile_scale", &actshift::percentile_scale_cuda);
  m.impl("adascale_stats", &actshift::adascale_stats_cuda);
  // sparse ops
  m.impl("sparse_threshold", &actshift::sparse_threshold_cuda);
  m.impl("sparse_linear", &actshift::sparse_linear_cuda);
  m.impl("relu_ffn", &actshift::relu_ffn_cuda);
  m.impl("route", &actshift::route_cuda);
}
