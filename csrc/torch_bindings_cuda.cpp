// CUDA implementations of the actshift ops, registered for the CUDA dispatch key. Compiled only
// when torch has CUDA (ACTSHIFT_WITH_CUDA). This file is the only bridge between tensors and the
// torch-free launchers of csrc/cuda: it validates, allocates the output, picks the device and stream,
// and turns launch errors into Python exceptions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/steer.h"
#include "ops.h"

namespace actshift {

namespace {

// Launches the kernel into `out` (already checked against x); x and every argument are on the
// current CUDA device.
void launch(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
            const at::Tensor& strength, const std::optional<at::Tensor>& gate,
            const std::optional<at::Tensor>& slot, at::Tensor& out) {
  // check_steer_args admits exactly these three dtypes.
  const cuda::DType dtype = x.scalar_type() == at::kFloat  ? cuda::DType::kFloat32
                            : x.scalar_type() == at::kHalf ? cuda::DType::kFloat16
                                                           : cuda::DType::kBFloat16;
  const cudaError_t err = cuda::launch_steer(
      dtype, x.const_data_ptr(), x.stride(0), out.mutable_data_ptr(), out.stride(0), x.size(0),
      x.size(1), vectors.const_data_ptr<float>(), weights.const_data_ptr<float>(),
      strength.const_data_ptr<float>(), vectors.size(0), static_cast<int>(vectors.size(1)),
      gate.has_value() ? gate->const_data_ptr<float>() : nullptr,
      slot.has_value() ? slot->const_data_ptr() : nullptr,
      slot.has_value() && slot->scalar_type() == at::kLong, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "steer: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_cuda(const at::Tensor& x) {
  // check_steer_args puts every tensor on x's device, so checking x covers them all.
  TORCH_CHECK_VALUE(x.is_cuda(), "steer: x must be a CUDA tensor for the cuda backend, got ",
                    x.device());
}

}  // namespace

at::Tensor steer_cuda(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                      const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& slot) {
  check_steer_args(x, vectors, weights, strength, gate, slot);
  check_cuda(x);
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
  check_cuda(x);
  check_steer_out(x, out);
  const c10::cuda::CUDAGuard device_guard(x.device());
  launch(x, vectors, weights, strength, gate, slot, out);
}

}  // namespace actshift

TORCH_LIBRARY_IMPL(actshift, CUDA, m) {
  m.impl("steer", &actshift::steer_cuda);
  m.impl("steer_out", &actshift::steer_out_cuda);
}
