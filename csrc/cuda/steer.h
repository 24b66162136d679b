// Torch-free launcher of the CUDA `steer` kernel (math: csrc/include/actshift/steer.h).
// It takes raw device pointers and a stream so the kernel builds and can be tested without torch;
// csrc/torch_bindings_cuda.cpp is the only place that turns tensors into these arguments.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace actshift {
namespace cuda {

// y[r, :] = x[r, :] + Σ_j c_j · vectors[s, j, :] for every row r, asynchronously on `stream`.
//   dtype:    element type of x and y; vectors, weights, strength and gate are always fp32.
//   x:        [rows, d] of `dtype`, last dim contiguous, `x_stride` elements between rows.
//   y:        [rows, d] of `dtype`, last dim contiguous, `y_stride` elements between rows; either
//             exactly x (in-place steering) or not overlapping it.
//   vectors:  [num_plans, m, d], weights: [num_plans, m], strength: [num_plans]; 0 <= m <= 16.
//   gate:     [rows] or nullptr (gate 1).
//   slot:     [rows] of int32 (int64 if slot_is_int64) or nullptr (plan 0 for every row); rows whose
//             slot is outside [0, num_plans) are copied to y bit-exactly.
// Returns cudaSuccess without launching when rows == 0 or d == 0, cudaErrorInvalidValue for
// arguments the kernel cannot handle, otherwise the launch error (cudaGetLastError).
cudaError_t launch_steer(DType dtype, const void* x, int64_t x_stride, void* y, int64_t y_stride,
                         int64_t rows, int64_t d, const float* vectors, const float* weights,
                         const float* strength, int64_t num_plans, int m, const float* gate,
                         const void* slot, bool slot_is_int64, cudaStream_t stream);

}  // namespace cuda
}  // namespace actshift
