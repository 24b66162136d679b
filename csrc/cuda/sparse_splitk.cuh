// Split-K sparse row accumulation shared by sparse_linear.cu and relu_ffn.cu (its down projection):
//   acc[r, :] += Σ_{i active} c[r, i] · w[i, :]          (fp32, acc zeroed by the caller)
// for a coefficient matrix c [rows, in] (thresholded x, or the fp32 hidden h of relu_ffn) and a
// row-major weight matrix w [in, out] whose row i holds everything input i contributes.
//
// Design (batch-1 decode is memory bound: the goal is to read only the active rows of w, once)
// - A block owns a tile: a chunk of `chunk` (<= kMaxChunk) consecutive inputs × one warp-wide
//   column strip (32 lanes × one 16-byte pack = 128 fp32 or 256 fp16/bf16 columns), for a group
//   of up to kR rows. Grid (column strips, input chunks, row groups).
// - First the block evaluates c for its chunk and all rows of the group (x is tiny and L2 hot),
//   and compacts the inputs that are active in ANY row (the union: c != 0, NaN counts as active)
//   into shared memory in ascending input order (warp ballots + a prefix over the 4 warps), with
//   their kR coefficients. Inactive weight rows are never loaded.
// - Then the 4 warps split the compacted list (entry j goes to warp j % 4); a lane loads its
//   16-byte pack of the weight row ONCE and multiplies it by the coefficients of every row in the
//   group, accumulating kR × kVec fp32 values in registers. Several entries are loaded before the
//   FMAs (kUnroll) to keep enough bytes in flight.
// - The 4 warps' partials are summed in shared memory (fixed order) and each column of the strip
//   is added to acc with fp32 atomicAdds (128-bit ones for 4 columns on sm_90); a block with no
//   active input adds nothing.
//   Split-K partials therefore combine in fp32, never through fp16/bf16 atomics; their order
//   across blocks is not fixed, so results can differ from run to run in the last fp32 bits.
// - The caller turns acc into the output dtype (plus bias) with finalize_rows().
// Rows past kR are handled by more row groups (gridDim.z, looping past 65535): each group reads
// the weight rows of its own union again. That is the fallback for large batches; a tensor-core
// GEMM would beat it past a crossover that has to be measured on the GPU.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "convert.cuh"

namespace actshift {
namespace cuda {
namespace splitk {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxChunk = 512;
constexpr int kPackBytes = 16;
constexpr int64_t kMaxGridYZ = 65535;
// Two blocks per SM of an H100 (132 SMs): enough tiles to cover the GPU at batch 1.
constexpr int64_t kTargetBlocks = 264;

// Up to 16 rows share one pass over the weights (register accumulators grow with kR).
constexpr int kMaxGroupRows = 16;

template <typename T, typename Coef>
struct Params {
  Coef coef;     // c(r, i): fp32 coefficient of row r, input i (0 when inactive)
  const T* w;    // [in, out] row-major
  float* acc;    // [rows, out] fp32, zeroed before the launch
  int64_t rows;
  int64_t in;
  int64_t out;
  int64_t chunk;  // inputs per block, a multiple of kThreads, <= kMaxChunk
};

__device__ __forceinline__ bool is_active(float c) { return !(c == 0.0f); }

// Weight pack of kVec elements as fp32. Read-only, streamed: each active weight row is read once.
template <int kVec, typename T>
__device__ __forceinline__ void load_weights(const T* p, float (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = to_float(__ldg(p));
  } else {
    static_assert(kVec * sizeof(T) == kPackBytes, "a pack is 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    T v[kVec];
    memcpy(v, &raw, sizeof(raw));
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = to_float(v[k]);
  }
}

// dst[0..kN) += v, atomically per element; one 128-bit atomic on Hopper for kN == 4 (dst is then
// 16-byte aligned: acc is, out is a multiple of 4 on the vector path, and so is the column).
template <int kN>
__device__ __forceinline__ void atomic_add(float* dst, const float (&v)[kN]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = kN == 4;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
  } else {
#pragma unroll
    for (int q = 0; q < kN; ++q) atomicAdd(dst + q, v[q]);
  }
}

// More loads in flight for few rows; fewer live registers for many (kR × kVec accumulators).
template <int kR>
__host__ __device__ constexpr int unroll_for() {
  return kR <= 2 ? 8 : (kR <= 4 ? 4 : (kR <= 8 ? 2 : 1));
}

template <typename T, typename Coef, int kR, int kVec>
__global__ void __launch_bounds__(kThreads) splitk_kernel(const Params<T, Coef> p) {
  constexpr int kStrip = 32 * kVec;
  constexpr int kUnroll = unroll_for<kR>();
  // Columns per atomic: 4 on the vector path (kVec >= 4, so a group never crosses out).
  constexpr int kAtomicVec = kVec >= 4 ? 4 : 1;
  __shared__ int active_idx[kMaxChunk];
  __shared__ __align__(16) float active_coef[kMaxChunk * kR];
  __shared__ float partial[kWarps][kStrip];
  __shared__ int warp_count[kWarps];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t strip0 = static_cast<int64_t>(blockIdx.x) * kStrip;
  const int64_t col = strip0 + lane * kVec;  // vector path: out % kVec == 0
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * p.chunk;
  const int64_t k_end = k0 + p.chunk < p.in ? k0 + p.chunk : p.in;

  for (int64_t r0 = static_cast<int64_t>(blockIdx.z) * kR; r0 < p.rows;
       r0 += static_cast<int64_t>(gridDim.z) * kR) {
    const int nr = p.rows - r0 < kR ? static_cast<int>(p.rows - r0) : kR;

    // Compaction of the chunk's union of active inputs, ascending, kThreads inputs per round.
    int count = 0;
    for (int64_t s = k0; s < k_end; s += kThreads) {
      const int64_t i = s + threadIdx.x;
      float c[kR];
      bool active = false;
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        c[r] = (r < nr && i < k_end) ? p.coef(r0 + r, i) : 0.0f;
        active = active || is_active(c[r]);
      }
      const unsigned ballot = __ballot_sync(0xFFFFFFFFu, active);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();
      int offset = count + __popc(ballot & ((1u << lane) - 1u));
      for (int w = 0; w < kWarps; ++w) {
        offset += w < warp ? warp_count[w] : 0;
        count += warp_count[w];
      }
      if (active) {
        active_idx[offset] = static_cast<int>(i - k0);
#pragma unroll
        for (int r = 0; r < kR; ++r) active_coef[offset * kR + r] = c[r];
      }
      // warp_count is rewritten by the next round; the list is read after the last one.
      __syncthreads();
    }
    // count is the same in every thread, so the early exit is block-uniform.
    if (count == 0) continue;

    float acc[kR][kVec];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[r][k] = 0.0f;
    }
    if (col < p.out) {
      const T* w = p.w + k0 * p.out + col;
      for (int j0 = warp; j0 < count; j0 += kWarps * kUnroll) {
        float wv[kUnroll][kVec];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int j = j0 + u * kWarps;
          if (j < count) load_weights<kVec>(w + static_cast<int64_t>(active_idx[j]) * p.out, wv[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int j = j0 + u * kWarps;
          if (j >= count) break;
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            const float c = active_coef[j * kR + r];
#pragma unroll
            for (int k = 0; k < kVec; ++k) acc[r][k] += c * wv[u][k];
          }
        }
      }
    }

    // Sum the 4 warps' partials per row (fixed order) and add the strip to acc. Unrolled over kR
    // so acc stays in registers; r < nr is block-uniform, so the barriers are too.
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r >= nr) break;
#pragma unroll
      for (int k = 0; k < kVec; ++k) partial[warp][lane * kVec + k] = acc[r][k];
      __syncthreads();
      for (int c = threadIdx.x * kAtomicVec; c < kStrip; c += kThreads * kAtomicVec) {
        float sum[kAtomicVec];
#pragma unroll
        for (int q = 0; q < kAtomicVec; ++q) {
          sum[q] = partial[0][c + q];
#pragma unroll
          for (int w = 1; w < kWarps; ++w) sum[q] += partial[w][c + q];
        }
        if (strip0 + c < p.out) atomic_add(p.acc + (r0 + r) * p.out + strip0 + c, sum);
      }
      // partial is rewritten for the next row; this barrier also ends every read of the list,
      // which the next row group rewrites.
      __syncthreads();
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool is_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kPackBytes == 0;
}

template <typename T, typename Coef, int kR, int kVec>
cudaError_t launch_rows(Params<T, Coef> p, cudaStream_t stream) {
  const int64_t strips = ceil_div(p.out, 32 * kVec);
  const int64_t groups = ceil_div(p.rows, kR);
  // The largest chunk (fewest atomics) that still gives the GPU enough blocks.
  p.chunk = kMaxChunk;
  while (p.chunk > kThreads && strips * ceil_div(p.in, p.chunk) * groups < kTargetBlocks) {
    p.chunk /= 2;
  }
  const int64_t chunks = ceil_div(p.in, p.chunk);
  if (strips > INT32_MAX || chunks > kMaxGridYZ) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(strips), static_cast<unsigned>(chunks),
                  static_cast<unsigned>(std::min(groups, kMaxGridYZ)));
  splitk_kernel<T, Coef, kR, kVec><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename Coef, int kVec>
cudaError_t launch_vec(const Params<T, Coef>& p, int max_group_rows, cudaStream_t stream) {
  const int64_t group = std::min<int64_t>(p.rows, max_group_rows);
  if (group <= 1) return launch_rows<T, Coef, 1, kVec>(p, stream);
  if (group <= 2) return launch_rows<T, Coef, 2, kVec>(p, stream);
  if (group <= 4) return launch_rows<T, Coef, 4, kVec>(p, stream);
  if (group <= 8) return launch_rows<T, Coef, 8, kVec>(p, stream);
  return launch_rows<T, Coef, 16, kVec>(p, stream);
}

// acc[r, :] += Σ_i c(r, i) · w[i, :] over the active inputs, asynchronously on `stream`; acc must
// be zeroed first (stream-ordered). Rows are processed in groups of max_group_rows (<= 16) that
// share one pass over the weights. Returns cudaErrorInvalidValue for shapes beyond the grid.
template <typename T, typename Coef>
cudaError_t accumulate(const Coef& coef, const T* w, float* acc, int64_t rows, int64_t in,
                       int64_t out, int max_group_rows, cudaStream_t stream) {
  if (rows == 0 || in == 0 || out == 0) return cudaSuccess;
  if (max_group_rows < 1 || max_group_rows > kMaxGroupRows) return cudaErrorInvalidValue;
  const Params<T, Coef> p{coef, w, acc, rows, in, out, kMaxChunk};
  constexpr int kVec = kPackBytes / sizeof(T);
  const bool vec = is_aligned(w) && is_aligned(acc) &&
                   (out * static_cast<int64_t>(sizeof(T))) % kPackBytes == 0;
  return vec ? launch_vec<T, Coef, kVec>(p, max_group_rows, stream)
             : launch_vec<T, Coef, 1>(p, max_group_rows, stream);
}

template <typename T>
__global__ void finalize_kernel(const float* acc, const T* bias, T* y, int64_t rows, int64_t out) {
  const int64_t total = rows * out;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float b = bias != nullptr ? to_float(bias[e % out]) : 0.0f;
    y[e] = from_float<T>(acc[e] + b);
  }
}

// y[r, c] = acc[r, c] + bias[c] rounded to T (y contiguous [rows, out]; bias may be null).
template <typename T>
cudaError_t finalize_rows(const float* acc, const T* bias, T* y, int64_t rows, int64_t out,
                          cudaStream_t stream) {
  const int64_t total = rows * out;
  if (total == 0) return cudaSuccess;
  constexpr int kFinalizeThreads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kFinalizeThreads), 4 * kTargetBlocks);
  finalize_kernel<T><<<static_cast<unsigned>(blocks), kFinalizeThreads, 0, stream>>>(acc, bias, y,
                                                                                     rows, out);
  return cudaGetLastError();
}

}  // namespace splitk
}  // namespace cuda
}  // namespace actshift
