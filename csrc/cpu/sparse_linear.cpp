// C++ CPU kernel of sparse_linear: y = sparse_threshold(x, t) @ weight_t + bias, reading only the
// weight_t rows of inputs that are active (|x| > t) in at least one row of the batch.
//
// Rows <= 16: one serial pass over x compacts the union of active inputs into an ascending index
// list with per-row coefficients (the thresholded x, 0 where a row's input is inactive); then
// cpu::sparse_rows streams each listed weight row once for all rows (see cpu/sparse_rows.h).
// Past the crossover (more than 16 rows, or 8..16 fp32 rows with a dense union) ATen's fp32 GEMM
// on the thresholded x is faster; fp16/bf16 stay on the sparse path up to 16 rows, since the
// fallback would first widen the weights to fp32.
#include <memory>

#include "actshift/sparse.h"
#include "cpu/aligned.h"
#include "cpu/convert.h"
#include "cpu/sparse_rows.h"
#include "ops.h"

namespace actshift {
namespace {

using cpu::load;

// fp32, 8..16 rows: union density above which at::addmm on the thresholded x beats the sparse
// path. Measured 4096->11008 (2-core shared machine, noisy), sparse vs at::mm: rows 16 at union
// density 0.7: 254 vs 328 ms, 0.85: 324 vs 410 ms, 1.0: 390 vs 334 ms. On the quiet machine
// (benchmarks/results/cpu.csv, 2 threads) rows 8 at union density 0.996 ran 28.3 ms sparse vs
// 26.4 ms dense, while rows 4 at 0.94 ran 1.69x faster than dense: below 8 rows no fallback.
constexpr double kDenseDensityF32 = 0.9;
constexpr int64_t kDenseDensityMinRows = 8;

// Writes the union of active inputs to idx and their coefficients to coef[k·rows + r]; returns the
// count. Branch-free: each input's entries are written at slot nnz, which advances only if active.
template <typename T>
int64_t compact(const T* x, int64_t rows, int64_t n, const float* t, bool per_channel,
                int32_t* idx, float* coef) {
  int64_t nnz = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float ti = per_channel ? t[i] : t[0];
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      const float v = sparse::threshold(load(x, r * n + i), ti);
      coef[nnz * rows + r] = v;
      any |= v != 0.0f;  // NaN is active
    }
    idx[nnz] = static_cast<int32_t>(i);
    nnz += any;
  }
  return nnz;
}

at::Tensor dense(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& threshold,
                 const std::optional<at::Tensor>& bias) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor xt = at::where(xf.abs() <= threshold, at::zeros({}, xf.options()), xf);
  const at::Tensor wf = weight_t.to(at::kFloat);
  const at::Tensor y = bias.has_value() ? at::addmm(bias->to(at::kFloat), xt, wf) : at::mm(xt, wf);
  return y.to(x.scalar_type());
}

template <typename T>
bool sparse_path(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& threshold,
                 const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t rows = x.size(0), n = x.size(1), out = weight_t.size(1);
  std::unique_ptr<int32_t[]> idx(new int32_t[n]);
  std::unique_ptr<float[]> coef(new float[n * rows]);
  const int64_t nnz = compact(x.data_ptr<T>(), rows, n, threshold.data_ptr<float>(),
                              threshold.numel() > 1 || n == 1, idx.get(), coef.get());
  if (x.scalar_type() == at::kFloat && rows >= kDenseDensityMinRows && nnz > kDenseDensityF32 * n) {
    return false;
  }
  cpu::sparse_rows(weight_t.data_ptr<T>(), idx.get(), coef.get(), nnz, rows,
                   bias.has_value() ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>(), out);
  return true;
}

}  // namespace

at::Tensor sparse_linear_cpu(const at::Tensor& x_arg, const at::Tensor& weight_t_arg,
                             const at::Tensor& threshold_arg,
                             const std::optional<at::Tensor>& bias_arg) {
  check_sparse_linear_args(x_arg, weight_t_arg, threshold_arg, bias_arg);
  TORCH_CHECK_VALUE(x_arg.device().is_cpu(), "sparse_linear: x must be a CPU tensor for the cpu backend");
  const at::Tensor x = cpu::aligned(x_arg), weight_t = cpu::aligned(weight_t_arg),
                   threshold = cpu::aligned(threshold_arg);
  const std::optional<at::Tensor> bias = cpu::aligned(bias_arg);
  const int64_t rows = x.size(0);
  if (rows > cpu::kMaxSparseRows) return dense(x, weight_t, threshold, bias);
  at::Tensor y = at::empty({rows, weight_t.size(1)}, x.options());
  if (y.numel() == 0) return y;
  bool done;
  switch (x.scalar_type()) {
    case at::kFloat: done = sparse_path<float>(x, weight_t, threshold, bias, y); break;
    case at::kHalf: done = sparse_path<c10::Half>(x, weight_t, threshold, bias, y); break;
    default: done = sparse_path<c10::BFloat16>(x, weight_t, threshold, bias, y); break;
  }
  return done ? y : dense(x, weight_t, threshold, bias);
}

}  // namespace actshift
