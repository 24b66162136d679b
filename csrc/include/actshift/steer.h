// Device-agnostic math of the `steer` op (additive part) and of the full `steer_program`, shared
// by csrc/cpu/steer.cpp and csrc/cuda/steer.cu so the CPU kernel that CI tests and the CUDA kernel
// compute the same thing.
//
// Per row r of x [rows, d], with a bank of S plans (vectors [S, m, d], weights [S, m], strength [S]):
//   s = slot ? slot[r] : 0            (s < 0: the row is copied unchanged)
//   g = gate ? gate[r] : 1
//   c_j = (strength[s] * g) * weights[s, j]                       (fp32)
//   y[r, i] = x[r, i] + sum_j c_j * vectors[s, j, i]              (fp32 accumulation, j ascending)
// This equals the contract y = x_in + λ·g·(x − x_in) with x = x_in + Σ_j w_j v_j.
#pragma once

#include <math.h>

#include "actshift/common.h"

namespace actshift {
namespace steer {

// Maximum number of additive vectors per plan. Bounds the per-row coefficient array that kernels
// keep in registers / on the stack; plans with more vectors should be folded first (Σ w_j v_j is a
// single vector when the weights are static).
constexpr int kMaxVectors = 16;

// Resolves the plan index of a row; returns -1 for rows that must stay untouched.
// Slots >= num_plans are rejected on the host before launch; the device treats them as -1 as well,
// so a stale slot table can never read out of bounds.
template <typename IndexT>
ACTSHIFT_HD int64_t resolve_slot(const IndexT* slot, int64_t row, int64_t num_plans) {
  if (slot == nullptr) return 0;
  const int64_t s = static_cast<int64_t>(slot[row]);
  return (s < 0 || s >= num_plans) ? -1 : s;
}

// Fills coef[0..m) with the per-row coefficients c_j = (λ_s · g_r) · w_{s,j}.
ACTSHIFT_HD void row_coefficients(const float* weights, const float* strength, const float* gate,
                                  int64_t row, int64_t s, int m, float* coef) {
  const float scale = strength[s] * (gate != nullptr ? gate[row] : 1.0f);
  for (int j = 0; j < m; ++j) coef[j] = scale * weights[s * m + j];
}

// y_i = x_i + Σ_j c_j · v_{j,i} for one element, accumulated in fp32 in ascending j.
// `vectors` points at plan s's first vector; `d` is the row length (stride between vectors).
ACTSHIFT_HD float apply_add(float x, const float* coef, const float* vectors, int m, int64_t d,
                            int64_t i) {
  float acc = x;
  for (int j = 0; j < m; ++j) acc += coef[j] * vectors[j * d + i];
  return acc;
}

// --- the full steering program (op `steer_program`) ---------------------------------------------
//
// Per row r of x [rows, d] with plan s = slot[r] (default 0; s outside [0, S) leaves the row bit-exact
// and its monitors 0). All math in fp32; x below is the fp32 input row, never the running value.
// Plan s is described by meta[s] = {flags, k, m, n, p} (int32) and scalars[s] = {λ, threshold}:
//   read-outs:  mon_i = x·M_i (i < p)   dot_k = x·u_k (k < K_s)   ‖x‖   score = x·c (projection)
//               or x·c / ‖x‖ (cosine; c is stored unit-norm; 0 when ‖x‖ = 0)
//   gate:       g = gate[r] · (kCondition ? (score > thr, or < thr with kConditionLess) : 1)
//   mix:        c = λ · g; when c == 0 the row is copied bit-exactly (no renorm either)
//   program:    z = x − Σ_k (dot_k − t_k) u_k          (ablate / clamp; U orthonormal, so the
//                                                       dots on x equal the sequential ones)
//               z = a ⊙ z + b                           (kAffine; affine[s] = {a, b})
//               z = z + Σ_j w_j v_j                     (w = row_weights[r] if given, else weights[s])
//               z[idx_q] = mul_q · z[idx_q] + add_q     (q < n; indices unique within a plan)
//   output:     y = x + c · (z − x);  kRenorm: y ← y · ‖x‖ / ‖y‖ (when ‖y‖ > 0)
// Counts above a tensor's padded size, and unknown flag bits, are errors on the CPU; GPU kernels
// clamp counts to the padded sizes (and skip neuron indices outside [0, d)) so bad metadata can never
// read out of bounds.

// At most this many ablation directions, add vectors and monitors per plan (per-row coefficients
// live in registers / on the stack).
constexpr int kMaxDirections = 16;
constexpr int kMaxMonitors = 16;

// meta columns
constexpr int kMetaFlags = 0, kMetaAblate = 1, kMetaAdd = 2, kMetaNeurons = 3, kMetaMonitors = 4;
constexpr int kMetaCols = 5;
// scalars columns
constexpr int kScalarStrength = 0, kScalarThreshold = 1;
constexpr int kScalarCols = 2;
// flags bits
constexpr int32_t kAffine = 1;          // z = a ⊙ z + b
constexpr int32_t kCondition = 2;       // gate the row by the condition score
constexpr int32_t kConditionCosine = 4; // score is the cosine (else the projection x·c)
constexpr int32_t kConditionLess = 8;   // the condition holds when score < threshold (else >)
constexpr int32_t kRenorm = 16;         // y ← y · ‖x‖ / ‖y‖
constexpr int32_t kKnownFlags = kAffine | kCondition | kConditionCosine | kConditionLess | kRenorm;

// The condition score from the read-outs (dot = x·c, norm = ‖x‖).
ACTSHIFT_HD float condition_score(int32_t flags, float dot, float norm) {
  if (!(flags & kConditionCosine)) return dot;
  return norm > 0.0f ? dot / norm : 0.0f;
}

// 1 when the condition holds (or the plan has none), else 0.
ACTSHIFT_HD float condition_gate(int32_t flags, float score, float threshold) {
  if (!(flags & kCondition)) return 1.0f;
  const bool holds = (flags & kConditionLess) ? score < threshold : score > threshold;
  return holds ? 1.0f : 0.0f;
}

// z_i for steps 1-3 (ablate, affine, add) of one element. `ablate_coef[k]` = dot_k − t_k,
// `add_coef[j]` = w_j; U and V point at the plan's first direction / vector (row length d apart);
// `affine` at the plan's {a, b} rows, or nullptr without kAffine.
ACTSHIFT_HD float program_element(float x, const float* ablate_coef, const float* U, int k,
                                  const float* affine, const float* add_coef, const float* V,
                                  int m, int64_t d, int64_t i) {
  float z = x;
  for (int q = 0; q < k; ++q) z -= ablate_coef[q] * U[q * d + i];
  if (affine != nullptr) z = affine[i] * z + affine[d + i];
  for (int j = 0; j < m; ++j) z += add_coef[j] * V[j * d + i];
  return z;
}

// Step 4 on one selected element.
ACTSHIFT_HD float neuron_edit(float z, float mul, float add) { return mul * z + add; }

// y = x + c · (z − x).
ACTSHIFT_HD float mix(float x, float z, float c) { return x + c * (z - x); }

// The renorm factor ‖x‖ / ‖y‖ from the squared norms (1 when y is zero).
ACTSHIFT_HD float renorm_factor(float x_sq, float y_sq) {
  return y_sq > 0.0f ? sqrtf(x_sq) / sqrtf(y_sq) : 1.0f;
}

}  // namespace steer
}  // namespace actshift
