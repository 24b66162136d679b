// C++ CPU kernel of relu_ffn: y = W_down (gate_act(W_gate x) * up_act(W_up x)) (+ biases), reading
// the up rows and down rows of active neurons only (math in csrc/include/actshift/sparse.h).
//
// Rows <= 8, three steps:
//   1. dense gate GEMV fused with the activation and the compaction of active neurons: threads
//      own chunks of neurons (each neuron's w_gate row is contiguous), compact their chunk's
//      actives in neuron order, and the chunks are then concatenated (deterministic order);
//   2. for the active neurons only, the up GEMV and h = gate_act · up_act (kept in fp32);
//   3. y = Σ_k h[k] · w_down_t[idx[k], :] with cpu::sparse_rows (the sparse_linear machinery).
// A neuron is active if it is active in any row (the union); h is 0 in the rows where it is not.
// More rows are compute bound with a union that is rarely sparse: ATen's fp32 GEMMs take over.
#include <ATen/Parallel.h>

#include <cstring>
#include <memory>

#include "actshift/sparse.h"
#include "cpu/aligned.h"
#include "cpu/convert.h"
#include "cpu/sparse_rows.h"
#include "ops.h"

namespace actshift {
namespace {

using cpu::load;

// Rows past which ATen's dense fp32 GEMMs take over. Up to 8 rows no union density makes the dense
// FFN faster (measured, Llama-2-7B shapes d 4096, ffn 11008, fp32, noisy shared 2-core machine:
// rows 1 at union density 1.0: 98.8 ms vs 105.6 ms dense; rows 4 at 1.0: 227 vs 490 ms; rows 8 at
// 1.0: 346-417 vs 440-477 ms), so there is no density fallback.
constexpr int64_t kMaxRows = 8;
// Neurons per chunk of step 1 (the unit of work and of compaction).
constexpr int64_t kChunk = 64;
// fp32 lanes of a dot product: two AVX2 registers, two independent add chains.
constexpr int kLanes = 16;

// out[b·R + r] = w[b] · xf[r, :] for B weight rows and R rows of xf [R, d] (fp32). Fixed
// summation order per dot product: kLanes partial sums over the d/kLanes full blocks, added lane 0
// first, then the tail; so a neuron's result does not depend on B (the blocking only gives the
// memory system B streams at once and reuses each x load B times).
template <typename T, int R, int B>
__attribute__((always_inline)) inline void dots(const T* const* w, const float* xf, int64_t d,
                                                float* out) {
  float acc[B][R][kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    for (int b = 0; b < B; ++b) {
      float wf[kLanes];
      for (int l = 0; l < kLanes; ++l) wf[l] = load(w[b], j + l);
      for (int r = 0; r < R; ++r) {
        for (int l = 0; l < kLanes; ++l) acc[b][r][l] += wf[l] * xf[r * d + j + l];
      }
    }
  }
  for (int b = 0; b < B; ++b) {
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int l = 0; l < kLanes; ++l) s += acc[b][r][l];
      for (int64_t jj = j; jj < d; ++jj) s += load(w[b], jj) * xf[r * d + jj];
      out[b * R + r] = s;
    }
  }
}

// Weight rows per dots() call: enough streams at one row of x, fewer where the R·B accumulators
// would not fit in the 16 vector registers.
template <int R>
constexpr int kBlock = R == 1 ? 4 : (R == 2 ? 2 : 1);

struct Args {
  const float* xf;  // [R, d] fp32 copy of x
  int64_t d;
  int act;
  float t;
};

// Step 1 for neurons [n0, n1): gate activations of the actives written compacted from position
// n0 (idx[n0 + k], gact[(n0 + k)·R + r]); returns their count.
template <typename T, int R>
__attribute__((always_inline)) inline int64_t gate_chunk(const Args& a, const T* w_gate,
                                                         const T* b_gate, int64_t n0, int64_t n1,
                                                         int32_t* idx, float* gact) {
  constexpr int B = kBlock<R>;
  int64_t cnt = 0;
  for (int64_t n = n0; n < n1;) {
    const int nb = n + B <= n1 ? B : 1;
    float g[B * R];
    const T* rows[B];
    for (int b = 0; b < nb; ++b) rows[b] = w_gate + (n + b) * a.d;
    if (nb == B) {
      dots<T, R, B>(rows, a.xf, a.d, g);
    } else {
      dots<T, R, 1>(rows, a.xf, a.d, g);
    }
    for (int b = 0; b < nb; ++b, ++n) {
      const float bias = b_gate != nullptr ? load(b_gate, n) : 0.0f;
      bool any = false;
      for (int r = 0; r < R; ++r) {
        const float v = sparse::gate_act(a.act, g[b * R + r] + bias, a.t);
        gact[(n0 + cnt) * R + r] = v;
        any |= v != 0.0f;  // NaN is active
      }
      idx[n0 + cnt] = static_cast<int32_t>(n);
      cnt += any;
    }
  }
  return cnt;
}

// Step 2 for active positions [k0, k1): h = gact · up_act(W_up x + b_up), in place in gact.
template <typename T, int R>
__attribute__((always_inline)) inline void up_range(const Args& a, const T* w_up, const T* b_up,
                                                    const int32_t* idx, int64_t k0, int64_t k1,
                                                    float* h) {
  constexpr int B = kBlock<R>;
  for (int64_t k = k0; k < k1;) {
    const int nb = k + B <= k1 ? B : 1;
    float u[B * R];
    const T* rows[B];
    for (int b = 0; b < nb; ++b) rows[b] = w_up + static_cast<int64_t>(idx[k + b]) * a.d;
    if (nb == B) {
      dots<T, R, B>(rows, a.xf, a.d, u);
    } else {
      dots<T, R, 1>(rows, a.xf, a.d, u);
    }
    for (int b = 0; b < nb; ++b, ++k) {
      const float bias = b_up != nullptr ? load(b_up, idx[k]) : 0.0f;
      for (int r = 0; r < R; ++r) h[k * R + r] *= sparse::up_act(a.act, u[b * R + r] + bias);
    }
  }
}

template <typename T, int R>
__attribute__((target("avx2,fma,f16c"))) int64_t gate_chunk_avx2(const Args& a, const T* w,
                                                                 const T* b, int64_t n0,
                                                                 int64_t n1, int32_t* idx,
                                                                 float* gact) {
  return gate_chunk<T, R>(a, w, b, n0, n1, idx, gact);
}
template <typename T, int R>
int64_t gate_chunk_baseline(const Args& a, const T* w, const T* b, int64_t n0, int64_t n1,
                            int32_t* idx, float* gact) {
  return gate_chunk<T, R>(a, w, b, n0, n1, idx, gact);
}
template <typename T, int R>
__attribute__((target("avx2,fma,f16c"))) void up_range_avx2(const Args& a, const T* w,
                                                           const T* b, const int32_t* idx,
                                                           int64_t k0, int64_t k1, float* h) {
  up_range<T, R>(a, w, b, idx, k0, k1, h);
}
template <typename T, int R>
void up_range_baseline(const Args& a, const T* w, const T* b, const int32_t* idx, int64_t k0,
                       int64_t k1, float* h) {
  up_range<T, R>(a, w, b, idx, k0, k1, h);
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Steps 1-3 for R rows.
template <typename T, int R>
void sparse_path(const at::Tensor& x, const at::Tensor& w_gate,
                 const std::optional<at::Tensor>& w_up, const at::Tensor& w_down_t, int act,
                 float t, const std::optional<at::Tensor>& b_gate,
                 const std::optional<at::Tensor>& b_up, const std::optional<at::Tensor>& b_down,
                 at::Tensor& y) {
  const int64_t d = x.size(1), ffn = w_gate.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const Args a{xf.data_ptr<float>(), d, act, t};
  std::unique_ptr<int32_t[]> idx(new int32_t[ffn]);
  std::unique_ptr<float[]> h(new float[ffn * R]);
  const int64_t chunks = (ffn + kChunk - 1) / kChunk;
  std::unique_ptr<int64_t[]> counts(new int64_t[chunks]);
  const bool avx2 = cpu::has_avx2_fma_f16c();

  const auto gate = avx2 ? &gate_chunk_avx2<T, R> : &gate_chunk_baseline<T, R>;
  const T* wg = w_gate.data_ptr<T>();
  const T* bg = ptr_or_null<T>(b_gate);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      counts[c] = gate(a, wg, bg, c * kChunk, std::min(ffn, (c + 1) * kChunk), idx.get(), h.get());
    }
  });
  int64_t nnz = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    if (nnz != c * kChunk) {  // move left: never overlaps a chunk not yet moved
      std::memmove(idx.get() + nnz, idx.get() + c * kChunk, counts[c] * sizeof(int32_t));
      std::memmove(h.get() + nnz * R, h.get() + c * kChunk * R, counts[c] * R * sizeof(float));
    }
    nnz += counts[c];
  }

  if (w_up.has_value()) {
    const auto up = avx2 ? &up_range_avx2<T, R> : &up_range_baseline<T, R>;
    const T* wu = w_up->data_ptr<T>();
    const T* bu = ptr_or_null<T>(b_up);
    at::parallel_for(0, nnz, kChunk, [&](int64_t begin, int64_t end) {
      up(a, wu, bu, idx.get(), begin, end, h.get());
    });
  }
  cpu::sparse_rows(w_down_t.data_ptr<T>(), idx.get(), h.get(), nnz, R, ptr_or_null<T>(b_down),
                   y.data_ptr<T>(), d);
}

template <typename T>
void dispatch_rows(const at::Tensor& x, const at::Tensor& w_gate,
                   const std::optional<at::Tensor>& w_up, const at::Tensor& w_down_t, int act,
                   float t, const std::optional<at::Tensor>& b_gate,
                   const std::optional<at::Tensor>& b_up, const std::optional<at::Tensor>& b_down,
                   at::Tensor& y) {
#define ACTSHIFT_FFN_ROWS(R) \
  case R: return sparse_path<T, R>(x, w_gate, w_up, w_down_t, act, t, b_gate, b_up, b_down, y);
  switch (x.size(0)) {
    ACTSHIFT_FFN_ROWS(1)
    ACTSHIFT_FFN_ROWS(2)
    ACTSHIFT_FFN_ROWS(3)
    ACTSHIFT_FFN_ROWS(4)
    ACTSHIFT_FFN_ROWS(5)
    ACTSHIFT_FFN_ROWS(6)
    ACTSHIFT_FFN_ROWS(7)
    ACTSHIFT_FFN_ROWS(8)
    default: TORCH_CHECK(false, "relu_ffn: the sparse path takes 1 to ", kMaxRows, " rows");
  }
#undef ACTSHIFT_FFN_ROWS
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

// The dense computation in fp32 through ATen (the crossover fallback).
at::Tensor dense(const at::Tensor& x, const at::Tensor& w_gate,
                 const std::optional<at::Tensor>& w_up, const at::Tensor& w_down_t, int act,
                 float t, const std::optional<at::Tensor>& b_gate,
                 const std::optional<at::Tensor>& b_up, const std::optional<at::Tensor>& b_down) {
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor h = at::linear(xf, w_gate.to(at::kFloat), to_float(b_gate)).contiguous();
  at::Tensor u;
  if (w_up.has_value()) u = at::linear(xf, w_up->to(at::kFloat), to_float(b_up)).contiguous();
  float* hp = h.data_ptr<float>();
  const float* up = w_up.has_value() ? u.data_ptr<float>() : nullptr;
  at::parallel_for(0, h.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float v = sparse::gate_act(act, hp[i], t);
      hp[i] = up != nullptr ? v * sparse::up_act(act, up[i]) : v;
    }
  });
  const at::Tensor wd = w_down_t.to(at::kFloat);
  const at::Tensor y = b_down.has_value() ? at::addmm(b_down->to(at::kFloat), h, wd) : at::mm(h, wd);
  return y.to(x.scalar_type());
}

}  // namespace

at::Tensor relu_ffn_cpu(const at::Tensor& x_arg, const at::Tensor& w_gate_arg,
                        const std::optional<at::Tensor>& w_up_arg, const at::Tensor& w_down_t_arg,
                        int64_t act, double threshold, const std::optional<at::Tensor>& b_gate_arg,
                        const std::optional<at::Tensor>& b_up_arg,
                        const std::optional<at::Tensor>& b_down_arg) {
  check_relu_ffn_args(x_arg, w_gate_arg, w_up_arg, w_down_t_arg, act, threshold, b_gate_arg,
                      b_up_arg, b_down_arg);
  TORCH_CHECK_VALUE(x_arg.device().is_cpu(), "relu_ffn: x must be a CPU tensor for the cpu backend");
  const at::Tensor x = cpu::aligned(x_arg), w_gate = cpu::aligned(w_gate_arg),
                   w_down_t = cpu::aligned(w_down_t_arg);
  const std::optional<at::Tensor> w_up = cpu::aligned(w_up_arg), b_gate = cpu::aligned(b_gate_arg),
                                  b_up = cpu::aligned(b_up_arg), b_down = cpu::aligned(b_down_arg);
  const int a = static_cast<int>(act);
  const float t = static_cast<float>(threshold);
  const int64_t rows = x.size(0);
  if (rows == 0) return at::empty({0, x.size(1)}, x.options());
  if (rows <= kMaxRows) {
    at::Tensor y = at::empty({rows, x.size(1)}, x.options());
    switch (x.scalar_type()) {
      case at::kFloat:
        dispatch_rows<float>(x, w_gate, w_up, w_down_t, a, t, b_gate, b_up, b_down, y);
        break;
      case at::kHalf:
        dispatch_rows<c10::Half>(x, w_gate, w_up, w_down_t, a, t, b_gate, b_up, b_down, y);
        break;
      default:
        dispatch_rows<c10::BFloat16>(x, w_gate, w_up, w_down_t, a, t, b_gate, b_up, b_down, y);
        break;
    }
    return y;
  }
  return dense(x, w_gate, w_up, w_down_t, a, t, b_gate, b_up, b_down);
}

}  // namespace actshift
