// CUDA kernel of `route`: MoE routing with per-row expert edits (math: actshift/route.h, shared
// with the CPU kernel).
//
// Design: one warp per row, 4 rows per block. Lane l holds experts l, l + 32, ... in registers
// (kPer of them, E <= 32 * kPer), so the softmax max/sum and each of the k picks are warp
// shuffles with no shared memory; pick j ends in lane j, which writes it. Group-limited routing
// (sigmoid) stages the row's keys in shared memory so lane g can scan group g. A router is tiny
// (E <= 512 floats per row), so the kernel is latency-bound at decode and the k shuffle rounds
// dominate: O(k * log 32) per row instead of a sort.
#include "route.h"  // the launcher declared next to this file

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "actshift/route.h"
#include "convert.cuh"

namespace actshift {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kTaken = -2;   // tier of a picked expert, or of a slot past E
constexpr int kNone = -3;    // tier of "no candidate" in the pick reduction

template <typename T>
struct Params {
  const T* logits;
  int64_t stride, rows;
  int E, k;
  const float* offsets;
  const int8_t* modes;
  int64_t S;
  const void* slot;
  bool slot_long;
  const float* bias;
  int kind;
  bool renorm;
  int n_group, topk_group;
  float scale;
  int64_t* indices;
  float* weights;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename T, int kPer>
__global__ void __launch_bounds__(kThreads) route_kernel(const Params<T> p) {
  extern __shared__ float staged[];  // kWarps * E keys, group-limited routing only
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (r >= p.rows) return;  // the whole warp leaves together
  int64_t s = -1;
  if (p.S > 0) {
    s = p.slot == nullptr ? 0
        : p.slot_long     ? static_cast<const int64_t*>(p.slot)[r]
                          : static_cast<const int32_t*>(p.slot)[r];
    if (s >= p.S) s = -1;
  }
  const float ninf = -INFINITY;
  float key[kPer], score[kPer];
  int tier[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane + 32 * i;
    tier[i] = kTaken;
    key[i] = ninf;
    score[i] = 0.0f;
    if (e < p.E) {
      float z = to_float(p.logits[r * p.stride + e]);
      int mode = route::kFree;
      if (s >= 0) {
        z = __fadd_rn(z, p.offsets[s * p.E + e]);  // never contracted: every backend rounds alike
        mode = p.modes[s * p.E + e];
      }
      key[i] = z;
      tier[i] = route::tier(mode, true);
    }
  }
  if (p.kind == route::kSoftmax) {
    float m = ninf;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (tier[i] >= 0) m = fmaxf(m, key[i]);
    m = warp_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      score[i] = tier[i] >= 0 ? expf(key[i] - m) : 0.0f;
      sum += score[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < kPer; ++i) score[i] /= sum;
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = lane + 32 * i;
      if (e < p.E) {
        score[i] = route::sigmoid(key[i]);
        key[i] = score[i] + (p.bias != nullptr ? p.bias[e] : 0.0f);
      }
    }
    if (p.topk_group < p.n_group) {
      float* row = staged + warp * p.E;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int e = lane + 32 * i;
        if (e < p.E) row[e] = tier[i] >= 0 ? key[i] : ninf;
      }
      __syncwarp();
      const int G = p.E / p.n_group;
      float gscore = ninf;
      if (lane < p.n_group) {
        float b1 = ninf, b2 = ninf;
        for (int e = lane * G; e < (lane + 1) * G; ++e) {
          const float v = row[e];
          if (v > b1) {
            b2 = b1;
            b1 = v;
          } else if (v > b2) {
            b2 = v;
          }
        }
        gscore = G >= 2 ? b1 + b2 : b1;
      }
      int rank = 0;  // groups ranked before this lane's group
      for (int h = 0; h < p.n_group; ++h) {
        const float other = __shfl_sync(kFull, gscore, h);
        rank += route::group_before(other, h, gscore, lane);
      }
      const int chosen = lane < p.n_group && rank < p.topk_group;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int e = lane + 32 * i;
        const int in_group = __shfl_sync(kFull, chosen, e < p.E ? e / G : 0);
        if (e < p.E && tier[i] == 1 && !in_group) tier[i] = 0;
      }
    }
  }
  float my_w = 0.0f;
  int64_t my_idx = 0;
  for (int j = 0; j < p.k; ++j) {
    int bt = kNone, bi = INT32_MAX;
    float bk = ninf;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = lane + 32 * i;
      if (tier[i] >= 0 && (bt == kNone || route::before(tier[i], key[i], e, bt, bk, bi))) {
        bt = tier[i];
        bk = key[i];
        bi = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const int ot = __shfl_xor_sync(kFull, bt, o);
      const float ok = __shfl_xor_sync(kFull, bk, o);
      const int oi = __shfl_xor_sync(kFull, bi, o);
      if (ot != kNone && (bt == kNone || route::before(ot, ok, oi, bt, bk, bi))) {
        bt = ot;
        bk = ok;
        bi = oi;
      }
    }
    // bt != kNone: the plan checks leave at least k live experts.
    float w = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (lane + 32 * i == bi) {
        w = score[i];
        tier[i] = kTaken;
      }
    }
    w = __shfl_sync(kFull, w, bi % 32);
    if (lane == j) {
      my_w = w;
      my_idx = bi;
    }
  }
  const float d = p.renorm ? route::renorm_denominator(p.kind, warp_sum(my_w)) : 1.0f;
  if (lane < p.k) {
    p.indices[r * p.k + lane] = my_idx;
    p.weights[r * p.k + lane] = (p.renorm ? my_w / d : my_w) * p.scale;
  }
}

template <typename T, int kPer>
cudaError_t launch(const Params<T>& p, cudaStream_t stream) {
  const int64_t blocks = (p.rows + kWarps - 1) / kWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const size_t smem =
      p.kind == route::kSigmoid && p.topk_group < p.n_group ? sizeof(float) * kWarps * p.E : 0;
  route_kernel<T, kPer><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Params<T>& p, cudaStream_t stream) {
  if (p.E <= 32) return launch<T, 1>(p, stream);
  if (p.E <= 64) return launch<T, 2>(p, stream);
  if (p.E <= 128) return launch<T, 4>(p, stream);
  if (p.E <= 256) return launch<T, 8>(p, stream);
  return launch<T, 16>(p, stream);
}

}  // namespace

cudaError_t launch_route(DType dtype, const void* logits, int64_t stride, int64_t rows, int64_t E,
                         int64_t k, const float* offsets, const int8_t* modes, int64_t S,
                         const void* slot, bool slot_long, const float* bias, int kind, bool renorm,
                         int64_t n_group, int64_t topk_group, float scale, int64_t* indices,
                         float* weights, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows < 0 || E < 1 || E > kRouteMaxExperts || k < 1 || k > E || k > kRouteMaxK ||
      n_group < 1 || n_group > route::kMaxGroups || E % n_group != 0 || topk_group < 1 ||
      topk_group > n_group || (S > 0 && (offsets == nullptr || modes == nullptr)))
    return cudaErrorInvalidValue;
  const int e = static_cast<int>(E), kk = static_cast<int>(k);
  const int ng = static_cast<int>(n_group), tg = static_cast<int>(topk_group);
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed(Params<float>{static_cast<const float*>(logits), stride, rows, e, kk,
                                        offsets, modes, S, slot, slot_long, bias, kind, renorm, ng,
                                        tg, scale, indices, weights},
                          stream);
    case DType::kFloat16:
      return launch_typed(Params<__half>{static_cast<const __half*>(logits), stride, rows, e, kk,
                                         offsets, modes, S, slot, slot_long, bias, kind, renorm, ng,
                                         tg, scale, indices, weights},
                          stream);
    case DType::kBFloat16:
      return launch_typed(Params<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(logits), stride,
                                                rows, e, kk, offsets, modes, S, slot, slot_long,
                                                bias, kind, renorm, ng, tg, scale, indices,
                                                weights},
                          stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace actshift
