// CUDA kernels of the `relu_ffn` op (activation math: csrc/include/actshift/sparse.h).
//
// Design: three stream-ordered steps, each reading every byte it needs once.
// 1. gate_up_kernel (steps 1 and 2 of the contract, fused): one warp per neuron n computes the
//    dense gate dot products g[r] = w_gate[n, :] · x[r, :] for a group of up to kGroupRows rows
//    (16-byte weight packs, fp32 sums, warp shuffle reduction), applies the bias and the gate
//    activation, and only if the neuron is active in some row of the group (activation != 0, NaN
//    counts) also reads its up row for u. It writes the fp32 hidden value h[r, n] of every neuron,
//    0 for inactive ones: h is never rounded to x's dtype and needs no index list, because
//    step 2 finds the active neurons from h itself.
// 2. splitk::accumulate (sparse_splitk.cuh) with the coefficients h: blocks compact the neurons
//    active in their chunk in ascending order and read only those rows of w_down_t, combining
//    split-K partials with fp32 atomics into the acc workspace.
// 3. splitk::finalize_rows: acc + b_down, rounded to x's dtype.
// Crossover: rows are processed in groups of kGroupRows (the union is per group); larger batches
// are the fallback, the same kernels over more groups, each re-reading its union's weight rows.
// No union-density switch: at full density the kernels do the dense work plus a few hundred
// flags per block. The crossover to a tensor-core GEMM path has to be measured on the GPU.
#include "relu_ffn.h"  // the launcher declared next to this file

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>

#include "actshift/sparse.h"
#include "convert.cuh"
#include "sparse_splitk.cuh"

namespace actshift {
namespace cuda {
namespace {

constexpr int kGroupRows = 8;
constexpr int kGateWarps = 8;
constexpr int kGateThreads = kGateWarps * 32;

template <typename T>
struct GateParams {
  const T* x;
  int64_t x_stride;
  const T* w_gate;
  const T* w_up;  // nullptr: non-gated
  const T* b_gate;
  const T* b_up;
  int act;
  float threshold;
  float* h;  // [rows, ffn]
  int64_t rows;
  int64_t d;
  int64_t ffn;
};

// The fp32 hidden values of relu_ffn as split-K coefficients.
struct Hidden {
  const float* h;
  int64_t ffn;
  __device__ __forceinline__ float operator()(int64_t r, int64_t i) const { return h[r * ffn + i]; }
};

template <int kVec, typename T>
__device__ __forceinline__ void load_x(const T* p, float (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = to_float(__ldg(p));
  } else {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    T v[kVec];
    memcpy(v, &raw, sizeof(raw));
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = to_float(v[k]);
  }
}

// s[r] = w · x[r0 + r, :] for r < nr, in every lane of the warp (fp32; s[r] = 0 for r >= nr).
template <typename T, int kR, int kVec>
__device__ __forceinline__ void dot_rows(const T* w, const GateParams<T>& p, int64_t r0, int nr,
                                         float (&s)[kR]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kR; ++r) s[r] = 0.0f;
#pragma unroll 4
  for (int64_t c = static_cast<int64_t>(lane) * kVec; c < p.d; c += 32 * kVec) {
    float wv[kVec];
    splitk::load_weights<kVec>(w + c, wv);
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r < nr) {
        float xv[kVec];
        load_x<kVec>(p.x + (r0 + r) * p.x_stride + c, xv);
#pragma unroll
        for (int k = 0; k < kVec; ++k) s[r] += wv[k] * xv[k];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      s[r] += __shfl_xor_sync(0xFFFFFFFFu, s[r], offset);
    }
  }
}

template <typename T, int kR, int kVec>
__global__ void __launch_bounds__(kGateThreads) gate_up_kernel(const GateParams<T> p) {
  const int lane = threadIdx.x % 32;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kGateWarps + threadIdx.x / 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kGateWarps;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.z) * kR; r0 < p.rows;
       r0 += static_cast<int64_t>(gridDim.z) * kR) {
    const int nr = p.rows - r0 < kR ? static_cast<int>(p.rows - r0) : kR;
    for (int64_t n = first; n < p.ffn; n += step) {
      float g[kR];
      dot_rows<T, kR, kVec>(p.w_gate + n * p.d, p, r0, nr, g);
      const float b_gate = p.b_gate != nullptr ? to_float(p.b_gate[n]) : 0.0f;
      float h[kR];
      bool active = false;
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        h[r] = r < nr ? sparse::gate_act(p.act, g[r] + b_gate, p.threshold) : 0.0f;
        active = active || splitk::is_active(h[r]);
      }
      // Warp-uniform: every lane holds the same sums. Inactive neurons never read their up row.
      if (p.w_up != nullptr) {
        if (active) {
          float u[kR];
          dot_rows<T, kR, kVec>(p.w_up + n * p.d, p, r0, nr, u);
          const float b_up = p.b_up != nullptr ? to_float(p.b_up[n]) : 0.0f;
#pragma unroll
          for (int r = 0; r < kR; ++r) h[r] *= sparse::up_act(p.act, u[r] + b_up);
        } else {
#pragma unroll
          for (int r = 0; r < kR; ++r) h[r] = 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        if (r < nr && lane == r) p.h[(r0 + r) * p.ffn + n] = h[r];
      }
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int kR, int kVec>
cudaError_t launch_gate_rows(const GateParams<T>& p, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.ffn, kGateWarps);
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks), 1,
                  static_cast<unsigned>(std::min(ceil_div(p.rows, kR), splitk::kMaxGridYZ)));
  gate_up_kernel<T, kR, kVec><<<grid, kGateThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kVec>
cudaError_t launch_gate_vec(const GateParams<T>& p, cudaStream_t stream) {
  const int64_t group = std::min<int64_t>(p.rows, kGroupRows);
  if (group <= 1) return launch_gate_rows<T, 1, kVec>(p, stream);
  if (group <= 2) return launch_gate_rows<T, 2, kVec>(p, stream);
  if (group <= 4) return launch_gate_rows<T, 4, kVec>(p, stream);
  return launch_gate_rows<T, 8, kVec>(p, stream);
}

template <typename T>
cudaError_t launch_typed(const GateParams<T>& p, const T* w_down_t, const T* b_down, T* y,
                         float* acc, cudaStream_t stream) {
  constexpr int64_t bytes = sizeof(T);
  using splitk::is_aligned;
  // Weight rows start every d elements and x rows every x_stride (used only with rows > 1).
  const bool vec = is_aligned(p.x) && is_aligned(p.w_gate) &&
                   (p.w_up == nullptr || is_aligned(p.w_up)) &&
                   (p.d * bytes) % splitk::kPackBytes == 0 &&
                   (p.rows == 1 || (p.x_stride * bytes) % splitk::kPackBytes == 0);
  cudaError_t err = p.ffn == 0 ? cudaSuccess
                    : vec      ? launch_gate_vec<T, splitk::kPackBytes / bytes>(p, stream)
                               : launch_gate_vec<T, 1>(p, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(acc, 0, sizeof(float) * p.rows * p.d, stream);
  if (err != cudaSuccess) return err;
  err = splitk::accumulate(Hidden{p.h, p.ffn}, w_down_t, acc, p.rows, p.ffn, p.d, kGroupRows,
                           stream);
  if (err != cudaSuccess) return err;
  return splitk::finalize_rows(acc, b_down, y, p.rows, p.d, stream);
}

template <typename T>
cudaError_t launch_cast(const void* x, int64_t x_stride, const void* w_gate, const void* w_up,
                        const void* w_down_t, int act, float threshold, const void* b_gate,
                        const void* b_up, const void* b_down, void* y, float* workspace,
                        int64_t rows, int64_t d, int64_t ffn, cudaStream_t stream) {
  const GateParams<T> p{static_cast<const T*>(x), x_stride, static_cast<const T*>(w_gate),
                        static_cast<const T*>(w_up), static_cast<const T*>(b_gate),
                        static_cast<const T*>(b_up), act, threshold, workspace + rows * d, rows,
                        d, ffn};
  return launch_typed<T>(p, static_cast<const T*>(w_down_t), static_cast<const T*>(b_down),
                         static_cast<T*>(y), workspace, stream);
}

}  // namespace

cudaError_t launch_relu_ffn(DType dtype, const void* x, int64_t x_stride, const void* w_gate,
                            const void* w_up, const void* w_down_t, int act, float threshold,
                            const void* b_gate, const void* b_up, const void* b_down, void* y,
                            float* workspace, int64_t rows, int64_t d, int64_t ffn,
                            cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  if (rows < 0 || d < 0 || ffn < 0 || workspace == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch_cast<float>(x, x_stride, w_gate, w_up, w_down_t, act, threshold, b_gate, b_up,
                                b_down, y, workspace, rows, d, ffn, stream);
    case DType::kFloat16:
      return launch_cast<__half>(x, x_stride, w_gate, w_up, w_down_t, act, threshold, b_gate, b_up,
                                 b_down, y, workspace, rows, d, ffn, stream);
    case DType::kBFloat16:
      return launch_cast<__nv_bfloat16>(x, x_stride, w_gate, w_up, w_down_t, act, threshold, b_gate,
                                        b_up, b_down, y, workspace, rows, d, ffn, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace actshift
