// Device-agnostic math of percentile scaling (ASH, SCALE, ReAct, AdaSCALE), shared by
// csrc/cpu/percentile.cpp and csrc/cuda/percentile.cu.
//
// Per row z [D] with k kept elements (1 <= k <= D, computed on the host from the percentile as
// k = D - round_half_even(D * p / 100)):
//   tau   = the k-th largest value of z (exact selection on order-preserving uint32 keys)
//   c_gt  = #{z_i > tau},  s_gt = Σ_{z_i > tau} z_i
//   s1 = Σ z,  s2 = s_gt + (k - c_gt) * tau  (= sum of the top-k values, whatever the ties),  r = s1 / s2
//   kept(i) = z_i > tau, or z_i == tau and i is among the first (k - c_gt) such indices
//             (ties broken by index order: deterministic; torch.topk's choice is unspecified).
// Outputs per method (fp32 math, one rounding to the output dtype):
//   scale: z·e^r   ash_p: kept ? z : 0   ash_b: kept ? s1/k : 0   ash_s: (kept ? z : 0)·e^r
//   react: min(z, clip)   ratio: no y, only r.
// An optional clip (ReAct's c) is applied to z first for every method. A row holding NaN or Inf
// gives NaN outputs and r = NaN (documented propagation; checking on the host would cost a pass).
// A row whose top-k sum is 0 (e.g. all zeros) has r = s1/0: NaN or ±Inf, as in the papers' code.
#pragma once

#include <cstring>

#include "actshift/common.h"

namespace actshift {
namespace percentile {

enum Method : int { kRatio = 0, kScale = 1, kAshP = 2, kAshB = 3, kAshS = 4, kReact = 5 };

// Order-preserving map from float to uint32: a < b  <=>  key(a) < key(b), and a == b  <=>
// key(a) == key(b), for non-NaN a, b (-0.0 is first turned into +0.0, since they compare equal).
// Every NaN, whatever its sign bit (inf - inf gives -NaN on x86), gets the largest key, as
// torch.sort orders NaN (and as kernels/percentile.py does).
ACTSHIFT_HD uint32_t key(float v) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(v);
#else
  std::memcpy(&bits, &v, sizeof(bits));
#endif
  bits = bits == 0x80000000u ? 0u : bits;  // -0.0 -> +0.0
  // Branch-free (so loops over it vectorize): negative values flip every bit, others the sign bit.
  const uint32_t mask = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
  return v != v ? 0xFFFFFFFFu : bits ^ mask;
}

ACTSHIFT_HD float from_key(uint32_t k) {
  const uint32_t mask = ((k >> 31) - 1u) | 0x80000000u;  // top bit set: a non-negative value
  const uint32_t bits = k ^ mask;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

ACTSHIFT_HD bool is_finite(float v) { return v - v == 0.0f; }

ACTSHIFT_HD float clip(float v, bool has_clip, float c) { return (has_clip && v > c) ? c : v; }

// Radix select digits: 4 passes of 8 bits, most significant first.
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kRadixPasses = 32 / kRadixBits;

// Given the histogram (nbins bins) of the current digit over the elements matching the prefix so
// far, and the rank k (1-based, counted from the largest) still to find, returns the bin that
// holds it and updates k to the rank within that bin.
ACTSHIFT_HD int pick_bin(const int* hist, int nbins, int& k) {
  for (int b = nbins - 1; b >= 0; --b) {
    if (k <= hist[b]) return b;
    k -= hist[b];
  }
  return 0;  // unreachable when k <= the number of candidates
}

// The top-k sum from the pieces the kernels gather: exact whatever the ties.
ACTSHIFT_HD float topk_sum(float s_gt, int64_t c_gt, int64_t k, float tau) {
  return s_gt + static_cast<float>(k - c_gt) * tau;
}

// Output value of element z (already clipped) for `method`, given whether it is kept and the row's
// statistics; `scale` is e^r.
ACTSHIFT_HD float shape(int method, float z, bool kept, float s1, int64_t k, float scale) {
  switch (method) {
    case kScale: return z * scale;
    case kAshP: return kept ? z : 0.0f;
    case kAshB: return kept ? s1 / static_cast<float>(k) : 0.0f;
    case kAshS: return (kept ? z : 0.0f) * scale;  // = ash_p · e^r, NaN everywhere if r is
    default: return z;  // kReact: the clip already happened
  }
}

// Methods whose output depends on which elements are kept (and so on ties).
ACTSHIFT_HD bool needs_mask(int method) { return method == kAshP || method == kAshB || method == kAshS; }

}  // namespace percentile
}  // namespace actshift
