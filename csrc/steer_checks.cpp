// Argument checks of the steer op, shared by the CPU and CUDA torch implementations.
#include "ops.h"

#include "actshift/steer.h"

namespace actshift {

namespace {
void check_float32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "steer: ", name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, "steer: ", name, " must have ", dim, " dims, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "steer: ", name, " must be contiguous");
}
void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "steer: ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}
}  // namespace

void check_steer_args(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                      const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& slot) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   "steer: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "steer: x must be [rows, d], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) == 0 || x.stride(1) == 1, "steer: x must have a contiguous last dim");
  check_float32(vectors, "vectors", 3);
  check_float32(weights, "weights", 2);
  check_float32(strength, "strength", 1);
  const int64_t rows = x.size(0), d = x.size(1), S = vectors.size(0), m = vectors.size(1);
  TORCH_CHECK_VALUE(S >= 1, "steer: vectors must hold at least one plan");
  TORCH_CHECK_VALUE(m <= steer::kMaxVectors, "steer: vectors holds ", m,
                    " vectors per plan; at most ", steer::kMaxVectors,
                    " are supported (fold static weights into one vector)");
  TORCH_CHECK_VALUE(vectors.size(2) == d, "steer: vectors have hidden size ", vectors.size(2),
                    " but x has ", d);
  TORCH_CHECK_VALUE(weights.size(0) == S && weights.size(1) == m, "steer: weights must be [", S,
                    ", ", m, "], got ", weights.sizes());
  TORCH_CHECK_VALUE(strength.size(0) == S, "steer: strength must be [", S, "], got ",
                    strength.sizes());
  check_same_device(x, vectors, "vectors");
  check_same_device(x, weights, "weights");
  check_same_device(x, strength, "strength");
  if (gate.has_value()) {
    check_float32(*gate, "gate", 1);
    TORCH_CHECK_VALUE(gate->size(0) == rows, "steer: gate must be [", rows, "], got ",
                      gate->sizes());
    check_same_device(x, *gate, "gate");
  }
  if (slot.has_value()) {
    TORCH_CHECK_TYPE(slot->scalar_type() == at::kInt || slot->scalar_type() == at::kLong,
                     "steer: slot must be int32 or int64, got ", slot->scalar_type());
    TORCH_CHECK_VALUE(slot->dim() == 1 && slot->size(0) == rows, "steer: slot must be [", rows,
                      "], got ", slot->sizes());
    TORCH_CHECK_VALUE(slot->is_contiguous(), "steer: slot must be contiguous");
    check_same_device(x, *slot, "slot");
  }
}

void check_steer_out(const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), "steer: out must have x's dtype ",
                   x.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == x.sizes(), "steer: out must have x's shape ", x.sizes(),
                    ", got ", out.sizes());
  check_same_device(x, out, "out");
  TORCH_CHECK_VALUE(out.size(1) == 0 || out.stride(1) == 1,
                    "steer: out must have a contiguous last dim");
  if (out.numel() == 0 || (out.data_ptr() == x.data_ptr() && out.strides() == x.strides())) return;
  // Rows are read and written tile by tile, so out may be x itself but must not partially overlap.
  const auto span = [](const at::Tensor& t) {
    const auto* p = static_cast<const char*>(t.data_ptr());
    return std::make_pair(p, p + ((t.size(0) - 1) * t.stride(0) + t.size(1)) * t.element_size());
  };
  const auto [x0, x1] = span(x);
  const auto [o0, o1] = span(out);
  TORCH_CHECK_VALUE(o1 <= x0 || x1 <= o0, "steer: out overlaps x; pass out=x for in-place "
                    "steering or a separate tensor");
}

}  // namespace actshift
