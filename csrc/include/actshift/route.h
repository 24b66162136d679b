// Device-agnostic math of the `route` op (MoE routing with per-row expert edits), shared by
// csrc/cpu/route.cpp and csrc/cuda/route.cu so every backend picks the same experts. The contract
// is actshift.reference.route; per row, with z = logit + offset[slot] (offsets already scaled by
// the plan's strength, one fp32 add, so every backend rounds alike):
//   softmax (kind 0): score = softmax(z) over experts not switched off; key = z
//   sigmoid (kind 1): score = sigmoid(z); key = score + bias; groups of E / n_group experts score
//                     the sum of their two best live keys; the topk_group best groups are eligible
//   pick k experts by (tier, key, -index) descending: tier 2 forced on, 1 eligible, 0 live but
//   outside the chosen groups, -1 switched off (never picked; plan checks guarantee k live ones)
//   weight = score of each pick; renorm divides by their sum (+1e-20 for sigmoid); times scale.
#pragma once

#include <cmath>

#include "actshift/common.h"

namespace actshift {
namespace route {

enum Kind : int { kSoftmax = 0, kSigmoid = 1 };
enum Mode : int { kFree = 0, kOff = 1, kOn = 2 };
constexpr int kMaxGroups = 32;  // group-limited routing keeps one group per warp lane (CUDA)

ACTSHIFT_HD float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

ACTSHIFT_HD int tier(int mode, bool eligible) {
  return mode == kOn ? 2 : mode == kOff ? -1 : eligible ? 1 : 0;
}

// Whether candidate a ranks before b: higher tier, then larger key, then lower index.
ACTSHIFT_HD bool before(int tier_a, float key_a, int idx_a, int tier_b, float key_b, int idx_b) {
  if (tier_a != tier_b) return tier_a > tier_b;
  if (key_a != key_b) return key_a > key_b;
  return idx_a < idx_b;
}

// Group scores rank like picks: larger score, then lower group index.
ACTSHIFT_HD bool group_before(float a, int ga, float b, int gb) {
  return a != b ? a > b : ga < gb;
}

// The divisor of the renormalisation.
ACTSHIFT_HD float renorm_denominator(int kind, float sum) {
  return kind == kSigmoid ? sum + 1e-20f : sum;
}

}  // namespace route
}  // namespace actshift
