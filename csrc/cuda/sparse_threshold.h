// Torch-free launcher of the CUDA `sparse_threshold` kernel (predicate: csrc/include/actshift/sparse.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace actshift {
namespace cuda {

// y[r, i] = x[r, i] if |x[r, i]| > t_i else 0 (NaN kept), asynchronously on `stream`.
//   dtype:       element type of x and y.
//   x:           [rows, n], last dim contiguous, `x_stride` elements between rows.
//   y:           [rows, n] contiguous, not overlapping x.
//   threshold:   fp32 device pointer: n values when per_channel, else one value for every channel.
// Returns cudaSuccess without launching when rows == 0 or n == 0, cudaErrorInvalidValue for
// arguments the kernel cannot handle, otherwise the launch error (cudaGetLastError).
cudaError_t launch_sparse_threshold(DType dtype, const void* x, int64_t x_stride, void* y,
                                    int64_t rows, int64_t n, const float* threshold,
                                    bool per_channel, cudaStream_t stream);

}  // namespace cuda
}  // namespace actshift
