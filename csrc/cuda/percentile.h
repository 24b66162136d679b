// Torch-free launchers of the CUDA percentile kernels: percentile_scale (ASH, SCALE, ReAct, ratio)
// and adascale_stats (math: csrc/include/actshift/percentile.h). They take raw device pointers and
// a stream so the kernels build and can be tested without torch; csrc/torch_bindings_cuda.cpp
// turns tensors into these arguments.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace actshift {
namespace cuda {

// Percentile scaling of each row of z, asynchronously on `stream`.
//   z:      [rows, d] of `dtype`, contiguous.
//   y:      [rows, d] of `dtype`, contiguous; not written (may be null) for method kRatio.
//   r:      [rows] fp32, r = s1 / s2; not written (may be null) for method kReact.
//   k:      [rows] int32 kept elements per row; unused (may be null) for kReact. A row whose k is
//           outside [1, d] gets NaN in y and r, like a row holding NaN or Inf.
//   method: percentile::Method (0..5); has_clip/clip: z becomes min(z, clip) first.
// Returns cudaSuccess without launching when rows == 0, cudaErrorInvalidValue for arguments the
// kernel cannot handle (d > INT32_MAX, unknown method), otherwise the launch error.
cudaError_t launch_percentile_scale(DType dtype, const void* z, void* y, float* r, const int32_t* k,
                                    int64_t rows, int64_t d, int method, bool has_clip, float clip,
                                    cudaStream_t stream);

// AdaSCALE statistics of each row, asynchronously on `stream`: q = Σ |z − z̃| over the top-k1
// positions of z, c_o = Σ relu(z̃) over its top-k2 positions (ties kept in index order).
//   z, z_perturbed: [rows, d] of `dtype`, contiguous; q, c_o: [rows] fp32; 1 <= k1, k2 <= d.
// Returns cudaSuccess without launching when rows == 0, cudaErrorInvalidValue for arguments the
// kernel cannot handle (k1 or k2 outside [1, d], d > INT32_MAX), otherwise the launch error.
cudaError_t launch_adascale_stats(DType dtype, const void* z, const void* z_perturbed, float* q,
                                  float* c_o, int64_t rows, int64_t d, int k1, int k2,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace actshift
