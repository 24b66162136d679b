// CUDA kernel of the `steer` op: y[r, :] = x[r, :] + Σ_j c_j · vectors[s_r, j, :].
// The per-row math (slot resolution, coefficients, fp32 accumulation in ascending j) comes from
// csrc/include/actshift/steer.h, shared with the CPU kernel.
//
// Design
// - The op is memory bound: each element of x is read once and each element of y written once,
//   while the m vectors of a plan are re-read by every row that uses it and are served from L2.
// - Work unit: one "pack" per thread, i.e. 16 bytes of x (4 fp32 or 8 fp16/bf16 elements), loaded
//   and stored with single 128-bit instructions; the matching fp32 vector elements are 1 or 2
//   read-only float4 loads per j. When x, y, vectors, the row length or the x row stride are not
//   16-byte aligned (e.g. d = 7 or 4097), the same kernel runs with one element per thread.
// - Grid: (column chunks, rows). blockIdx.x picks a chunk of `blockDim.x` packs of a row, so one row
//   is split across several blocks; at decode (1..8 rows) that is the only way to reach more than a
//   handful of SMs. The block size halves from 256 down to 32 threads while the grid has fewer
//   than kTargetBlocks blocks or a row would leave half the block idle. gridDim.y is capped at
//   65535; blocks loop over the rows beyond.
// - Thread 0 of a block resolves the row's plan and computes its m coefficients into shared memory
//   once per row; the other threads issue their x load meanwhile and wait at the barrier.
// - Rows whose slot is outside [0, num_plans) store the loaded x pack back unchanged (bit-exact),
//   or, in place (y is x), are not written at all.
#include "steer.h"  // the launcher declared next to this file

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "convert.cuh"
#include "actshift/steer.h"

namespace actshift {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMinThreads = 32;
// A few blocks per SM on an A100 (108 SMs) or H100 (132 SMs), so their latencies overlap.
constexpr int64_t kTargetBlocks = 512;
constexpr int64_t kMaxGridY = 65535;
constexpr int kPackBytes = 16;

// Arguments of one launch, typed once the element and slot types are known.
template <typename T, typename IndexT>
struct Params {
  const T* x;
  int64_t x_stride;
  T* y;
  int64_t y_stride;
  int64_t rows;
  int64_t d;
  const float* vectors;
  const float* weights;
  const float* strength;
  int64_t num_plans;
  int m;
  const float* gate;
  const IndexT* slot;
};

// kVec elements of x; going through uint4 makes the vector path a single 128-bit load. Plain (not
// read-only) loads: with in-place steering y is x, so x is written while the kernel runs.
template <int kVec, typename T>
__device__ __forceinline__ void load_pack(const T* p, T (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = *p;
  } else {
    static_assert(kVec * sizeof(T) == kPackBytes, "a pack is 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    memcpy(out, &raw, sizeof(raw));
  }
}

template <int kVec, typename T>
__device__ __forceinline__ void store_pack(T* p, const T (&in)[kVec]) {
  if constexpr (kVec == 1) {
    *p = in[0];
  } else {
    uint4 raw;
    memcpy(&raw, in, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// kVec fp32 elements of one steering vector. Read-only loads: every row re-reads them from L2.
template <int kVec>
__device__ __forceinline__ void load_vector_pack(const float* p, float (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = __ldg(p);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; k += 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(p + k));
      out[k] = q.x;
      out[k + 1] = q.y;
      out[k + 2] = q.z;
      out[k + 3] = q.w;
    }
  }
}

template <typename T, typename IndexT, int kVec>
__global__ void __launch_bounds__(kMaxThreads) steer_kernel(const Params<T, IndexT> p) {
  __shared__ float coef[steer::kMaxVectors];
  __shared__ int64_t plan;

  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  // On the vector path d is a multiple of kVec, so a pack is either wholly in the row or out.
  const bool active = col < p.d;
  const bool in_place = static_cast<const void*>(p.x) == static_cast<const void*>(p.y) &&
                        p.x_stride == p.y_stride;

  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    T xv[kVec];
    if (active) load_pack(p.x + r * p.x_stride + col, xv);
    if (threadIdx.x == 0) {
      const int64_t s = steer::resolve_slot(p.slot, r, p.num_plans);
      if (s >= 0) steer::row_coefficients(p.weights, p.strength, p.gate, r, s, p.m, coef);
      plan = s;
    }
    __syncthreads();

    const int64_t s = plan;
    if (active) {
      if (s >= 0) {
        // Same math and order as steer::apply_add, with packed loads: start from x, add j ascending.
        float acc[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] = to_float(xv[k]);
        const float* v = p.vectors + s * p.m * p.d + col;
#pragma unroll 4
        for (int j = 0; j < p.m; ++j, v += p.d) {
          float vj[kVec];
          load_vector_pack(v, vj);
          const float c = coef[j];
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[k] += c * vj[k];
        }
#pragma unroll
        for (int k = 0; k < kVec; ++k) xv[k] = from_float<T>(acc[k]);
      }
      // In place, an untouched row already holds its output: skip the write.
      if (s >= 0 || !in_place) store_pack(p.y + r * p.y_stride + col, xv);
    }
    // coef and plan are overwritten for this block's next row.
    __syncthreads();
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Halves the block while a row would leave half of it idle or the grid is too small to fill the GPU.
int pick_threads(int64_t rows, int64_t packs_per_row) {
  int threads = kMaxThreads;
  while (threads > kMinThreads && (threads / 2 >= packs_per_row ||
                                   rows * ceil_div(packs_per_row, threads) < kTargetBlocks)) {
    threads /= 2;
  }
  return threads;
}

template <typename T, typename IndexT, int kVec>
cudaError_t launch(const Params<T, IndexT>& p, cudaStream_t stream) {
  const int64_t packs_per_row = ceil_div(p.d, kVec);
  const int threads = pick_threads(p.rows, packs_per_row);
  const int64_t col_blocks = ceil_div(packs_per_row, threads);
  if (col_blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(col_blocks),
                  static_cast<unsigned>(std::min(p.rows, kMaxGridY)));
  steer_kernel<T, IndexT, kVec><<<grid, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

bool is_aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kPackBytes == 0; }

template <typename T, typename IndexT>
cudaError_t launch_vec_or_scalar(const Params<T, IndexT>& p, cudaStream_t stream) {
  constexpr int64_t bytes = sizeof(T);
  // With a single row the row strides are never applied, so they need not be aligned.
  const bool vec = is_aligned(p.x) && is_aligned(p.y) && is_aligned(p.vectors) &&
                   (p.d * bytes) % kPackBytes == 0 &&
                   (p.rows == 1 || ((p.x_stride * bytes) % kPackBytes == 0 &&
                                    (p.y_stride * bytes) % kPackBytes == 0));
  return vec ? launch<T, IndexT, kPackBytes / bytes>(p, stream) : launch<T, IndexT, 1>(p, stream);
}

template <typename T>
cudaError_t launch_typed(const void* x, int64_t x_stride, void* y, int64_t y_stride, int64_t rows,
                         int64_t d,
                         const float* vectors, const float* weights, const float* strength,
                         int64_t num_plans, int m, const float* gate, const void* slot,
                         bool slot_is_int64, cudaStream_t stream) {
  const auto run = [&](auto* typed_slot) {
    using IndexT = std::remove_const_t<std::remove_pointer_t<decltype(typed_slot)>>;
    const Params<T, IndexT> p{static_cast<const T*>(x), x_stride, static_cast<T*>(y), y_stride,
                              rows, d, vectors, weights, strength, num_plans, m, gate, typed_slot};
    return launch_vec_or_scalar(p, stream);
  };
  // A null slot takes the int32 path: resolve_slot gives plan 0 for a null pointer of any type.
  return slot_is_int64 ? run(static_cast<const int64_t*>(slot))
                       : run(static_cast<const int32_t*>(slot));
}

}  // namespace

cudaError_t launch_steer(DType dtype, const void* x, int64_t x_stride, void* y, int64_t y_stride,
                         int64_t rows, int64_t d, const float* vectors, const float* weights,
                         const float* strength, int64_t num_plans, int m, const float* gate,
                         const void* slot, bool slot_is_int64, cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  // coef[] in shared memory holds kMaxVectors entries; a slot-less launch reads plan 0.
  if (rows < 0 || d < 0 || m < 0 || m > steer::kMaxVectors || num_plans < 1) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(x, x_stride, y, y_stride, rows, d, vectors, weights, strength, num_plans,
                                 m, gate, slot, slot_is_int64, stream);
    case DType::kFloat16:
      return launch_typed<__half>(x, x_stride, y, y_stride, rows, d, vectors, weights, strength, num_plans,
                                  m, gate, slot, slot_is_int64, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, x_stride, y, y_stride, rows, d, vectors, weights, strength,
                                         num_plans, m, gate, slot, slot_is_int64, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace actshift
