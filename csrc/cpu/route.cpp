// C++ CPU kernel of `route`: MoE routing with per-row expert edits (math: actshift/route.h). Rows
// are independent and parallel; each row is O(k * E) selection passes over fp32 scratch, which at
// E <= 512 and k <= 16 stays in L1 and beats a sort.
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "actshift/route.h"
#include "cpu/convert.h"
#include "ops.h"

namespace actshift {
namespace {

using cpu::load;

struct Args {
  int64_t E, k, S;
  const float* offsets;
  const int8_t* modes;
  const void* slot;
  bool slot_long;
  const float* bias;
  int kind;
  bool renorm;
  int64_t n_group, topk_group;
  float scale;
};

int64_t slot_of(const Args& a, int64_t r) {
  if (a.S == 0) return -1;
  if (a.slot == nullptr) return 0;
  const int64_t s = a.slot_long ? static_cast<const int64_t*>(a.slot)[r]
                                : static_cast<const int32_t*>(a.slot)[r];
  return s >= 0 && s < a.S ? s : -1;
}

template <typename T>
void route_row(const Args& a, const T* logits, int64_t r, float* score, float* key, int8_t* tier,
               int64_t* idx_out, float* w_out) {
  const int64_t E = a.E;
  const int64_t s = slot_of(a, r);
  const float* off = s >= 0 ? a.offsets + s * E : nullptr;
  const int8_t* mode = s >= 0 ? a.modes + s * E : nullptr;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) {
    const float z = load(logits, e);
    key[e] = off ? z + off[e] : z;
    tier[e] = static_cast<int8_t>(route::tier(mode ? mode[e] : route::kFree, true));
  }
  if (a.kind == route::kSoftmax) {
    float m = ninf;
    for (int64_t e = 0; e < E; ++e)
      if (tier[e] >= 0 && key[e] > m) m = key[e];
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      score[e] = tier[e] >= 0 ? std::exp(key[e] - m) : 0.0f;
      sum += score[e];
    }
    for (int64_t e = 0; e < E; ++e) score[e] /= sum;
  } else {
    for (int64_t e = 0; e < E; ++e) {
      score[e] = route::sigmoid(key[e]);
      key[e] = score[e] + (a.bias ? a.bias[e] : 0.0f);
    }
    const int64_t G = E / a.n_group;
    float gscore[route::kMaxGroups];
    for (int64_t g = 0; g < a.n_group; ++g) {
      float b1 = ninf, b2 = ninf;
      for (int64_t e = g * G; e < (g + 1) * G; ++e) {
        const float v = tier[e] >= 0 ? key[e] : ninf;
        if (v > b1) {
          b2 = b1;
          b1 = v;
        } else if (v > b2) {
          b2 = v;
        }
      }
      gscore[g] = G >= 2 ? b1 + b2 : b1;
    }
    for (int64_t g = 0; g < a.n_group; ++g) {
      int64_t rank = 0;  // groups ranked before g
      for (int64_t h = 0; h < a.n_group; ++h)
        rank += route::group_before(gscore[h], h, gscore[g], g);
      if (rank >= a.topk_group)
        for (int64_t e = g * G; e < (g + 1) * G; ++e)
          if (tier[e] == 1) tier[e] = 0;
    }
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < a.k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      if (tier[e] < 0) continue;
      if (best < 0 || route::before(tier[e], key[e], e, tier[best], key[best], best)) best = e;
    }
    // best >= 0: the plan checks leave at least k live experts.
    idx_out[j] = best;
    w_out[j] = score[best];
    sum += score[best];
    tier[best] = -2;  // taken
  }
  const float d = a.renorm ? route::renorm_denominator(a.kind, sum) : 1.0f;
  for (int64_t j = 0; j < a.k; ++j) w_out[j] = (a.renorm ? w_out[j] / d : w_out[j]) * a.scale;
}

template <typename T>
void run(const at::Tensor& logits, const Args& a, at::Tensor& idx, at::Tensor& w) {
  const int64_t rows = logits.size(0), E = a.E;
  const T* lp = logits.const_data_ptr<T>();
  const int64_t stride = logits.stride(0);
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  float* wp = w.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, E * a.k));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> score(E), key(E);
    std::vector<int8_t> tier(E);
    for (int64_t r = begin; r < end; ++r)
      route_row<T>(a, lp + r * stride, r, score.data(), key.data(), tier.data(), ip + r * a.k,
                   wp + r * a.k);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits, int64_t k,
                                             const std::optional<at::Tensor>& offsets,
                                             const std::optional<at::Tensor>& modes,
                                             const std::optional<at::Tensor>& slot,
                                             const std::optional<at::Tensor>& bias, int64_t kind,
                                             bool renorm, int64_t n_group, int64_t topk_group,
                                             double scale) {
  check_route_args(logits, k, offsets, modes, slot, bias, kind, n_group, topk_group, scale);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "route: logits must be a CPU tensor for the cpu backend");
  check_route_values(logits, k, offsets, modes, slot);
  auto [idx, w] = route_outputs(logits, k);
  if (logits.size(0) == 0) return {idx, w};
  const Args a{logits.size(1),
               k,
               offsets.has_value() ? offsets->size(0) : 0,
               offsets.has_value() ? offsets->const_data_ptr<float>() : nullptr,
               modes.has_value() ? modes->const_data_ptr<int8_t>() : nullptr,
               slot.has_value() ? slot->const_data_ptr() : nullptr,
               slot.has_value() && slot->scalar_type() == at::kLong,
               bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
               static_cast<int>(kind),
               renorm,
               n_group,
               topk_group,
               static_cast<float>(scale)};
  switch (logits.scalar_type()) {
    case at::kFloat: run<float>(logits, a, idx, w); break;
    case at::kHalf: run<c10::Half>(logits, a, idx, w); break;
    default: run<c10::BFloat16>(logits, a, idx, w); break;
  }
  return {idx, w};
}

}  // namespace actshift
