// Device-agnostic math of the sparse ops (sparse_threshold, sparse_linear, relu_ffn), shared by
// csrc/cpu/{sparse_threshold,sparse_linear,relu_ffn}.cpp and the CUDA kernels, so every backend
// makes the same keep/skip decision and computes the same activation (all in fp32).
//
//   keep(v, t):      |v| > t, and NaN is kept (written !(|v| <= t)), so NaN propagates.
//   threshold(v, t): keep(v, t) ? v : 0                       (sparse_threshold, sparse_linear)
//   relu_ffn, gated:      h = gate_act(g) * up_act(u);   non-gated: h = gate_act(g)
//     relu    (0): gate_act = relu(g)                           up_act = u
//     fatrelu (1): gate_act = g if g > T else 0                 up_act = u
//     relu2   (2): gate_act = relu(g)^2                         up_act = u
//     drelu   (3): gate_act = relu(g)                           up_act = relu(u)   (gated only)
//     cats    (4): gate_act = s if |s| > T else 0, s = silu(g)  up_act = u         (gated only)
//   A neuron is active iff gate_act(g) != 0 (NaN counts as active); inactive neurons contribute
//   exactly 0 for finite weights, so their up and down rows are never read.
#pragma once

#include <cmath>

#include "actshift/common.h"

namespace actshift {
namespace sparse {

enum Act : int { kRelu = 0, kFatRelu = 1, kRelu2 = 2, kDRelu = 3, kCats = 4 };
constexpr int kNumActs = 5;

// dReLU and CATS are defined on a gate and an up branch; the others also have a non-gated form.
ACTSHIFT_HD bool gated_only(int act) { return act == kDRelu || act == kCats; }
// Only FATReLU and CATS have a threshold; the other activations take T = 0.
ACTSHIFT_HD bool uses_threshold(int act) { return act == kFatRelu || act == kCats; }

ACTSHIFT_HD bool keep(float v, float t) { return !(fabsf(v) <= t); }
ACTSHIFT_HD float threshold(float v, float t) { return keep(v, t) ? v : 0.0f; }

// relu that lets NaN through (like torch.relu), so a NaN gate marks its neuron active.
ACTSHIFT_HD float relu(float g) { return g <= 0.0f ? 0.0f : g; }
ACTSHIFT_HD float silu(float g) { return g / (1.0f + expf(-g)); }

ACTSHIFT_HD float gate_act(int act, float g, float t) {
  switch (act) {
    case kFatRelu: return g <= t ? 0.0f : g;
    case kRelu2: {
      const float r = relu(g);
      return r * r;
    }
    case kCats: return threshold(silu(g), t);
    default: return relu(g);  // kRelu, kDRelu
  }
}

ACTSHIFT_HD float up_act(int act, float u) { return act == kDRelu ? relu(u) : u; }

}  // namespace sparse
}  // namespace actshift
