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

// --- the full steering program (op `steer_program`; math and layout: actshift/steer.h) ----------

// A bank of num_plans plans on the device, all fp32 unless noted, zero-padded to the largest plan:
// meta [S, 5] int32 {flags, k, m, n, p}, scalars [S, 2] {strength, threshold}, ablate [S, K, d],
// targets [S, K], affine [S, 2, d] or nullptr, vectors [S, M, d], weights [S, M], neuron_idx [S, N]
// int32, neuron_val [S, 2, N], condition [S, 1, d] or nullptr, monitor [S, P, d]. Pointers of
// empty parts (K, M, N or P == 0) are never read. K, M, P <= 16.
struct SteerProgramBank {
  const int32_t* meta;
  const float* scalars;
  const float* ablate;
  const float* targets;
  const float* affine;
  const float* vectors;
  const float* weights;
  const int32_t* neuron_idx;
  const float* neuron_val;
  const float* condition;
  const float* monitor;
  int64_t num_plans, K, M, N, P;
};

// (y, monitors) of the program for every row, asynchronously on `stream`.
//   x, y, x_stride, y_stride, rows, d, gate, slot, slot_is_int64: as launch_steer (y is x or does
//                 not overlap it; untouched rows are copied bit-exactly, or in place not written).
//   row_weights:  [rows, M] fp32 replacing the plans' add weights, or nullptr.
//   monitors:     [rows, P] fp32 output (0 past a plan's own count and for untouched rows).
// Counts in meta are clamped to the padded sizes and neuron indices outside [0, d) are skipped, so
// bad metadata never reads out of bounds. Returns cudaSuccess without launching when rows == 0,
// cudaErrorInvalidValue for bad sizes or a row too long for the device's shared memory
// (program_max_hidden_size), otherwise the launch error.
cudaError_t launch_steer_program(DType dtype, const void* x, int64_t x_stride, void* y,
                                 int64_t y_stride, int64_t rows, int64_t d,
                                 const SteerProgramBank& bank, const float* gate, const void* slot,
                                 bool slot_is_int64, const float* row_weights, float* monitors,
                                 cudaStream_t stream);

// The largest hidden size launch_steer_program handles on the current device (the row and its
// program are staged in shared memory), or 0 if the device cannot be queried.
int64_t program_max_hidden_size();

}  // namespace cuda
}  // namespace actshift
