// Torch-free launcher of the CUDA `sparse_linear` kernels (shared split-K code: sparse_splitk.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace actshift {
namespace cuda {

// y = sparse_threshold(x, t) @ weight_t + bias with fp32 accumulation, asynchronously on `stream`.
//   dtype:      element type of x, weight_t, bias and y.
//   x:          [rows, in], last dim contiguous, `x_stride` elements between rows.
//   weight_t:   [in, out] contiguous; y: [rows, out] contiguous; bias: [out] or nullptr.
//   threshold:  fp32 device pointer: `in` values when per_channel, else one for every input.
//   workspace:  rows * out fp32 values, 16-byte aligned for the vector path (zeroed and used here;
//               free once the stream passes it).
// Groups of up to 16 rows read the weight rows of their union of active inputs (|x| > t) once.
// Returns cudaSuccess without launching when rows == 0 or out == 0, cudaErrorInvalidValue for
// arguments the kernels cannot handle, otherwise the first launch error.
cudaError_t launch_sparse_linear(DType dtype, const void* x, int64_t x_stride, const void* weight_t,
                                 const float* threshold, bool per_channel, const void* bias,
                                 void* y, float* workspace, int64_t rows, int64_t in, int64_t out,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace actshift
