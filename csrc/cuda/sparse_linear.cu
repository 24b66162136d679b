// CUDA kernels of the `sparse_linear` op: y = sparse_threshold(x, t) @ weight_t + bias.
// The threshold is fused into the split-K accumulation of sparse_splitk.cuh (design notes there):
// each block thresholds its chunk of x itself, so the thresholded x is never written, and weight
// rows of inputs that are inactive in every row of a group are never read. Then one elementwise
// pass adds the bias and rounds the fp32 sums to x's dtype.
//
// Crossover: groups of up to kGroupRows rows share one pass over the weights; larger batches run
// as several groups (the dense fallback: same kernel, each group re-reads its union's rows). There
// is no union-density switch: at full density the kernel does the dense work plus a compaction of
// a few hundred flags per block. Both choices must be measured on the GPU against a tensor-core
// GEMM of the thresholded x (benchmarks/bench_sparse_linear.py).
#include "sparse_linear.h"  // the launcher declared next to this file

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "actshift/sparse.h"
#include "convert.cuh"
#include "sparse_splitk.cuh"

namespace actshift {
namespace cuda {
namespace {

constexpr int kGroupRows = splitk::kMaxGroupRows;

// Coefficient of row r, input i: x if it passes the threshold, else 0 (NaN passes).
template <typename T>
struct ThresholdedX {
  const T* x;
  int64_t x_stride;
  const float* threshold;
  bool per_channel;
  __device__ __forceinline__ float operator()(int64_t r, int64_t i) const {
    return sparse::threshold(to_float(x[r * x_stride + i]), __ldg(threshold + (per_channel ? i : 0)));
  }
};

template <typename T>
cudaError_t launch_typed(const void* x, int64_t x_stride, const void* weight_t,
                         const float* threshold, bool per_channel, const void* bias, void* y,
                         float* workspace, int64_t rows, int64_t in, int64_t out,
                         cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(workspace, 0, sizeof(float) * rows * out, stream);
  if (err != cudaSuccess) return err;
  const ThresholdedX<T> coef{static_cast<const T*>(x), x_stride, threshold, per_channel};
  err = splitk::accumulate(coef, static_cast<const T*>(weight_t), workspace, rows, in, out,
                           kGroupRows, stream);
  if (err != cudaSuccess) return err;
  return splitk::finalize_rows(workspace, static_cast<const T*>(bias), static_cast<T*>(y), rows,
                               out, stream);
}

}  // namespace

cudaError_t launch_sparse_linear(DType dtype, const void* x, int64_t x_stride, const void* weight_t,
                                 const float* threshold, bool per_channel, const void* bias,
                                 void* y, float* workspace, int64_t rows, int64_t in, int64_t out,
                                 cudaStream_t stream) {
  if (rows == 0 || out == 0) return cudaSuccess;
  // With in == 0 the threshold may be an empty tensor's null pointer; it is never read then.
  if (rows < 0 || in < 0 || out < 0 || (in > 0 && threshold == nullptr) || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(x, x_stride, weight_t, threshold, per_channel, bias, y, workspace,
                                 rows, in, out, stream);
    case DType::kFloat16:
      return launch_typed<__half>(x, x_stride, weight_t, threshold, per_channel, bias, y,
                                  workspace, rows, in, out, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, x_stride, weight_t, threshold, per_channel, bias, y,
                                         workspace, rows, in, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace actshift
