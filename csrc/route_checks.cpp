// Argument checks of `route`, shared by the CPU and CUDA implementations. Values of the bank and
// slots are checked on the CPU only (on a GPU a check would cost a device sync; the Python
// wrapper validates plans when they are built, and the CUDA kernel treats an out-of-range slot as
// -1, like steer).
#include "actshift/route.h"
#include "ops.h"

namespace actshift {

void check_route_args(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& offsets,
                      const std::optional<at::Tensor>& modes, const std::optional<at::Tensor>& slot,
                      const std::optional<at::Tensor>& bias, int64_t kind, int64_t n_group,
                      int64_t topk_group, double scale) {
  constexpr const char* op = "route";
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                       logits.scalar_type() == at::kBFloat16,
                   op, ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be [rows, E], got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.stride(1) == 1, op, ": logits must have a contiguous last dim");
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1, op, ": logits must have at least one expert");
  TORCH_CHECK_VALUE(k >= 1 && k <= E, op, ": k must be in [1, E=", E, "], got ", k);
  TORCH_CHECK_VALUE(kind == route::kSoftmax || kind == route::kSigmoid, op,
                    ": kind must be 0 (softmax) or 1 (sigmoid), got ", kind);
  TORCH_CHECK_VALUE(n_group >= 1 && n_group <= route::kMaxGroups && E % n_group == 0, op,
                    ": n_group must divide E=", E, " and be in [1, ", route::kMaxGroups, "], got ",
                    n_group);
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, op, ": topk_group must be in [1, n_group=",
                    n_group, "], got ", topk_group);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(offsets.has_value() == modes.has_value(), op,
                    ": offsets and modes come together (a bank) or not at all");
  if (offsets.has_value()) {
    TORCH_CHECK_TYPE(offsets->scalar_type() == at::kFloat, op, ": offsets must be float32, got ",
                     offsets->scalar_type());
    TORCH_CHECK_VALUE(offsets->dim() == 2 && offsets->size(1) == E, op,
                      ": offsets must be [S, E=", E, "], got shape ", offsets->sizes());
    TORCH_CHECK_TYPE(modes->scalar_type() == at::kChar, op, ": modes must be int8, got ",
                     modes->scalar_type());
    TORCH_CHECK_VALUE(modes->sizes() == offsets->sizes(), op, ": modes must have offsets' shape ",
                      offsets->sizes(), ", got ", modes->sizes());
    for (const at::Tensor* t : {&*offsets, &*modes}) {
      TORCH_CHECK_VALUE(t->device() == logits.device(), op, ": the bank is on ", t->device(),
                        " but logits are on ", logits.device());
      TORCH_CHECK_VALUE(t->is_contiguous(), op, ": offsets and modes must be contiguous");
    }
  }
  if (slot.has_value()) {
    TORCH_CHECK_TYPE(slot->scalar_type() == at::kInt || slot->scalar_type() == at::kLong, op,
                     ": slot must be int32 or int64, got ", slot->scalar_type());
    TORCH_CHECK_VALUE(slot->dim() == 1 && slot->size(0) == logits.size(0), op,
                      ": slot must be [rows=", logits.size(0), "], got shape ", slot->sizes());
    TORCH_CHECK_VALUE(slot->device() == logits.device(), op, ": slot is on ", slot->device(),
                      " but logits are on ", logits.device());
    TORCH_CHECK_VALUE(slot->is_contiguous(), op, ": slot must be contiguous");
  }
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == E, op, ": bias must be [E=", E,
                      "], got shape ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == logits.device(), op, ": bias is on ", bias->device(),
                      " but logits are on ", logits.device());
    TORCH_CHECK_VALUE(bias->is_contiguous(), op, ": bias must be contiguous");
  }
}

void check_route_values(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& offsets,
                        const std::optional<at::Tensor>& modes, const std::optional<at::Tensor>& slot) {
  constexpr const char* op = "route";
  if (!offsets.has_value()) return;
  const int64_t S = offsets->size(0), E = offsets->size(1);
  const float* o = offsets->const_data_ptr<float>();
  const int8_t* m = modes->const_data_ptr<int8_t>();
  for (int64_t s = 0; s < S; ++s) {
    int64_t on = 0, off = 0;
    for (int64_t e = 0; e < E; ++e) {
      TORCH_CHECK_VALUE(std::isfinite(o[s * E + e]), op, ": offsets of plan ", s,
                        " contain NaN or Inf");
      const int v = m[s * E + e];
      TORCH_CHECK_VALUE(v == route::kFree || v == route::kOff || v == route::kOn, op,
                        ": modes must hold 0 (free), 1 (off) or 2 (on), got ", v);
      on += v == route::kOn;
      off += v == route::kOff;
    }
    TORCH_CHECK_VALUE(on <= k, op, ": plan ", s, " forces ", on, " experts on but k=", k);
    TORCH_CHECK_VALUE(E - off >= k, op, ": plan ", s, " switches off ", off, " of ", E,
                      " experts, leaving fewer than k=", k);
  }
  if (slot.has_value() && S > 0) {
    for (int64_t r = 0; r < slot->size(0); ++r) {
      const int64_t s = slot->scalar_type() == at::kLong ? slot->const_data_ptr<int64_t>()[r]
                                                         : slot->const_data_ptr<int32_t>()[r];
      TORCH_CHECK_VALUE(s >= -1 && s < S, op, ": slot holds ", s, ", out of range for a bank of ", S,
                        " plan(s) (-1 leaves a row unedited)");
    }
  }
  (void)logits;
}

std::tuple<at::Tensor, at::Tensor> route_outputs(const at::Tensor& logits, int64_t k) {
  return {at::empty({logits.size(0), k}, logits.options().dtype(at::kLong)),
          at::empty({logits.size(0), k}, logits.options().dtype(at::kFloat))};
}

}  // namespace actshift
