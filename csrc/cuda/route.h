// Torch-free launcher of the CUDA `route` kernel (math: csrc/include/actshift/route.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace actshift {
namespace cuda {

// The largest E and k one warp handles per row (16 experts per lane; one pick per lane).
constexpr int64_t kRouteMaxExperts = 512;
constexpr int64_t kRouteMaxK = 32;

// Routes rows of logits asynchronously on `stream`; see the schema in csrc/torch_bindings.cpp.
//   logits:  [rows, E] of `dtype`, last dim contiguous, `stride` elements between rows.
//   offsets: [S, E] fp32 and modes [S, E] int8, or both null (S = 0): the bank.
//   slot:    [rows] int32 (or int64 when slot_long), or null for plan 0; values outside [0, S)
//            leave their row unedited.
//   bias:    [E] fp32 or null.
//   indices: [rows, k] int64, weights: [rows, k] fp32, contiguous.
// Returns cudaSuccess without launching when rows == 0, cudaErrorInvalidValue for E > 512, k > 32
// or other arguments the kernel cannot handle, otherwise the launch error.
cudaError_t launch_route(DType dtype, const void* logits, int64_t stride, int64_t rows, int64_t E,
                         int64_t k, const float* offsets, const int8_t* modes, int64_t S,
                         const void* slot, bool slot_long, const float* bias, int kind, bool renorm,
                         int64_t n_group, int64_t topk_group, float scale, int64_t* indices,
                         float* weights, cudaStream_t stream);

}  // namespace cuda
}  // namespace actshift
