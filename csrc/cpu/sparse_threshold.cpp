// C++ CPU kernel of sparse_threshold: y = x where |x| > t else 0 (NaN kept), t a scalar or one
// value per channel. One elementwise pass, parallel over (row, column tile) pieces; the loops
// vectorize (compare + blend), compiled for the baseline ISA and for AVX2/F16C (picked at run time).
#include <ATen/Parallel.h>

#include "actshift/sparse.h"
#include "cpu/aligned.h"
#include "cpu/convert.h"
#include "ops.h"

namespace actshift {
namespace {

using cpu::load;
using cpu::store;

template <typename T>
__attribute__((always_inline)) inline void piece(const T* x, T* y, const float* t,
                                                 bool per_channel, int64_t c0, int64_t c1) {
  if (per_channel) {
    for (int64_t j = c0; j < c1; ++j) store(y, j, sparse::threshold(load(x, j), t[j]));
  } else {
    const float t0 = t[0];
    for (int64_t j = c0; j < c1; ++j) store(y, j, sparse::threshold(load(x, j), t0));
  }
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) void piece_avx2(const T* x, T* y, const float* t,
                                                         bool per_channel, int64_t c0,
                                                         int64_t c1) {
  piece<T>(x, y, t, per_channel, c0, c1);
}

template <typename T>
void piece_baseline(const T* x, T* y, const float* t, bool per_channel, int64_t c0, int64_t c1) {
  piece<T>(x, y, t, per_channel, c0, c1);
}

// Columns per piece, and pieces a thread should get before another thread pays off.
constexpr int64_t kTileCols = 4096;
constexpr int64_t kGrainElems = 65536;

template <typename T>
void run(const at::Tensor& x, const at::Tensor& threshold, at::Tensor& y) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float* t = threshold.data_ptr<float>();
  const bool per_channel = threshold.numel() > 1 || n == 1;
  const auto f = cpu::has_avx2_fma_f16c() ? &piece_avx2<T> : &piece_baseline<T>;
  const int64_t tiles_per_row = (n + kTileCols - 1) / kTileCols;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(n, kTileCols));
  at::parallel_for(0, rows * tiles_per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r = p / tiles_per_row;
      const int64_t c0 = (p % tiles_per_row) * kTileCols;
      f(xp + r * n, yp + r * n, t, per_channel, c0, std::min(n, c0 + kTileCols));
    }
  });
}

}  // namespace

at::Tensor sparse_threshold_cpu(const at::Tensor& x_arg, const at::Tensor& threshold_arg) {
  check_sparse_threshold_args(x_arg, threshold_arg);
  TORCH_CHECK_VALUE(x_arg.device().is_cpu(), "sparse_threshold: x must be a CPU tensor for the cpu backend");
  const at::Tensor x = cpu::aligned(x_arg), threshold = cpu::aligned(threshold_arg);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  switch (x.scalar_type()) {
    case at::kFloat: run<float>(x, threshold, y); break;
    case at::kHalf: run<c10::Half>(x, threshold, y); break;
    default: run<c10::BFloat16>(x, threshold, y); break;
  }
  return y;
}

}  // namespace actshift
