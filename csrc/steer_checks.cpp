// Argument checks of the steer op, shared by the CPU and CUDA torch implementations.
#include "ops.h"

#include <algorithm>
#include <vector>

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

// --- steer_program ----------------------------------------------------------------------------

namespace {
void check_program_tensor(const at::Tensor& x, const at::Tensor& t, const char* name,
                          at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "steer_program: ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, "steer_program: ", name, " must have ", dim,
                    " dims, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "steer_program: ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == x.device(), "steer_program: ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}
// t must be [S, n, d] (n checked by the caller) for x's hidden size d.
void check_rows_of(const at::Tensor& t, const char* name, int64_t S, int64_t d) {
  TORCH_CHECK_VALUE(t.size(0) == S && t.size(2) == d, "steer_program: ", name, " must be [", S,
                    ", n, ", d, "], got ", t.sizes());
}
}  // namespace

void check_steer_program_args(const at::Tensor& x, const SteerProgram& p,
                              const std::optional<at::Tensor>& gate,
                              const std::optional<at::Tensor>& slot,
                              const std::optional<at::Tensor>& row_weights) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   "steer_program: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "steer_program: x must be [rows, d], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) == 0 || x.stride(1) == 1,
                    "steer_program: x must have a contiguous last dim");
  const int64_t rows = x.size(0), d = x.size(1);
  check_program_tensor(x, p.meta, "meta", at::kInt, 2);
  const int64_t S = p.meta.size(0);
  TORCH_CHECK_VALUE(S >= 1 && p.meta.size(1) == steer::kMetaCols, "steer_program: meta must be [S >= 1, ",
                    steer::kMetaCols, "], got ", p.meta.sizes());
  check_program_tensor(x, p.scalars, "scalars", at::kFloat, 2);
  TORCH_CHECK_VALUE(p.scalars.size(0) == S && p.scalars.size(1) == steer::kScalarCols,
                    "steer_program: scalars must be [", S, ", ", steer::kScalarCols, "], got ",
                    p.scalars.sizes());
  check_program_tensor(x, p.ablate, "ablate", at::kFloat, 3);
  check_rows_of(p.ablate, "ablate", S, d);
  const int64_t K = p.ablate.size(1);
  TORCH_CHECK_VALUE(K <= steer::kMaxDirections, "steer_program: ablate holds ", K,
                    " directions per plan; at most ", steer::kMaxDirections);
  check_program_tensor(x, p.targets, "targets", at::kFloat, 2);
  TORCH_CHECK_VALUE(p.targets.size(0) == S && p.targets.size(1) == K, "steer_program: targets must be [",
                    S, ", ", K, "], got ", p.targets.sizes());
  check_program_tensor(x, p.affine, "affine", at::kFloat, 3);
  check_rows_of(p.affine, "affine", S, d);
  TORCH_CHECK_VALUE(p.affine.size(1) == 2 || p.affine.size(1) == 0,
                    "steer_program: affine must be [S, 2, d] (scale, bias) or [S, 0, d], got ",
                    p.affine.sizes());
  check_program_tensor(x, p.vectors, "vectors", at::kFloat, 3);
  check_rows_of(p.vectors, "vectors", S, d);
  const int64_t M = p.vectors.size(1);
  TORCH_CHECK_VALUE(M <= steer::kMaxVectors, "steer_program: vectors holds ", M,
                    " vectors per plan; at most ", steer::kMaxVectors);
  check_program_tensor(x, p.weights, "weights", at::kFloat, 2);
  TORCH_CHECK_VALUE(p.weights.size(0) == S && p.weights.size(1) == M, "steer_program: weights must be [",
                    S, ", ", M, "], got ", p.weights.sizes());
  check_program_tensor(x, p.neuron_idx, "neuron_idx", at::kInt, 2);
  const int64_t N = p.neuron_idx.size(1);
  TORCH_CHECK_VALUE(p.neuron_idx.size(0) == S, "steer_program: neuron_idx must be [", S,
                    ", N], got ", p.neuron_idx.sizes());
  check_program_tensor(x, p.neuron_val, "neuron_val", at::kFloat, 3);
  TORCH_CHECK_VALUE(p.neuron_val.size(0) == S && p.neuron_val.size(1) == 2 && p.neuron_val.size(2) == N,
                    "steer_program: neuron_val must be [", S, ", 2, ", N, "] (mul, add), got ",
                    p.neuron_val.sizes());
  check_program_tensor(x, p.condition, "condition", at::kFloat, 3);
  check_rows_of(p.condition, "condition", S, d);
  TORCH_CHECK_VALUE(p.condition.size(1) <= 1, "steer_program: condition must be [S, 1, d] or [S, 0, d], got ",
                    p.condition.sizes());
  check_program_tensor(x, p.monitor, "monitor", at::kFloat, 3);
  check_rows_of(p.monitor, "monitor", S, d);
  TORCH_CHECK_VALUE(p.monitor.size(1) <= steer::kMaxMonitors, "steer_program: monitor holds ",
                    p.monitor.size(1), " read-outs per plan; at most ", steer::kMaxMonitors);
  if (gate.has_value()) {
    check_program_tensor(x, *gate, "gate", at::kFloat, 1);
    TORCH_CHECK_VALUE(gate->size(0) == rows, "steer_program: gate must be [", rows, "], got ",
                      gate->sizes());
  }
  if (slot.has_value()) {
    TORCH_CHECK_TYPE(slot->scalar_type() == at::kInt || slot->scalar_type() == at::kLong,
                     "steer_program: slot must be int32 or int64, got ", slot->scalar_type());
    check_program_tensor(x, *slot, "slot", slot->scalar_type(), 1);
    TORCH_CHECK_VALUE(slot->size(0) == rows, "steer_program: slot must be [", rows, "], got ",
                      slot->sizes());
  }
  if (row_weights.has_value()) {
    check_program_tensor(x, *row_weights, "row_weights", at::kFloat, 2);
    TORCH_CHECK_VALUE(row_weights->size(0) == rows && row_weights->size(1) == M,
                      "steer_program: row_weights must be [", rows, ", ", M, "], got ",
                      row_weights->sizes());
  }
}

void check_steer_program_values(const at::Tensor& x, const SteerProgram& p) {
  const int64_t S = p.meta.size(0), d = x.size(1), N = p.neuron_idx.size(1);
  const int32_t* meta = p.meta.const_data_ptr<int32_t>();
  const int32_t* idx = p.neuron_idx.const_data_ptr<int32_t>();
  const int64_t limits[steer::kMetaCols] = {0, p.ablate.size(1), p.vectors.size(1), N,
                                            p.monitor.size(1)};
  const char* names[steer::kMetaCols] = {"flags", "ablation directions (k)", "add vectors (m)",
                                         "neurons (n)", "monitors (p)"};
  for (int64_t s = 0; s < S; ++s) {
    const int32_t* row = meta + s * steer::kMetaCols;
    const int32_t flags = row[steer::kMetaFlags];
    TORCH_CHECK_VALUE((flags & ~steer::kKnownFlags) == 0, "steer_program: meta[", s,
                      "] has unknown flag bits ", flags);
    TORCH_CHECK_VALUE(!(flags & steer::kAffine) || p.affine.size(1) == 2, "steer_program: meta[", s,
                      "] asks for the affine map but affine is empty");
    TORCH_CHECK_VALUE(!(flags & steer::kCondition) || p.condition.size(1) == 1,
                      "steer_program: meta[", s, "] asks for a condition but condition is empty");
    for (int c = 1; c < steer::kMetaCols; ++c) {
      TORCH_CHECK_VALUE(row[c] >= 0 && row[c] <= limits[c], "steer_program: meta[", s, "] counts ",
                        row[c], " ", names[c], ", but the bank holds ", limits[c]);
    }
    const int32_t n = row[steer::kMetaNeurons];
    for (int32_t q = 0; q < n; ++q) {
      const int32_t i = idx[s * N + q];
      TORCH_CHECK_VALUE(i >= 0 && i < d, "steer_program: neuron_idx[", s, ", ", q, "] = ", i,
                        " is out of range for hidden size ", d);
    }
    // Kernels edit each selected element once, so a repeated index would not compose.
    std::vector<int32_t> sorted(idx + s * N, idx + s * N + n);
    std::sort(sorted.begin(), sorted.end());
    TORCH_CHECK_VALUE(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(),
                      "steer_program: neuron_idx[", s, "] repeats an index");
  }
}

at::Tensor steer_program_monitors(const at::Tensor& x, const SteerProgram& p) {
  return at::empty({x.size(0), p.monitor.size(1)}, x.options().dtype(at::kFloat));
}

}  // namespace actshift
