// C++ CPU kernel of the steer op: parallel over (row, column-block) tiles with at::parallel_for,
// a vectorized fp32 inner loop over d. The math is csrc/include/actshift/steer.h.
//
// The inner loop is compiled twice: once for the baseline x86-64 ISA and once with AVX2+FMA+F16C
// (selected at run time), so one binary runs everywhere and uses 256-bit loads and hardware
// fp16<->fp32 conversion where the CPU has them. The loops are written so GCC auto-vectorizes them;
// bf16 conversion is integer arithmetic (round to nearest even), which vectorizes in both builds.
#include <ATen/Parallel.h>

#include "actshift/steer.h"
#include "cpu/convert.h"
#include "ops.h"

namespace actshift {
namespace {

using cpu::load;
using cpu::store;

// x and y may be the same row (in-place steering): each element is read before it is written and
// no iteration depends on another, which `ivdep` tells the vectorizer instead of `__restrict`.
template <typename T, int M>
__attribute__((always_inline)) inline void tile_fixed(const T* x, T* y, const float* v, int64_t d,
                                                      const float* coef, int64_t c0, int64_t c1) {
  float c[M > 0 ? M : 1];
  for (int j = 0; j < M; ++j) c[j] = coef[j];
#pragma GCC ivdep
  for (int64_t i = c0; i < c1; ++i) {
    float acc = load(x, i);
    for (int j = 0; j < M; ++j) acc += c[j] * v[j * d + i];
    store(y, i, acc);
  }
}

template <typename T>
__attribute__((always_inline)) inline void tile(const T* x, T* y, const float* v, int64_t d,
                                                const float* coef, int m, int64_t c0, int64_t c1) {
  switch (m) {
    case 0: tile_fixed<T, 0>(x, y, v, d, coef, c0, c1); return;
    case 1: tile_fixed<T, 1>(x, y, v, d, coef, c0, c1); return;
    case 2: tile_fixed<T, 2>(x, y, v, d, coef, c0, c1); return;
    case 3: tile_fixed<T, 3>(x, y, v, d, coef, c0, c1); return;
    case 4: tile_fixed<T, 4>(x, y, v, d, coef, c0, c1); return;
    default:
      // Rare: many vectors per plan. Generic shared helper, still one pass over x.
      for (int64_t i = c0; i < c1; ++i) store(y, i, steer::apply_add(load(x, i), coef, v, m, d, i));
  }
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const T* x, T* y, const float* v,
                                                        int64_t d, const float* coef, int m,
                                                        int64_t c0, int64_t c1) {
  tile<T>(x, y, v, d, coef, m, c0, c1);
}

template <typename T>
void tile_baseline(const T* x, T* y, const float* v, int64_t d, const float* coef, int m,
                   int64_t c0, int64_t c1) {
  tile<T>(x, y, v, d, coef, m, c0, c1);
}

bool cpu_has_avx2() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// Columns per tile: 16 KiB of fp32 per stream keeps a tile's slice of the vectors in L1/L2, and
// bounds the unit of work so rows longer than a tile can be split between threads.
constexpr int64_t kTileCols = 4096;
// Elements a thread should own before parallelism pays for itself: decode-sized inputs (a few
// rows) stay on one thread, where waking another costs more than it saves.
constexpr int64_t kGrainElems = 32768;

template <typename T, typename IndexT>
void steer_kernel(const at::Tensor& x, at::Tensor& y, const at::Tensor& vectors,
                  const at::Tensor& weights, const at::Tensor& strength, const float* gate,
                  const IndexT* slot) {
  const int64_t rows = x.size(0), d = x.size(1), S = vectors.size(0);
  const int m = static_cast<int>(vectors.size(1));
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float* vp = vectors.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  const float* sp = strength.data_ptr<float>();
  const auto run_tile = cpu_has_avx2() ? &tile_avx2<T> : &tile_baseline<T>;
  const bool in_place = static_cast<const void*>(xp) == static_cast<const void*>(yp) &&
                        x_stride == y_stride;

  const int64_t tiles_per_row = (d + kTileCols - 1) / kTileCols;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(d, kTileCols));
  at::parallel_for(0, rows * tiles_per_row, grain, [&](int64_t begin, int64_t end) {
    float coef[steer::kMaxVectors];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / tiles_per_row;
      const int64_t c0 = (t % tiles_per_row) * kTileCols;
      const int64_t c1 = std::min(d, c0 + kTileCols);
      // Checked here rather than in a separate pass: the value is read anyway.
      if (slot != nullptr) {
        const int64_t raw = static_cast<int64_t>(slot[r]);
        TORCH_CHECK_VALUE(raw < S, "steer: slot[", r, "] = ", raw, " is out of range for ", S,
                          " plans");
      }
      const int64_t s = steer::resolve_slot(slot, r, S);
      if (s < 0 && in_place) continue;  // an untouched row already holds its output
      int mm = 0;
      if (s >= 0) {
        steer::row_coefficients(wp, sp, gate, r, s, m, coef);
        mm = m;
      }
      run_tile(xp + r * x_stride, yp + r * y_stride, vp + (s >= 0 ? s : 0) * m * d, d, coef, mm, c0,
               c1);
    }
  });
}

template <typename T>
void dispatch_slot(const at::Tensor& x, at::Tensor& y, const at::Tensor& vectors,
                   const at::Tensor& weights, const at::Tensor& strength,
                   const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& slot) {
  const float* g = gate.has_value() ? gate->data_ptr<float>() : nullptr;
  if (!slot.has_value()) {
    steer_kernel<T, int64_t>(x, y, vectors, weights, strength, g, nullptr);
  } else if (slot->scalar_type() == at::kInt) {
    steer_kernel<T, int32_t>(x, y, vectors, weights, strength, g, slot->data_ptr<int32_t>());
  } else {
    steer_kernel<T, int64_t>(x, y, vectors, weights, strength, g, slot->data_ptr<int64_t>());
  }
}

void run(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
         const at::Tensor& strength, const std::optional<at::Tensor>& gate,
         const std::optional<at::Tensor>& slot, at::Tensor& out) {
  if (x.numel() == 0) return;
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_slot<float>(x, out, vectors, weights, strength, gate, slot); break;
    case at::kHalf: dispatch_slot<c10::Half>(x, out, vectors, weights, strength, gate, slot); break;
    default: dispatch_slot<c10::BFloat16>(x, out, vectors, weights, strength, gate, slot); break;
  }
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "steer: x must be a CPU tensor for the cpu backend");
}

}  // namespace

void steer_out_cpu(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                   const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                   const std::optional<at::Tensor>& slot, at::Tensor& out) {
  check_steer_args(x, vectors, weights, strength, gate, slot);
  check_cpu(x);
  check_steer_out(x, out);
  run(x, vectors, weights, strength, gate, slot, out);
}

at::Tensor steer_cpu(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                     const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                     const std::optional<at::Tensor>& slot) {
  check_steer_args(x, vectors, weights, strength, gate, slot);
  check_cpu(x);
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  run(x, vectors, weights, strength, gate, slot, y);
  return y;
}

}  // namespace actshift
