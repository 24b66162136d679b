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

// --- the full steering program -----------------------------------------------------------------
//
// One block per row (grid-stride over rows): a program with row-wide read-outs (monitors, the
// condition, the ablation dots, both norms) must finish them before any element can be written, so
// the column split of the additive kernel above does not apply; the wrapper keeps that kernel for
// plans that only add vectors. Per row:
//   1. one sweep over x (read from global memory once) stages the fp32 row in shared memory and
//      accumulates every read-out's partial dot product in registers (x·x, x·c, x·M_i, x·u_k), then
//      one block reduction finishes all of them together;
//   2. thread 0 resolves the gate and strength and the ablation / add coefficients;
//   3. z = steer::program_element(x_i, ...) into shared memory, then the neuron edits scatter into it
//      (unique indices, one thread each);
//   4. y = steer::mix(x, z, c), with a second block reduction of ‖y‖² when the plan renormalizes,
//      then the write.
// Counts and flags are uniform across a block, so absent parts cost a skipped branch. Rows that stay
// as they are (slot outside [0, S), or λ·g == 0) are copied from x (bit-exact), or in place not
// written.

constexpr int kProgramThreads = 512;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr int kProgramWarps = kProgramThreads / 32;
// Read-outs reduced per row: ‖x‖², x·c, the monitors, the ablation dots.
constexpr int kReadNorm = 0, kReadCondition = 1, kReadMonitors = 2;
constexpr int kReadAblate = kReadMonitors + steer::kMaxMonitors;
constexpr int kReadouts = kReadAblate + steer::kMaxDirections;

template <typename T, typename IndexT>
struct ProgramParams {
  const T* x;
  int64_t x_stride;
  T* y;
  int64_t y_stride;
  int64_t rows;
  int64_t d;
  SteerProgramBank bank;
  const float* gate;
  const IndexT* slot;
  const float* row_weights;
  float* monitors;
};

// Sums v over the block; every thread gets the total. `scratch` holds kProgramWarps floats; the
// leading barrier lets the caller reuse it back to back.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += scratch[w];
  return total;
}

template <typename T, typename IndexT>
__global__ void __launch_bounds__(kProgramThreads) program_kernel(const ProgramParams<T, IndexT> p) {
  extern __shared__ float row_buf[];  // x [d] and z [d], fp32
  __shared__ float partial[kReadouts][kProgramWarps];
  __shared__ float read[kReadouts];
  __shared__ float ablate_coef[steer::kMaxDirections];
  __shared__ float add_coef[steer::kMaxVectors];
  __shared__ float mix_coef;
  __shared__ float scratch[kProgramWarps];

  const SteerProgramBank& b = p.bank;
  const int64_t d = p.d;
  float* xs = row_buf;
  float* zs = row_buf + d;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const bool in_place = static_cast<const void*>(p.x) == static_cast<const void*>(p.y) &&
                        p.x_stride == p.y_stride;

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* x = p.x + r * p.x_stride;
    T* y = p.y + r * p.y_stride;
    float* mon = p.monitors + r * b.P;
    const int64_t s = steer::resolve_slot(p.slot, r, b.num_plans);
    if (s < 0) {  // uniform across the block
      for (int64_t i = tid; i < b.P; i += blockDim.x) mon[i] = 0.0f;
      if (!in_place) {
        for (int64_t i = tid; i < d; i += blockDim.x) y[i] = x[i];
      }
      continue;
    }
    const int32_t* meta = b.meta + s * steer::kMetaCols;
    const int32_t flags = meta[steer::kMetaFlags];
    const auto clamp = [](int32_t v, int64_t hi) { return static_cast<int>(v < 0 ? 0 : v > hi ? hi : v); };
    const int k = clamp(meta[steer::kMetaAblate], b.K), m = clamp(meta[steer::kMetaAdd], b.M);
    const int n = clamp(meta[steer::kMetaNeurons], b.N), np = clamp(meta[steer::kMetaMonitors], b.P);
    const bool has_cond = (flags & steer::kCondition) && b.condition != nullptr;
    const float* cond = has_cond ? b.condition + s * d : nullptr;
    const float* M = b.monitor + s * b.P * d;
    const float* U = b.ablate + s * b.K * d;

    // 1. Stage x and accumulate the read-outs' partial sums.
    float acc[kReadouts];
#pragma unroll
    for (int j = 0; j < kReadouts; ++j) acc[j] = 0.0f;
    for (int64_t i = tid; i < d; i += blockDim.x) {
      const float xv = to_float(x[i]);
      xs[i] = xv;
      acc[kReadNorm] += xv * xv;
      if (has_cond) acc[kReadCondition] += xv * __ldg(cond + i);
#pragma unroll
      for (int q = 0; q < steer::kMaxMonitors; ++q) {
        if (q < np) acc[kReadMonitors + q] += xv * __ldg(M + q * d + i);
      }
#pragma unroll
      for (int q = 0; q < steer::kMaxDirections; ++q) {
        if (q < k) acc[kReadAblate + q] += xv * __ldg(U + q * d + i);
      }
    }
#pragma unroll
    for (int j = 0; j < kReadouts; ++j) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
      if (lane == 0) partial[j][warp] = acc[j];
    }
    __syncthreads();
    // Strided: a row of d <= 128 runs a single warp, fewer threads than read-outs.
    for (int j = tid; j < kReadouts; j += blockDim.x) {
      float total = 0.0f;
      for (int w = 0; w < nwarps; ++w) total += partial[j][w];
      read[j] = total;
    }
    __syncthreads();

    // 2. Gate, strength and coefficients.
    for (int64_t i = tid; i < b.P; i += blockDim.x) mon[i] = i < np ? read[kReadMonitors + i] : 0.0f;
    if (tid == 0) {
      const float* sc = b.scalars + s * steer::kScalarCols;
      float g = p.gate != nullptr ? p.gate[r] : 1.0f;
      if (has_cond) {
        const float score = steer::condition_score(flags, read[kReadCondition], sqrtf(read[kReadNorm]));
        g *= steer::condition_gate(flags, score, sc[steer::kScalarThreshold]);
      }
      mix_coef = sc[steer::kScalarStrength] * g;
      for (int q = 0; q < k; ++q) ablate_coef[q] = read[kReadAblate + q] - b.targets[s * b.K + q];
      const float* w = p.row_weights != nullptr ? p.row_weights + r * b.M : b.weights + s * b.M;
      for (int j = 0; j < m; ++j) add_coef[j] = w[j];
    }
    __syncthreads();
    const float c = mix_coef;
    if (c == 0.0f) {  // not steered: the row stays bit-exact
      if (!in_place) {
        for (int64_t i = tid; i < d; i += blockDim.x) y[i] = x[i];
      }
      __syncthreads();  // xs, read and the coefficients are rewritten for the block's next row
      continue;
    }

    // 3. The program into z.
    const float* affine = (flags & steer::kAffine) && b.affine != nullptr ? b.affine + s * 2 * d : nullptr;
    const float* V = b.vectors + s * b.M * d;
    for (int64_t i = tid; i < d; i += blockDim.x) {
      zs[i] = steer::program_element(xs[i], ablate_coef, U, k, affine, add_coef, V, m, d, i);
    }
    if (n > 0) {
      __syncthreads();
      const int32_t* idx = b.neuron_idx + s * b.N;
      const float* mul = b.neuron_val + s * 2 * b.N;
      for (int q = tid; q < n; q += blockDim.x) {
        const int32_t i = idx[q];
        if (i >= 0 && i < d) zs[i] = steer::neuron_edit(zs[i], mul[q], mul[b.N + q]);
      }
    }
    __syncthreads();

    // 4. Mix, renorm, write.
    if (!(flags & steer::kRenorm)) {
      for (int64_t i = tid; i < d; i += blockDim.x) y[i] = from_float<T>(steer::mix(xs[i], zs[i], c));
    } else {
      float y_sq = 0.0f;
      for (int64_t i = tid; i < d; i += blockDim.x) {
        const float yv = steer::mix(xs[i], zs[i], c);
        zs[i] = yv;
        y_sq += yv * yv;
      }
      const float f = steer::renorm_factor(read[kReadNorm], block_sum(y_sq, scratch));
      for (int64_t i = tid; i < d; i += blockDim.x) y[i] = from_float<T>(zs[i] * f);
    }
    __syncthreads();
  }
}

template <typename T, typename IndexT>
cudaError_t launch_program(const ProgramParams<T, IndexT>& p, size_t smem, cudaStream_t stream) {
  // One warp per 128 elements of the row, so that small rows do not idle most of the block.
  const int64_t warps = std::min<int64_t>(kProgramWarps, std::max<int64_t>(1, ceil_div(p.d, 128)));
  const int64_t blocks = std::min<int64_t>(p.rows, INT32_MAX);
  // Rows past 6144 values need more than the 48 KiB of dynamic shared memory a launch gets by default.
  if (smem > kDefaultDynamicSmem) {
    const cudaError_t err = cudaFuncSetAttribute(program_kernel<T, IndexT>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  program_kernel<T, IndexT>
      <<<static_cast<unsigned>(blocks), static_cast<unsigned>(warps * 32), smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_program_typed(const void* x, int64_t x_stride, void* y, int64_t y_stride,
                                 int64_t rows, int64_t d, const SteerProgramBank& bank,
                                 const float* gate, const void* slot, bool slot_is_int64,
                                 const float* row_weights, float* monitors, size_t smem,
                                 cudaStream_t stream) {
  const auto run = [&](auto* typed_slot) {
    using IndexT = std::remove_const_t<std::remove_pointer_t<decltype(typed_slot)>>;
    const ProgramParams<T, IndexT> p{static_cast<const T*>(x), x_stride, static_cast<T*>(y), y_stride,
                                     rows, d, bank, gate, typed_slot, row_weights, monitors};
    return launch_program(p, smem, stream);
  };
  return slot_is_int64 ? run(static_cast<const int64_t*>(slot))
                       : run(static_cast<const int32_t*>(slot));
}

// Dynamic shared memory per block the current device allows (opt-in), or 0 if it cannot be queried.
int64_t max_dynamic_smem() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    return 0;
  }
  return bytes;
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

int64_t program_max_hidden_size() {
  // The static shared memory of program_kernel (partials, read-outs, coefficients) is under 4 KiB.
  constexpr int64_t kStaticSmem = 4096;
  const int64_t bytes = max_dynamic_smem() - kStaticSmem;
  return bytes > 0 ? bytes / (2 * static_cast<int64_t>(sizeof(float))) : 0;
}

cudaError_t launch_steer_program(DType dtype, const void* x, int64_t x_stride, void* y,
                                 int64_t y_stride, int64_t rows, int64_t d,
                                 const SteerProgramBank& bank, const float* gate, const void* slot,
                                 bool slot_is_int64, const float* row_weights, float* monitors,
                                 cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows < 0 || d < 0 || bank.num_plans < 1 || bank.K < 0 || bank.K > steer::kMaxDirections ||
      bank.M < 0 || bank.M > steer::kMaxVectors || bank.N < 0 || bank.P < 0 ||
      bank.P > steer::kMaxMonitors || d > program_max_hidden_size()) {
    return cudaErrorInvalidValue;
  }
  const size_t smem = static_cast<size_t>(2 * d) * sizeof(float);
  switch (dtype) {
    case DType::kFloat32:
      return launch_program_typed<float>(x, x_stride, y, y_stride, rows, d, bank, gate, slot,
                                         slot_is_int64, row_weights, monitors, smem, stream);
    case DType::kFloat16:
      return launch_program_typed<__half>(x, x_stride, y, y_stride, rows, d, bank, gate, slot,
                                          slot_is_int64, row_weights, monitors, smem, stream);
    case DType::kBFloat16:
      return launch_program_typed<__nv_bfloat16>(x, x_stride, y, y_stride, rows, d, bank, gate, slot,
                                                 slot_is_int64, row_weights, monitors, smem, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace actshift
