// Argument checks of the sparse ops (sparse_threshold, sparse_linear, relu_ffn), shared by the CPU
// and CUDA torch implementations. Values of a threshold tensor are checked only on the CPU (on a
// GPU that would cost a device sync; the Python wrapper checks them in eager mode).
#include <cstring>

#include "actshift/sparse.h"
#include "ops.h"

namespace actshift {

namespace {

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [rows, n], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
}

// A tensor of x's dtype and device, contiguous, with the given shape.
void check_like_x(const at::Tensor& x, const at::Tensor& t, const char* op, const char* name,
                  at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                   x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_optional(const at::Tensor& x, const std::optional<at::Tensor>& t, const char* op,
                    const char* name, at::IntArrayRef shape) {
  if (t.has_value()) check_like_x(x, *t, op, name, shape);
}

void check_threshold_value(double t, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(t) && t >= 0.0, op, ": threshold must be finite and >= 0, got ",
                    t);
}

}  // namespace

void check_sparse_threshold_args(const at::Tensor& x, const at::Tensor& threshold, const char* op) {
  check_x(x, op);
  const int64_t n = x.size(1);
  TORCH_CHECK_TYPE(threshold.scalar_type() == at::kFloat, op, ": threshold must be float32, got ",
                   threshold.scalar_type());
  TORCH_CHECK_VALUE(threshold.dim() == 1 && (threshold.size(0) == 1 || threshold.size(0) == n),
                    op, ": threshold must be [1] or [", n, "] (one per input channel), got shape ",
                    threshold.sizes());
  TORCH_CHECK_VALUE(threshold.device() == x.device(), op, ": threshold is on ", threshold.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(threshold.is_contiguous(), op, ": threshold must be contiguous");
  if (threshold.device().is_cpu()) {
    // memcpy: the CPU ops align their inputs only after these checks (see cpu/aligned.h).
    const auto* t = static_cast<const char*>(threshold.data_ptr());
    for (int64_t i = 0; i < threshold.numel(); ++i) {
      float v;
      std::memcpy(&v, t + i * sizeof(float), sizeof(float));
      check_threshold_value(v, op);
    }
  }
}

void check_sparse_linear_args(const at::Tensor& x, const at::Tensor& weight_t,
                              const at::Tensor& threshold, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse_linear";
  check_sparse_threshold_args(x, threshold, op);
  TORCH_CHECK_VALUE(weight_t.dim() == 2 && weight_t.size(0) == x.size(1), op,
                    ": weight_t must be [in, out] with in = x's last dim ", x.size(1),
                    ", got shape ", weight_t.sizes());
  check_like_x(x, weight_t, op, "weight_t", weight_t.sizes());
  check_optional(x, bias, op, "bias", {weight_t.size(1)});
}

void check_relu_ffn_args(const at::Tensor& x, const at::Tensor& w_gate,
                         const std::optional<at::Tensor>& w_up, const at::Tensor& w_down_t,
                         int64_t act, double threshold, const std::optional<at::Tensor>& b_gate,
                         const std::optional<at::Tensor>& b_up,
                         const std::optional<at::Tensor>& b_down) {
  constexpr const char* op = "relu_ffn";
  check_x(x, op);
  TORCH_CHECK_VALUE(act >= 0 && act < sparse::kNumActs, op,
                    ": act must be 0 (relu), 1 (fatrelu), 2 (relu2), 3 (drelu) or 4 (cats), got ",
                    act);
  TORCH_CHECK_VALUE(w_up.has_value() || !sparse::gated_only(act), op, ": act ", act,
                    " (drelu/cats) needs w_up (a gated FFN)");
  check_threshold_value(threshold, op);
  TORCH_CHECK_VALUE(threshold == 0.0 || sparse::uses_threshold(static_cast<int>(act)), op,
                    ": threshold is used by fatrelu and cats only; got ", threshold, " for act ",
                    act);
  const int64_t d = x.size(1);
  TORCH_CHECK_VALUE(w_gate.dim() == 2 && w_gate.size(1) == d, op,
                    ": w_gate must be [ffn, d] with d = x's last dim ", d, ", got shape ",
                    w_gate.sizes());
  const int64_t ffn = w_gate.size(0);
  check_like_x(x, w_gate, op, "w_gate", {ffn, d});
  check_optional(x, w_up, op, "w_up", {ffn, d});
  check_like_x(x, w_down_t, op, "w_down_t", {ffn, d});
  check_optional(x, b_gate, op, "b_gate", {ffn});
  TORCH_CHECK_VALUE(w_up.has_value() || !b_up.has_value(), op, ": b_up needs w_up");
  check_optional(x, b_up, op, "b_up", {ffn});
  check_optional(x, b_down, op, "b_down", {d});
}

}  // namespace actshift
