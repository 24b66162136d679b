// C++ CPU kernel of the steer op: parallel over (row, column-block) tiles with at::parallel_for,
// a vectorized fp32 inner loop over d. The math is csrc/include/actshift/steer.h.
//
// The inner loop is compiled twice: once for the baseline x86-64 ISA and once with AVX2+FMA+F16C
// (selected at run time), so one binary runs everywhere and uses 256-bit loads and hardware
// fp16<->fp32 conversion where the CPU has them. The loops are written so GCC auto-vectorizes them;
// bf16 conversion is integer arithmetic (round to nearest even), which vectorizes in both builds.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "actshift/steer.h"
#include "cpu/aligned.h"
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

// One tile: columns [c0, c1) of one row. `coef` holds m coefficients; m == 0 means "copy".
// Specialized on small m so the j-loop unrolls and the i-loop vectorizes without a reduction.
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

// Columns per tile: 16 KiB of fp32 per stream keeps a tile's slice of the vectors in L1/L2, and
// bounds the unit of work so rows longer than a tile can be split between threads.
constexpr int64_t kTileCols = 4096;
// Elements a thread should own before parallelism pays for itself: decode-sized inputs (a few
// rows) stay on one thread, where waking another costs more than it saves.
constexpr int64_t kGrainElems = 32768;

// gate and slot are read at row * their stride (stride 0: one value expanded over every row).
template <typename T, typename IndexT>
void steer_kernel(const at::Tensor& x, at::Tensor& y, const at::Tensor& vectors,
                  const at::Tensor& weights, const at::Tensor& strength, const float* gate,
                  int64_t gate_stride, const IndexT* slot, int64_t slot_stride) {
  const int64_t rows = x.size(0), d = x.size(1), S = vectors.size(0);
  const int m = static_cast<int>(vectors.size(1));
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float* vp = vectors.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  const float* sp = strength.data_ptr<float>();
  const auto run_tile = cpu::has_avx2_fma_f16c() ? &tile_avx2<T> : &tile_baseline<T>;
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
      // The helpers' "row" argument is the element index into slot / gate.
      const int64_t s = steer::resolve_slot(slot, r * slot_stride, S);
      if (s < 0) {  // untouched: in place it already holds its output; else a bit-exact copy
        if (!in_place) {
          std::memcpy(yp + r * y_stride + c0, xp + r * x_stride + c0, (c1 - c0) * sizeof(T));
        }
        continue;
      }
      steer::row_coefficients(wp, sp, gate, r * gate_stride, s, m, coef);
      run_tile(xp + r * x_stride, yp + r * y_stride, vp + s * m * d, d, coef, m, c0, c1);
    }
  });
}

template <typename T>
void dispatch_slot(const at::Tensor& x, at::Tensor& y, const at::Tensor& vectors,
                   const at::Tensor& weights, const at::Tensor& strength,
                   const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& slot) {
  const float* g = gate.has_value() ? gate->data_ptr<float>() : nullptr;
  const int64_t gs = gate.has_value() ? gate->stride(0) : 0;
  if (!slot.has_value()) {
    steer_kernel<T, int64_t>(x, y, vectors, weights, strength, g, gs, nullptr, 0);
  } else if (slot->scalar_type() == at::kInt) {
    steer_kernel<T, int32_t>(x, y, vectors, weights, strength, g, gs, slot->data_ptr<int32_t>(),
                             slot->stride(0));
  } else {
    steer_kernel<T, int64_t>(x, y, vectors, weights, strength, g, gs, slot->data_ptr<int64_t>(),
                             slot->stride(0));
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

void check_cpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor for the cpu backend");
}

// Every slot must name a plan of the bank (negative: untouched). Checked before the kernel writes
// anything, so a bad slot never leaves `out` half written.
void check_slot_values(const std::optional<at::Tensor>& slot, int64_t num_plans, const char* op) {
  if (!slot.has_value()) return;
  const auto scan = [&](const auto* p) {
    const int64_t stride = slot->stride(0);
    for (int64_t r = 0; r < slot->size(0); ++r) {
      const int64_t v = static_cast<int64_t>(p[r * stride]);
      TORCH_CHECK_VALUE(v < num_plans, op, ": slot[", r, "] = ", v, " is out of range for ",
                        num_plans, " plan(s); use -1 to leave a row untouched");
    }
  };
  if (slot->scalar_type() == at::kInt) {
    scan(slot->data_ptr<int32_t>());
  } else {
    scan(slot->data_ptr<int64_t>());
  }
}

// --- steer_program ------------------------------------------------------------------------------
// One row at a time: the row (<= 64 KiB in fp32 for d <= 16384) stays in L1/L2 while the read-outs
// (dot products with the input) and the program's passes run, then y is written once. Each pass is a
// plain loop over d that GCC vectorizes; the order of the fp32 operations per element is exactly
// steer::program_element's (ablate q ascending, affine, add j ascending).

// x·v; `omp simd reduction` lets GCC keep vector partial sums (no -ffast-math needed).
__attribute__((always_inline)) inline float dot(const float* a, const float* b, int64_t d) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// z += c · v
__attribute__((always_inline)) inline void axpy(float* __restrict z, float c,
                                                const float* __restrict v, int64_t d) {
  for (int64_t i = 0; i < d; ++i) z[i] += c * v[i];
}

// y = mix(x, z, c) with z = program_element(x) for k, m <= 2, in one vectorized pass; specialized
// on (k, m) so the per-element work is straight-line code. y may alias x (same element order).
template <typename T, int K, int M>
__attribute__((always_inline)) inline void fused_fixed(const float* x, T* y, const float* U,
                                                       const float* a, const float* affine,
                                                       const float* V, const float* w, float c,
                                                       int64_t d) {
  const float a0 = K > 0 ? a[0] : 0.0f, a1 = K > 1 ? a[1] : 0.0f;
  const float w0 = M > 0 ? w[0] : 0.0f, w1 = M > 1 ? w[1] : 0.0f;
  if (affine != nullptr) {
#pragma GCC ivdep
    for (int64_t i = 0; i < d; ++i) {
      float z = x[i];
      if (K > 0) z -= a0 * U[i];
      if (K > 1) z -= a1 * U[d + i];
      z = affine[i] * z + affine[d + i];
      if (M > 0) z += w0 * V[i];
      if (M > 1) z += w1 * V[d + i];
      store(y, i, steer::mix(x[i], z, c));
    }
  } else {
#pragma GCC ivdep
    for (int64_t i = 0; i < d; ++i) {
      float z = x[i];
      if (K > 0) z -= a0 * U[i];
      if (K > 1) z -= a1 * U[d + i];
      if (M > 0) z += w0 * V[i];
      if (M > 1) z += w1 * V[d + i];
      store(y, i, steer::mix(x[i], z, c));
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void fused_pass(const float* x, T* y, const float* U,
                                                      const float* a, int k, const float* affine,
                                                      const float* V, const float* w, int m,
                                                      float c, int64_t d) {
  switch (k * 3 + m) {
    case 0: fused_fixed<T, 0, 0>(x, y, U, a, affine, V, w, c, d); return;
    case 1: fused_fixed<T, 0, 1>(x, y, U, a, affine, V, w, c, d); return;
    case 2: fused_fixed<T, 0, 2>(x, y, U, a, affine, V, w, c, d); return;
    case 3: fused_fixed<T, 1, 0>(x, y, U, a, affine, V, w, c, d); return;
    case 4: fused_fixed<T, 1, 1>(x, y, U, a, affine, V, w, c, d); return;
    case 5: fused_fixed<T, 1, 2>(x, y, U, a, affine, V, w, c, d); return;
    case 6: fused_fixed<T, 2, 0>(x, y, U, a, affine, V, w, c, d); return;
    case 7: fused_fixed<T, 2, 1>(x, y, U, a, affine, V, w, c, d); return;
    default: fused_fixed<T, 2, 2>(x, y, U, a, affine, V, w, c, d); return;
  }
}

struct ProgramView {
  const int32_t* meta;
  const float* scalars;
  const float* ablate;
  const float* targets;
  const float* affine;  // nullptr when the bank has no affine part
  const float* vectors;
  const float* weights;
  const int32_t* neuron_idx;
  const float* neuron_val;
  const float* condition;  // nullptr when the bank has no condition part
  const float* monitor;
  int64_t S, K, M, N, P;
};

// One row of plan s: xin [d] fp32 (the input), zbuf [d] scratch, y the output row of x's dtype (may
// alias the input). Writes the row's monitors into mon (P entries). Returns false, writing nothing
// to y, when the row is not steered (λ·g == 0): the caller then copies it bit-exactly.
template <typename T>
__attribute__((always_inline)) inline bool program_row(const ProgramView& v, int64_t s,
                                                       const float* xin, float* zbuf, T* y,
                                                       int64_t d, float gate,
                                                       const float* row_w, float* mon) {
  const int32_t* meta = v.meta + s * steer::kMetaCols;
  const int32_t flags = meta[steer::kMetaFlags];
  const int k = meta[steer::kMetaAblate], m = meta[steer::kMetaAdd];
  const int n = meta[steer::kMetaNeurons], p = meta[steer::kMetaMonitors];
  // Read-outs on the input row.
  for (int i = 0; i < p; ++i) mon[i] = dot(xin, v.monitor + (s * v.P + i) * d, d);
  for (int64_t i = p; i < v.P; ++i) mon[i] = 0.0f;
  const bool need_norm = (flags & steer::kRenorm) ||
                         ((flags & steer::kCondition) && (flags & steer::kConditionCosine));
  const float x_sq = need_norm ? dot(xin, xin, d) : 0.0f;
  if (flags & steer::kCondition) {
    const float score = steer::condition_score(flags, dot(xin, v.condition + s * d, d), sqrtf(x_sq));
    gate *= steer::condition_gate(flags, score, v.scalars[s * steer::kScalarCols + steer::kScalarThreshold]);
  }
  const float c = v.scalars[s * steer::kScalarCols + steer::kScalarStrength] * gate;
  if (c == 0.0f) return false;
  const float* U = v.ablate + s * v.K * d;
  float ablate_coef[steer::kMaxDirections];
  for (int q = 0; q < k; ++q) ablate_coef[q] = dot(xin, U + q * d, d) - v.targets[s * v.K + q];
  const float* affine = (flags & steer::kAffine) ? v.affine + s * 2 * d : nullptr;
  const float* w = row_w != nullptr ? row_w : v.weights + s * v.M;
  const float* V = v.vectors + s * v.M * d;
  if (!(flags & steer::kRenorm) && k <= 2 && m <= 2) {
    // The common small programs: one fused pass writes y; neuron edits then patch their elements
    // from the inputs saved beforehand (in place, y overwrites x).
    const int32_t* idx = v.neuron_idx + s * v.N;
    for (int q = 0; q < n; ++q) zbuf[q] = xin[idx[q]];
    fused_pass<T>(xin, y, U, ablate_coef, k, affine, V, w, m, c, d);
    for (int q = 0; q < n; ++q) {
      const float z = steer::program_element(zbuf[q], ablate_coef, U, k, affine, w, V, m, d, idx[q]);
      const float e = steer::neuron_edit(z, v.neuron_val[(s * 2) * v.N + q],
                                         v.neuron_val[(s * 2 + 1) * v.N + q]);
      store(y, idx[q], steer::mix(zbuf[q], e, c));
    }
    return true;
  }
  // The general program: z into zbuf pass by pass (same operation order), then y.
  for (int64_t i = 0; i < d; ++i) zbuf[i] = xin[i];
  for (int q = 0; q < k; ++q) axpy(zbuf, -ablate_coef[q], U + q * d, d);
  if (affine != nullptr) {
    for (int64_t i = 0; i < d; ++i) zbuf[i] = affine[i] * zbuf[i] + affine[d + i];
  }
  for (int j = 0; j < m; ++j) axpy(zbuf, w[j], V + j * d, d);
  for (int q = 0; q < n; ++q) {
    const int64_t i = v.neuron_idx[s * v.N + q];
    zbuf[i] = steer::neuron_edit(zbuf[i], v.neuron_val[(s * 2) * v.N + q],
                                 v.neuron_val[(s * 2 + 1) * v.N + q]);
  }
  if (!(flags & steer::kRenorm)) {
#pragma GCC ivdep
    for (int64_t i = 0; i < d; ++i) store(y, i, steer::mix(xin[i], zbuf[i], c));
    return true;
  }
  for (int64_t i = 0; i < d; ++i) zbuf[i] = steer::mix(xin[i], zbuf[i], c);
  const float f = steer::renorm_factor(x_sq, dot(zbuf, zbuf, d));
#pragma GCC ivdep
  for (int64_t i = 0; i < d; ++i) store(y, i, zbuf[i] * f);
  return true;
}

// The optional per-row arguments, each read at row * its stride (0: one value for every row).
template <typename IndexT>
struct RowArgs {
  const float* gate;
  int64_t gate_stride;
  const IndexT* slot;
  int64_t slot_stride;
  const float* row_w;  // rows of M weights, each contiguous
  int64_t row_w_stride;
};

// Rows [r0, r1) of the program, with the ISA chosen by the wrapper below.
template <typename T, typename IndexT>
__attribute__((always_inline)) inline void program_rows(const ProgramView& v, const T* xp,
                                                        int64_t x_stride, T* yp, int64_t y_stride,
                                                        int64_t d, const RowArgs<IndexT>& ra,
                                                        float* mon, bool in_place, float* scratch,
                                                        int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = steer::resolve_slot(ra.slot, r * ra.slot_stride, v.S);
    const T* x = xp + r * x_stride;
    T* y = yp + r * y_stride;
    float* mon_r = mon + r * v.P;
    bool steered = false;
    if (s < 0) {  // untouched: monitors 0
      for (int64_t i = 0; i < v.P; ++i) mon_r[i] = 0.0f;
    } else {
      const float* xin;
      if constexpr (std::is_same_v<T, float>) {
        xin = x;
      } else {
        for (int64_t i = 0; i < d; ++i) scratch[d + i] = load(x, i);
        xin = scratch + d;
      }
      steered = program_row<T>(v, s, xin, scratch, y, d,
                               ra.gate != nullptr ? ra.gate[r * ra.gate_stride] : 1.0f,
                               ra.row_w != nullptr ? ra.row_w + r * ra.row_w_stride : nullptr,
                               mon_r);
    }
    if (!steered && !in_place) std::memcpy(y, x, d * sizeof(T));  // bit-exact
  }
}

template <typename T, typename IndexT>
__attribute__((target("avx2,fma,f16c"))) void program_rows_avx2(
    const ProgramView& v, const T* xp, int64_t x_stride, T* yp, int64_t y_stride, int64_t d,
    const RowArgs<IndexT>& ra, float* mon, bool in_place, float* scratch, int64_t r0, int64_t r1) {
  program_rows<T, IndexT>(v, xp, x_stride, yp, y_stride, d, ra, mon, in_place, scratch, r0, r1);
}

template <typename T, typename IndexT>
void program_rows_baseline(const ProgramView& v, const T* xp, int64_t x_stride, T* yp,
                           int64_t y_stride, int64_t d, const RowArgs<IndexT>& ra, float* mon,
                           bool in_place, float* scratch, int64_t r0, int64_t r1) {
  program_rows<T, IndexT>(v, xp, x_stride, yp, y_stride, d, ra, mon, in_place, scratch, r0, r1);
}

template <typename T, typename IndexT>
void program_kernel(const at::Tensor& x, at::Tensor& y, const ProgramView& v,
                    const RowArgs<IndexT>& ra, float* mon) {
  const int64_t rows = x.size(0), d = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const bool in_place = static_cast<const void*>(xp) == static_cast<const void*>(yp) &&
                        x_stride == y_stride;
  const auto run_rows = cpu::has_avx2_fma_f16c() ? &program_rows_avx2<T, IndexT>
                                       : &program_rows_baseline<T, IndexT>;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * d);  // z, and the fp32 input row for fp16/bf16
    run_rows(v, xp, x_stride, yp, y_stride, d, ra, mon, in_place, scratch.data(), begin, end);
  });
}

template <typename T>
void program_dispatch_slot(const at::Tensor& x, at::Tensor& y, const ProgramView& v,
                           const std::optional<at::Tensor>& gate,
                           const std::optional<at::Tensor>& slot,
                           const std::optional<at::Tensor>& row_weights, float* mon) {
  const float* g = gate.has_value() ? gate->data_ptr<float>() : nullptr;
  const int64_t gs = gate.has_value() ? gate->stride(0) : 0;
  const float* w = row_weights.has_value() ? row_weights->data_ptr<float>() : nullptr;
  const int64_t ws = row_weights.has_value() ? row_weights->stride(0) : 0;
  if (!slot.has_value()) {
    program_kernel<T, int64_t>(x, y, v, RowArgs<int64_t>{g, gs, nullptr, 0, w, ws}, mon);
  } else if (slot->scalar_type() == at::kInt) {
    program_kernel<T, int32_t>(
        x, y, v, RowArgs<int32_t>{g, gs, slot->data_ptr<int32_t>(), slot->stride(0), w, ws}, mon);
  } else {
    program_kernel<T, int64_t>(
        x, y, v, RowArgs<int64_t>{g, gs, slot->data_ptr<int64_t>(), slot->stride(0), w, ws}, mon);
  }
}

void run_program(const at::Tensor& x, const SteerProgram& p, const std::optional<at::Tensor>& gate,
                 const std::optional<at::Tensor>& slot,
                 const std::optional<at::Tensor>& row_weights, at::Tensor& out,
                 at::Tensor& monitors) {
  if (x.size(0) == 0) return;
  const ProgramView v{p.meta.data_ptr<int32_t>(),
                      p.scalars.data_ptr<float>(),
                      p.ablate.data_ptr<float>(),
                      p.targets.data_ptr<float>(),
                      p.affine.size(1) == 2 ? p.affine.data_ptr<float>() : nullptr,
                      p.vectors.data_ptr<float>(),
                      p.weights.data_ptr<float>(),
                      p.neuron_idx.data_ptr<int32_t>(),
                      p.neuron_val.data_ptr<float>(),
                      p.condition.size(1) == 1 ? p.condition.data_ptr<float>() : nullptr,
                      p.monitor.data_ptr<float>(),
                      p.meta.size(0),
                      p.ablate.size(1),
                      p.vectors.size(1),
                      p.neuron_idx.size(1),
                      p.monitor.size(1)};
  float* mon = monitors.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: program_dispatch_slot<float>(x, out, v, gate, slot, row_weights, mon); break;
    case at::kHalf: program_dispatch_slot<c10::Half>(x, out, v, gate, slot, row_weights, mon); break;
    default: program_dispatch_slot<c10::BFloat16>(x, out, v, gate, slot, row_weights, mon); break;
  }
}

}  // namespace

void steer_out_cpu(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                   const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                   const std::optional<at::Tensor>& slot, at::Tensor& out) {
  check_steer_args(x, vectors, weights, strength, gate, slot);
  check_cpu(x, "steer");
  check_steer_out(x, out);
  if (!cpu::is_aligned(out)) {  // foreign memory at an odd address: write through an aligned copy
    out.copy_(steer_cpu(x, vectors, weights, strength, gate, slot));
    return;
  }
  const std::optional<at::Tensor> sl = cpu::aligned(slot);
  check_slot_values(sl, vectors.size(0), "steer");
  run(cpu::aligned(x), cpu::aligned(vectors), cpu::aligned(weights), cpu::aligned(strength),
      cpu::aligned(gate), sl, out);
}

at::Tensor steer_cpu(const at::Tensor& x, const at::Tensor& vectors, const at::Tensor& weights,
                     const at::Tensor& strength, const std::optional<at::Tensor>& gate,
                     const std::optional<at::Tensor>& slot) {
  check_steer_args(x, vectors, weights, strength, gate, slot);
  check_cpu(x, "steer");
  const std::optional<at::Tensor> sl = cpu::aligned(slot);
  check_slot_values(sl, vectors.size(0), "steer");
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  run(cpu::aligned(x), cpu::aligned(vectors), cpu::aligned(weights), cpu::aligned(strength),
      cpu::aligned(gate), sl, y);
  return y;
}

}  // namespace actshift

namespace actshift {

namespace {
// The bank with every tensor aligned (see cpu/aligned.h); `keep` owns any copies.
SteerProgram aligned_program(const SteerProgram& p, std::vector<at::Tensor>& keep) {
  const at::Tensor* parts[] = {&p.meta,    &p.scalars,    &p.ablate,     &p.targets,
                               &p.affine,  &p.vectors,    &p.weights,    &p.neuron_idx,
                               &p.neuron_val, &p.condition, &p.monitor};
  keep.clear();
  keep.reserve(11);
  for (const at::Tensor* t : parts) keep.push_back(cpu::aligned(*t));
  return SteerProgram{keep[0], keep[1], keep[2], keep[3], keep[4],  keep[5],
                      keep[6], keep[7], keep[8], keep[9], keep[10]};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> steer_program_cpu(
    const at::Tensor& x, const at::Tensor& meta, const at::Tensor& scalars, const at::Tensor& ablate,
    const at::Tensor& targets, const at::Tensor& affine, const at::Tensor& vectors,
    const at::Tensor& weights, const at::Tensor& neuron_idx, const at::Tensor& neuron_val,
    const at::Tensor& condition, const at::Tensor& monitor, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& slot, const std::optional<at::Tensor>& row_weights) {
  const SteerProgram args{meta,    scalars,    ablate,     targets,   affine, vectors,
                          weights, neuron_idx, neuron_val, condition, monitor};
  check_steer_program_args(x, args, gate, slot, row_weights);
  check_cpu(x, "steer_program");
  std::vector<at::Tensor> keep;
  const SteerProgram p = aligned_program(args, keep);
  check_steer_program_values(x, p);
  const std::optional<at::Tensor> sl = cpu::aligned(slot);
  check_slot_values(sl, p.meta.size(0), "steer_program");
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor monitors = steer_program_monitors(x, p);
  run_program(cpu::aligned(x), p, cpu::aligned(gate), sl, cpu::aligned(row_weights), y, monitors);
  return {y, monitors};
}

at::Tensor steer_program_out_cpu(
    const at::Tensor& x, const at::Tensor& meta, const at::Tensor& scalars, const at::Tensor& ablate,
    const at::Tensor& targets, const at::Tensor& affine, const at::Tensor& vectors,
    const at::Tensor& weights, const at::Tensor& neuron_idx, const at::Tensor& neuron_val,
    const at::Tensor& condition, const at::Tensor& monitor, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& slot, const std::optional<at::Tensor>& row_weights,
    at::Tensor& out) {
  const SteerProgram args{meta,    scalars,    ablate,     targets,   affine, vectors,
                          weights, neuron_idx, neuron_val, condition, monitor};
  check_steer_program_args(x, args, gate, slot, row_weights);
  check_cpu(x, "steer_program_out");
  check_steer_out(x, out, "steer_program_out");
  if (!cpu::is_aligned(out)) {  // foreign memory at an odd address: write through an aligned copy
    auto [y, monitors] = steer_program_cpu(x, meta, scalars, ablate, targets, affine, vectors,
                                           weights, neuron_idx, neuron_val, condition, monitor,
                                           gate, slot, row_weights);
    out.copy_(y);
    return monitors;
  }
  std::vector<at::Tensor> keep;
  const SteerProgram p = aligned_program(args, keep);
  check_steer_program_values(x, p);
  const std::optional<at::Tensor> sl = cpu::aligned(slot);
  check_slot_values(sl, p.meta.size(0), "steer_program_out");
  at::Tensor monitors = steer_program_monitors(x, p);
  run_program(cpu::aligned(x), p, cpu::aligned(gate), sl, cpu::aligned(row_weights), out, monitors);
  return monitors;
}

}  // namespace actshift
