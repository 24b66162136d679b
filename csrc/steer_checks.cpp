// Argument checks of the steer op, shared by the CPU and CUDA torch implementations.
#include "ops.h"

#include <algorithm>
#include <cstdlib>
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
void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name,
                       const char* op = "steer") {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}
// gate [rows] fp32 and slot [rows] int32/int64, each of any stride (an expanded per-row value has
// stride 0): the kernels index them by row * stride(0).
void check_row_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& gate,
                    const std::optional<at::Tensor>& slot) {
  const int64_t rows = x.size(0);
  if (gate.has_value()) {
    TORCH_CHECK_TYPE(gate->scalar_type() == at::kFloat, op, ": gate must be float32, got ",
                     gate->scalar_type());
    TORCH_CHECK_VALUE(gate->dim() == 1 && gate->size(0) == rows, op, ": gate must be [", rows,
                      "], got ", gate->sizes());
    check_same_device(x, *gate, "gate", op);
  }
  if (slot.has_value()) {
    TORCH_CHECK_TYPE(slot->scalar_type() == at::kInt || slot->scalar_type() == at::kLong, op,
                     ": slot must be int32 or int64, got ", slot->scalar_type());
    TORCH_CHECK_VALUE(slot->dim() == 1 && slot->size(0) == rows, op, ": slot must be [", rows,
                      "], got ", slot->sizes());
    check_same_device(x, *slot, "slot", op);
  }
}
}  // namespace

void check_steer_args(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                      const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& slot) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   "steer: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "steer: x must be [rows, d], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, "steer: x must have a contiguous last dim");
  check_float32(vectors, "vectors", 3);
  check_float32(weights, "weights", 2);
  check_float32(strength, "strength", 1);
  const int64_t d = x.size(1), S = vectors.size(0), m = vectors.size(1);
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
  check_row_args("steer", x, gate, slot);
}

void check_steer_out(const at::Tensor& x, const at::Tensor& out, const char* op) {
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), op, ": out must have x's dtype ",
                   x.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == x.sizes(), op, ": out must have x's shape ", x.sizes(),
                    ", got ", out.sizes());
  check_same_device(x, out, "out", op);
  const int64_t rows = out.size(0), d = out.size(1);
  TORCH_CHECK_VALUE(d <= 1 || out.stride(1) == 1, op, ": out must have a contiguous last dim");
  if (out.numel() == 0) return;
  // Rows of [rows, d] with a unit last stride share memory iff the row stride is below d. Torch's
  // in-place ops refuse such a written-to tensor the same way (their message, our ValueError).
  TORCH_CHECK_VALUE(rows == 1 || std::abs(out.stride(0)) >= d, op,
                    ": out has internal overlap (more than one element of the written-to tensor "
                    "refers to a single memory location, e.g. an expanded tensor); clone() it first");
  if (out.data_ptr() == x.data_ptr() && out.strides() == x.strides()) return;
  // Rows are read and written tile by tile, so out may be x itself but must share no element with
  // it. Both are rows of d elements: with equal row strides (interleaved views of one buffer) the
  // test is exact, otherwise it compares the spans the two occupy.
  const int64_t es = x.element_size();
  const int64_t len = d * es;  // bytes of one row
  const auto* xp = static_cast<const char*>(x.data_ptr());
  const auto* op_ = static_cast<const char*>(out.data_ptr());
  bool overlap;
  if (rows == 1 || x.stride(0) == out.stride(0)) {
    // Row q of out against row r of x: |delta + (q - r) * stride| < len for some |q - r| < rows.
    const int64_t delta = op_ - xp, step = (rows == 1 ? 0 : x.stride(0)) * es;
    overlap = std::abs(delta) < len;
    if (!overlap && step != 0) {
      // |delta + k * a| is convex in k: its minimum over |k| < rows lies next to the clamped
      // real minimizer.
      const int64_t a = std::abs(step);
      const int64_t k = std::clamp<int64_t>(-delta / a, -(rows - 1), rows - 1);
      for (int64_t kk : {k - 1, k, k + 1}) {
        if (kk > -rows && kk < rows && std::abs(delta + kk * a) < len) overlap = true;
      }
    }
  } else {
    const auto span = [&](const at::Tensor& t) {
      const auto* p = static_cast<const char*>(t.data_ptr());
      return std::make_pair(p, p + (rows - 1) * t.stride(0) * es + len);
    };
    const auto [x0, x1] = span(x);
    const auto [o0, o1] = span(out);
    overlap = !(o1 <= x0 || x1 <= o0);
  }
  TORCH_CHECK_VALUE(!overlap, op, ": out overlaps x; pass out=x for in-place steering or a "
                    "separate tensor");
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
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1,
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
  check_row_args("steer_program", x, gate, slot);
  if (row_weights.has_value()) {
    const at::Tensor& w = *row_weights;
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "steer_program: row_weights must be float32, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == rows && w.size(1) == M,
                      "steer_program: row_weights must be [", rows, ", ", M, "], got ", w.sizes());
    // Any row stride (one weight row expanded over every row has stride 0); each row contiguous.
    TORCH_CHECK_VALUE(M <= 1 || w.stride(1) == 1,
                      "steer_program: row_weights must have a contiguous last dim");
    check_same_device(x, w, "row_weights", "steer_program");
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
