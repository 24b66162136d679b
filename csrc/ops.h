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

#ifdef ACTSHIFT_WITH_CUDA
at::Tensor steer_cuda(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                      const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& slot);
void steer_out_cuda(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                    const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                    const std::optional<at::Tensor>& slot, at::Tensor& out);
#endif

// Validates the steer arguments (shapes, dtypes, devices, contiguity) for any backend. Slot *values*
// are checked by the CPU kernel while it runs; on CUDA an out-of-range slot leaves its row untouched.
void check_steer_args(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                      const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& slot);

// Checks the `out` of steer_out: x's shape, dtype and device, a contiguous last dim, and either
// exactly x (in place) or no memory overlap with x.
void check_steer_out(const at::Tensor& x, const at::Tensor& out);

}  // namespace actshift
