// Argument checks and output allocation of the percentile ops, shared by the CPU and CUDA
// torch implementations.
#include "actshift/percentile.h"
#include "ops.h"

namespace actshift {

namespace {
void check_features(const at::Tensor& z, const char* op, const char* name) {
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat || z.scalar_type() == at::kHalf ||
                       z.scalar_type() == at::kBFloat16,
                   op, ": ", name, " must be float32, float16 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.dim() == 2, op, ": ", name, " must be [N, D], got shape ", z.sizes());
  TORCH_CHECK_VALUE(z.is_contiguous(), op, ": ", name, " must be contiguous");
}
}  // namespace

void check_percentile_args(const at::Tensor& z, const at::Tensor& k, int64_t method,
                           std::optional<double> clip) {
  check_features(z, "percentile_scale", "z");
  TORCH_CHECK_VALUE(method >= percentile::kRatio && method <= percentile::kReact,
                    "percentile_scale: method must be in [0, 5], got ", method);
  TORCH_CHECK_VALUE(!clip.has_value() || std::isfinite(*clip),
                    "percentile_scale: clip must be finite, got ", clip.value_or(0.0));
  TORCH_CHECK_VALUE(method != percentile::kReact || clip.has_value(),
                    "percentile_scale: react needs a clip value");
  TORCH_CHECK_TYPE(k.scalar_type() == at::kInt, "percentile_scale: k must be int32, got ",
                   k.scalar_type());
  TORCH_CHECK_VALUE(k.dim() == 1 && k.size(0) == z.size(0) && k.is_contiguous(),
                    "percentile_scale: k must be a contiguous [", z.size(0), "] tensor, got ",
                    k.sizes());
  TORCH_CHECK_VALUE(k.device() == z.device(), "percentile_scale: k is on ", k.device(),
                    " but z is on ", z.device());
  if (k.device().is_cpu() && method != percentile::kReact && k.numel() > 0) {
    const auto [lo, hi] = at::aminmax(k);
    TORCH_CHECK_VALUE(lo.item<int>() >= 1 && hi.item<int>() <= z.size(1),
                      "percentile_scale: k must be in [1, ", z.size(1), "], got [",
                      lo.item<int>(), ", ", hi.item<int>(), "]");
  }
}

void check_adascale_args(const at::Tensor& z, const at::Tensor& z_perturbed, int64_t k1,
                         int64_t k2) {
  check_features(z, "adascale_stats", "z");
  check_features(z_perturbed, "adascale_stats", "z_perturbed");
  TORCH_CHECK_VALUE(z_perturbed.sizes() == z.sizes() &&
                        z_perturbed.scalar_type() == z.scalar_type() &&
                        z_perturbed.device() == z.device(),
                    "adascale_stats: z_perturbed must match z (shape ", z.sizes(), ", ",
                    z.scalar_type(), ", ", z.device(), ")");
  const int64_t d = z.size(1);
  TORCH_CHECK_VALUE(k1 >= 1 && k1 <= d && k2 >= 1 && k2 <= d,
                    "adascale_stats: k1 and k2 must be in [1, ", d, "], got ", k1, " and ", k2);
}

std::tuple<at::Tensor, at::Tensor> percentile_outputs(const at::Tensor& z, int64_t method) {
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor y = at::empty({method == percentile::kRatio ? 0 : n, d}, z.options());
  at::Tensor r = at::empty({method == percentile::kReact ? 0 : n}, z.options().dtype(at::kFloat));
  return {y, r};
}

}  // namespace actshift
