// Torch-free launcher of the CUDA `relu_ffn` kernels (activations: csrc/include/actshift/sparse.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace actshift {
namespace cuda {

// y = W_down h (+ b_down) with h = a(W_gate x + b_gate, W_up x + b_up) (gated; w_up given) or
// h = act(W_1 x + b_gate) (w_up == nullptr), fp32 accumulation and fp32 h, asynchronously on `stream`.
//   dtype:     element type of x, the weights, the biases and y.
//   x:         [rows, d], last dim contiguous, `x_stride` elements between rows.
//   w_gate, w_up, w_down_t: [ffn, d] contiguous (w_down_t = down_proj.weight.t()); w_up may be null.
//   b_gate, b_up: [ffn] or nullptr; b_down: [d] or nullptr. y: [rows, d] contiguous.
//   act:       sparse::Act code; threshold: its threshold (fatrelu, cats).
//   workspace: rows * (d + ffn) fp32 values, 16-byte aligned: the down-projection accumulator
//              [rows, d] then h [rows, ffn] (used here; free once the stream passes it).
// Up rows and w_down_t rows of neurons that are inactive in every row of a group of up to 8 rows
// are never read. Returns cudaSuccess without launching when rows == 0 or d == 0,
// cudaErrorInvalidValue for arguments the kernels cannot handle, otherwise the first launch error.
cudaError_t launch_relu_ffn(DType dtype, const void* x, int64_t x_stride, const void* w_gate,
                            const void* w_up, const void* w_down_t, int act, float threshold,
                            const void* b_gate, const void* b_up, const void* b_down, void* y,
                            float* workspace, int64_t rows, int64_t d, int64_t ffn,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace actshift
