// The CPU machinery shared by sparse_linear and relu_ffn's down step: the sum of selected weight
// rows,
//   y[r, :] = Σ_k coef[k·rows + r] · w[idx[k], :]  (+ bias)     k = 0 .. nnz-1, rows <= 16,
// where w is [n, out] row-major (weight_t, or w_down_t), idx the active rows in ascending order and
// coef their per-row coefficients (0 where a row's input is inactive).
//
// Memory bound at decode, so the layout serves the weight stream: threads own tiles of output
// columns (one tile per thread where the accumulators fit), keep the tile's fp32 accumulators of
// every row in L1/L2, and walk the active-row list, streaming one contiguous piece of each active
// row, read once for all rows. Each output sums its terms in k order whatever the tiling or thread
// count, and a row's coefficient 0 adds nothing, so results are deterministic and a row's result
// does not depend on the other rows of the batch.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "cpu/convert.h"

namespace actshift {
namespace cpu {

constexpr int64_t kMaxSparseRows = 16;

namespace sparse_rows_detail {

// fp32 accumulators of one tile over all rows: up to 128 KiB, which stays in L2, so a tile can
// span a whole thread's share of the columns and each active row is streamed in one long
// contiguous piece (short pieces restart the hardware prefetcher and cost ~30% of the bandwidth).
constexpr int64_t kAccFloats = 32768;
// Below this many multiply-adds the work stays on one thread (waking others costs more).
constexpr int64_t kMinParallelWork = 1 << 16;

// acc holds rows·n floats, wf n floats (used when rows > 1).
template <typename T>
__attribute__((always_inline)) inline void tile(const T* w, int64_t ld, const int32_t* idx,
                                                const float* coef, int64_t nnz, int64_t rows,
                                                const T* bias, T* y, int64_t out, int64_t c0,
                                                int64_t n, float* __restrict acc,
                                                float* __restrict wf) {
  for (int64_t i = 0; i < rows * n; ++i) acc[i] = 0.0f;
  if (rows == 1) {
    // Four active rows per sweep over the tile: four concurrent streams for the memory system and
    // a quarter of the accumulator traffic; the expression adds the terms in k order.
    int64_t k = 0;
    for (; k + 4 <= nnz; k += 4) {
      if (k + 8 <= nnz) {
        for (int q = 4; q < 8; ++q) __builtin_prefetch(w + idx[k + q] * ld + c0, 0, 0);
      }
      const T* p0 = w + idx[k] * ld + c0;
      const T* p1 = w + idx[k + 1] * ld + c0;
      const T* p2 = w + idx[k + 2] * ld + c0;
      const T* p3 = w + idx[k + 3] * ld + c0;
      const float a0 = coef[k], a1 = coef[k + 1], a2 = coef[k + 2], a3 = coef[k + 3];
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) {
        acc[j] = acc[j] + a0 * load(p0, j) + a1 * load(p1, j) + a2 * load(p2, j) +
                 a3 * load(p3, j);
      }
    }
    for (; k < nnz; ++k) {
      const T* p = w + idx[k] * ld + c0;
      const float a = coef[k];
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) acc[j] += a * load(p, j);
    }
  } else {
    // Several rows: convert the piece once, then one multiply-add pass per row that uses it.
    for (int64_t k = 0; k < nnz; ++k) {
      if (k + 1 < nnz) __builtin_prefetch(w + idx[k + 1] * ld + c0, 0, 0);
      const T* p = w + idx[k] * ld + c0;
      for (int64_t j = 0; j < n; ++j) wf[j] = load(p, j);
      const float* c = coef + k * rows;
      for (int64_t r = 0; r < rows; ++r) {
        const float a = c[r];
        if (a == 0.0f) continue;
        float* accr = acc + r * n;
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) accr[j] += a * wf[j];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* yr = y + r * out + c0;
    const float* accr = acc + r * n;
    if (bias != nullptr) {
      for (int64_t j = 0; j < n; ++j) store(yr, j, accr[j] + load(bias + c0, j));
    } else {
      for (int64_t j = 0; j < n; ++j) store(yr, j, accr[j]);
    }
  }
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const T* w, int64_t ld,
                                                        const int32_t* idx, const float* coef,
                                                        int64_t nnz, int64_t rows, const T* bias,
                                                        T* y, int64_t out, int64_t c0, int64_t n,
                                                        float* acc, float* wf) {
  tile<T>(w, ld, idx, coef, nnz, rows, bias, y, out, c0, n, acc, wf);
}

template <typename T>
void tile_baseline(const T* w, int64_t ld, const int32_t* idx, const float* coef, int64_t nnz,
                   int64_t rows, const T* bias, T* y, int64_t out, int64_t c0, int64_t n,
                   float* acc, float* wf) {
  tile<T>(w, ld, idx, coef, nnz, rows, bias, y, out, c0, n, acc, wf);
}

}  // namespace sparse_rows_detail

// y [rows, out] (contiguous) = Σ_k coef[k·rows + r] · w[idx[k], :] + bias; w [*, out] contiguous
// with leading dim `out`; bias [out] or nullptr. 1 <= rows <= kMaxSparseRows.
template <typename T>
void sparse_rows(const T* w, const int32_t* idx, const float* coef, int64_t nnz, int64_t rows,
                 const T* bias, T* y, int64_t out) {
  namespace D = sparse_rows_detail;
  if (out == 0 || rows == 0) return;
  // Tile width: one tile per thread where the accumulators allow (the longest contiguous pieces
  // of each active row), else as wide as they allow; a multiple of 16 columns (64 B of fp32).
  const int64_t threads = at::get_num_threads();
  const int64_t share = ((out + threads - 1) / threads + 15) / 16 * 16;
  const int64_t n = std::max<int64_t>(16, std::min(share, D::kAccFloats / rows / 16 * 16));
  const int64_t tiles = (out + n - 1) / n;
  const int64_t grain = nnz * out * rows < D::kMinParallelWork ? tiles : 1;
  const auto run = has_avx2_fma_f16c() ? &D::tile_avx2<T> : &D::tile_baseline<T>;
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> acc(new float[rows * n]);
    std::unique_ptr<float[]> wf(new float[rows > 1 ? n : 1]);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * n;
      run(w, out, idx, coef, nnz, rows, bias, y, out, c0, std::min(n, out - c0), acc.get(),
          wf.get());
    }
  });
}

}  // namespace cpu
}  // namespace actshift
