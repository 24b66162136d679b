// CUDA kernel of the `sparse_threshold` op: y = x where |x| > t else 0, t scalar or per channel.
// The predicate comes from csrc/include/actshift/sparse.h, shared with the CPU kernel.
//
// Design: memory bound elementwise pass. Grid (column chunks, rows) as in steer.cu: each thread
// handles one 16-byte pack of a row (4 fp32 or 8 fp16/bf16 elements, one 128-bit load and store),
// or one element when pointers, the row length or the row stride are not 16-byte aligned. The
// scalar threshold is one fp32 read per thread (served from L1/L2); per-channel thresholds are read
// with the pack's columns. The kernel never converts kept values, so they are copied bit-exactly.
#include "sparse_threshold.h"  // the launcher declared next to this file

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>

#include "actshift/sparse.h"
#include "convert.cuh"

namespace actshift {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPackBytes = 16;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct Params {
  const T* x;
  int64_t x_stride;
  T* y;
  int64_t rows;
  int64_t n;
  const float* threshold;
  bool per_channel;
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) sparse_threshold_kernel(const Params<T> p) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  // On the vector path n is a multiple of kVec, so a pack is either wholly in the row or out.
  if (col >= p.n) return;
  float t[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) t[k] = __ldg(p.threshold + (p.per_channel ? col + k : 0));
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    T v[kVec];
    if constexpr (kVec == 1) {
      v[0] = p.x[r * p.x_stride + col];
    } else {
      static_assert(kVec * sizeof(T) == kPackBytes, "a pack is 16 bytes");
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p.x + r * p.x_stride + col));
      memcpy(v, &raw, sizeof(raw));
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (!sparse::keep(to_float(v[k]), t[k])) v[k] = from_float<T>(0.0f);
    }
    if constexpr (kVec == 1) {
      p.y[r * p.n + col] = v[0];
    } else {
      uint4 raw;
      memcpy(&raw, v, sizeof(raw));
      *reinterpret_cast<uint4*>(p.y + r * p.n + col) = raw;
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
bool is_aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kPackBytes == 0; }

template <typename T, int kVec>
cudaError_t launch(const Params<T>& p, cudaStream_t stream) {
  const int64_t col_blocks = ceil_div(ceil_div(p.n, kVec), kThreads);
  if (col_blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(col_blocks),
                  static_cast<unsigned>(std::min(p.rows, kMaxGridY)));
  sparse_threshold_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Params<T>& p, cudaStream_t stream) {
  constexpr int64_t bytes = sizeof(T);
  // The x row stride matters only when there is more than one row.
  const bool vec = is_aligned(p.x) && is_aligned(p.y) && (p.n * bytes) % kPackBytes == 0 &&
                   (p.rows == 1 || (p.x_stride * bytes) % kPackBytes == 0);
  return vec ? launch<T, kPackBytes / bytes>(p, stream) : launch<T, 1>(p, stream);
}

}  // namespace

cudaError_t launch_sparse_threshold(DType dtype, const void* x, int64_t x_stride, void* y,
                                    int64_t rows, int64_t n, const float* threshold,
                                    bool per_channel, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (rows < 0 || n < 0 || threshold == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed(Params<float>{static_cast<const float*>(x), x_stride,
                                        static_cast<float*>(y), rows, n, threshold, per_channel},
                          stream);
    case DType::kFloat16:
      return launch_typed(Params<__half>{static_cast<const __half*>(x), x_stride,
                                         static_cast<__half*>(y), rows, n, threshold, per_channel},
                          stream);
    case DType::kBFloat16:
      return launch_typed(Params<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(x), x_stride,
                                                static_cast<__nv_bfloat16*>(y), rows, n, threshold,
                                                per_channel},
                          stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace actshift
