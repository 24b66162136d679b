// Device-agnostic math of the `steer` op (additive part), shared by csrc/cpu/steer.cpp and
// csrc/cuda/steer.cu so the CPU kernel that CI tests and the CUDA kernel compute the same thing.
//
// Per row r of x [rows, d], with a bank of S plans (vectors [S, m, d], weights [S, m], strength [S]):
//   s = slot ? slot[r] : 0            (s < 0: the row is copied unchanged)
//   g = gate ? gate[r] : 1
//   c_j = (strength[s] * g) * weights[s, j]                       (fp32)
//   y[r, i] = x[r, i] + sum_j c_j * vectors[s, j, i]              (fp32 accumulation, j ascending)
// This equals the contract y = x_in + λ·g·(x − x_in) with x = x_in + Σ_j w_j v_j.
#pragma once

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

}  // namespace steer
}  // namespace actshift
