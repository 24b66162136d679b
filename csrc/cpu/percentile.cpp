// C++ CPU kernels of percentile_scale and adascale_stats (math: csrc/include/actshift/percentile.h).
//
// Rows run in parallel (at::parallel_for); each row is staged once as fp32 in a thread-local
// buffer, then:
//   1. staging: clip, fp32, keys and s1, branch-free so it vectorizes;
//   2. radix select of the k-th largest key in three digits (12, 10, 10 bits): a histogram pass,
//      then one pass that counts and sums the elements in higher bins (above tau for sure) and
//      compacts the winning bin's keys; the two later digits scan only those candidates
//      (typically a few percent of D);
//   3. the output pass, which keeps the first (k - c_gt) elements equal to tau in index order.
// No sort anywhere. Elements are compared by key, so "equal to tau" is exact and the same on
// every backend.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "actshift/percentile.h"
#include "cpu/aligned.h"
#include "cpu/convert.h"
#include "ops.h"

namespace actshift {
namespace {

using namespace percentile;

// Digit widths, most significant first. A 12-bit first digit (sign, exponent, 3 mantissa bits)
// spreads values of similar magnitude over several bins, so few candidates survive the first
// pass; its two 16 KiB histograms still fit in L1/L2.
constexpr int kDigits[] = {12, 10, 10};
constexpr int kFirstBits = 12, kFirstBins = 1 << kFirstBits, kFirstShift = 32 - kFirstBits;

// Scratch space of one thread: the row in fp32, its keys, the select candidates, and two
// interleaved histograms of the first digit.
struct Scratch {
  std::vector<float> row;
  std::vector<uint32_t> keys, cand;
  std::vector<int> count, count2;
  explicit Scratch(int64_t d) : row(d), keys(d), cand(d), count(kFirstBins), count2(kFirstBins) {}
};

// What the kernels need from one row: the k-th largest value tau (as a key) and the count and sum
// of the elements above it.
struct Selection {
  uint32_t tau_key;
  int64_t c_gt;
  float s_gt;
  int64_t c_eq;  // elements equal to tau: when all of them are kept, `kept` is just key >= tau_key
};

constexpr int kLanes = 8;  // independent partial sums: a vector register instead of a latency chain

// Stages row z[0..d) (clipped) into s.row / s.keys and returns s1; `finite` is false if the row
// holds NaN or Inf. Branch-free, so GCC vectorizes it.
template <typename T>
float stage(const T* z, int64_t d, bool has_clip, float c, Scratch& s, bool& finite) {
  // Clipping at +inf changes nothing (NaN > c is false too), so the loop needs no branch on it.
  c = has_clip ? c : INFINITY;
  float part[kLanes] = {};
  int bad = 0;
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = clip(cpu::load(z, i + l), true, c);
      bad |= !is_finite(v);
      part[l] += v;
      s.row[i + l] = v;
      s.keys[i + l] = key(v);
    }
  }
  for (; i < d; ++i) {
    const float v = clip(cpu::load(z, i), true, c);
    bad |= !is_finite(v);
    part[0] += v;
    s.row[i] = v;
    s.keys[i] = key(v);
  }
  finite = !bad;
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

// Radix select of the k-th largest key (1 <= k <= d) of a staged row, with the count and sum of
// the elements above it.
Selection select(Scratch& s, int64_t d, int64_t k64) {
  // First digit over the whole row. Alternating two histograms keeps runs of equal digits (the
  // zeros of a ReLU row) from serializing on one counter.
  std::fill(s.count.begin(), s.count.end(), 0);
  std::fill(s.count2.begin(), s.count2.end(), 0);
  int64_t i = 0;
  for (; i + 1 < d; i += 2) {
    ++s.count[s.keys[i] >> kFirstShift];
    ++s.count2[s.keys[i + 1] >> kFirstShift];
  }
  if (i < d) ++s.count[s.keys[i] >> kFirstShift];
  // Walk the bins from the top (summing the two histograms on the way) to the one holding rank k.
  int k = static_cast<int>(k64);
  uint32_t bin = 0;
  for (int b = kFirstBins - 1; b >= 0; --b) {
    const int c = s.count[b] + s.count2[b];
    if (k <= c) {
      bin = static_cast<uint32_t>(b);
      break;
    }
    k -= c;
  }

  // Elements in higher bins are above tau for sure: count and sum them (8 lanes, vectorizable).
  const uint32_t* keys = s.keys.data();
  const float* row = s.row.data();
  int64_t c_lane[kLanes] = {};
  float s_lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const bool gt = (keys[j + l] >> kFirstShift) > bin;
      c_lane[l] += gt;
      s_lane[l] += gt ? row[j + l] : 0.0f;
    }
  }
  for (; j < d; ++j) {
    const bool gt = (keys[j] >> kFirstShift) > bin;
    c_lane[0] += gt;
    s_lane[0] += gt ? row[j] : 0.0f;
  }
  int64_t c_gt = 0;
  float s_gt = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    c_gt += c_lane[l];
    s_gt += s_lane[l];
  }
  // The winning bin's keys become the candidates (branch-free compaction).
  uint32_t* cand = s.cand.data();
  int64_t n = 0;
  for (j = 0; j < d; ++j) {
    cand[n] = keys[j];
    n += (keys[j] >> kFirstShift) == bin;
  }

  // Later digits over the candidates only; those above tau's prefix are counted as they drop out.
  uint32_t prefix = bin << kFirstShift;
  int shift = kFirstShift;
  int hist[1 << 10];
  for (int pass = 1; pass < 3; ++pass) {
    const int bins = 1 << kDigits[pass];
    shift -= kDigits[pass];
    const uint32_t mask = static_cast<uint32_t>(bins - 1);
    std::fill(hist, hist + bins, 0);
    for (int64_t q = 0; q < n; ++q) ++hist[(cand[q] >> shift) & mask];
    const uint32_t b = static_cast<uint32_t>(pick_bin(hist, bins, k));
    prefix |= b << shift;
    int64_t m = 0;
    for (int64_t q = 0; q < n; ++q) {
      const uint32_t kv = cand[q];
      const uint32_t digit = (kv >> shift) & mask;
      c_gt += digit > b;
      s_gt += digit > b ? from_key(kv) : 0.0f;
      cand[m] = kv;
      m += digit == b;
    }
    n = m;
  }
  return Selection{prefix, c_gt, s_gt, n};
}

// Whether element i is kept (above tau, or one of the first `ties_left` elements equal to it).
inline bool keep(uint32_t kv, uint32_t tk, int64_t& ties_left) {
  if (kv > tk) return true;
  if (kv == tk && ties_left > 0) {
    --ties_left;
    return true;
  }
  return false;
}

template <typename T>
void percentile_rows(const at::Tensor& z, const int32_t* kp, int method, bool has_clip, float c,
                     at::Tensor& y, float* r) {
  const int64_t n = z.size(0), d = z.size(1);
  const T* zp = z.data_ptr<T>();
  T* yp = y.numel() ? y.data_ptr<T>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    Scratch s(d);
    for (int64_t row = begin; row < end; ++row) {
      const T* zr = zp + row * d;
      T* yr = yp ? yp + row * d : nullptr;
      if (method == kReact) {
        for (int64_t i = 0; i < d; ++i) cpu::store(yr, i, clip(cpu::load(zr, i), true, c));
        continue;
      }
      bool finite;
      const float s1 = stage(zr, d, has_clip, c, s, finite);
      if (!finite) {
        r[row] = NAN;
        for (int64_t i = 0; yr && i < d; ++i) cpu::store(yr, i, NAN);
        continue;
      }
      const int64_t k = kp[row];
      const Selection sel = select(s, d, k);
      const float ratio = s1 / topk_sum(sel.s_gt, sel.c_gt, k, from_key(sel.tau_key));
      r[row] = ratio;
      if (!yr) continue;
      const float scale = std::exp(ratio);
      if (method == kScale) {
        for (int64_t i = 0; i < d; ++i) cpu::store(yr, i, s.row[i] * scale);
        continue;
      }
      int64_t ties_left = k - sel.c_gt;
      if (ties_left == sel.c_eq) {  // every element equal to tau is kept: branch-free loops
        const uint32_t tk = sel.tau_key;
        const float* row = s.row.data();
        const uint32_t* keys = s.keys.data();
        const float fill = method == kAshB ? s1 / static_cast<float>(k) : 0.0f;
        const float mul = method == kAshS ? scale : 1.0f;
        if (method == kAshB) {
          for (int64_t i = 0; i < d; ++i) cpu::store(yr, i, keys[i] >= tk ? fill : 0.0f);
        } else {  // ash_p, ash_s: (kept ? z : 0) · mul, the same as shape()
          for (int64_t i = 0; i < d; ++i) cpu::store(yr, i, (keys[i] >= tk ? row[i] : 0.0f) * mul);
        }
        continue;
      }
      for (int64_t i = 0; i < d; ++i) {
        const bool kept = keep(s.keys[i], sel.tau_key, ties_left);
        cpu::store(yr, i, shape(method, s.row[i], kept, s1, k, scale));
      }
    }
  });
}

// Σ over the top-k positions of a staged row (index-ordered ties) of f(i).
template <typename F>
float topk_positions_sum(Scratch& s, int64_t d, int64_t k, F f) {
  const Selection sel = select(s, d, k);
  int64_t ties_left = k - sel.c_gt;
  float total = 0.0f;
  for (int64_t i = 0; i < d; ++i) {
    if (keep(s.keys[i], sel.tau_key, ties_left)) total += f(i);
  }
  return total;
}

template <typename T>
void adascale_rows(const at::Tensor& z, const at::Tensor& zt, int64_t k1, int64_t k2, float* q,
                   float* c_o) {
  const int64_t n = z.size(0), d = z.size(1);
  const T* zp = z.data_ptr<T>();
  const T* tp = zt.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    Scratch s(d);
    for (int64_t row = begin; row < end; ++row) {
      bool finite;
      stage(zp + row * d, d, false, 0.0f, s, finite);
      const T* tr = tp + row * d;
      // The selection reorders only s.cand, so s.keys and s.row serve both sums.
      q[row] = topk_positions_sum(s, d, k1,
                                  [&](int64_t i) { return std::fabs(s.row[i] - cpu::load(tr, i)); });
      c_o[row] = topk_positions_sum(s, d, k2,
                                    [&](int64_t i) { return std::max(cpu::load(tr, i), 0.0f); });
    }
  });
}

void check_cpu(const at::Tensor& z, const char* op) {
  TORCH_CHECK_VALUE(z.device().is_cpu(), op, ": z must be a CPU tensor for the cpu backend");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> percentile_scale_cpu(const at::Tensor& z_arg,
                                                        const at::Tensor& k_arg, int64_t method,
                                                        std::optional<double> clip) {
  check_percentile_args(z_arg, k_arg, method, clip);
  check_cpu(z_arg, "percentile_scale");
  const at::Tensor z = cpu::aligned(z_arg), k = cpu::aligned(k_arg);
  auto [y, r] = percentile_outputs(z, method);
  if (z.numel() == 0) return {y, r};
  const bool has_clip = clip.has_value();
  const float c = static_cast<float>(clip.value_or(0.0));
  const int32_t* kp = k.data_ptr<int32_t>();
  float* rp = r.numel() ? r.data_ptr<float>() : nullptr;
  const int m = static_cast<int>(method);
  switch (z.scalar_type()) {
    case at::kFloat: percentile_rows<float>(z, kp, m, has_clip, c, y, rp); break;
    case at::kHalf: percentile_rows<c10::Half>(z, kp, m, has_clip, c, y, rp); break;
    default: percentile_rows<c10::BFloat16>(z, kp, m, has_clip, c, y, rp); break;
  }
  return {y, r};
}

std::tuple<at::Tensor, at::Tensor> adascale_stats_cpu(const at::Tensor& z_arg,
                                                      const at::Tensor& z_perturbed_arg, int64_t k1,
                                                      int64_t k2) {
  check_adascale_args(z_arg, z_perturbed_arg, k1, k2);
  check_cpu(z_arg, "adascale_stats");
  const at::Tensor z = cpu::aligned(z_arg), z_perturbed = cpu::aligned(z_perturbed_arg);
  const auto opts = z.options().dtype(at::kFloat);
  at::Tensor q = at::empty({z.size(0)}, opts), c_o = at::empty({z.size(0)}, opts);
  if (z.numel() == 0) return {q, c_o};
  switch (z.scalar_type()) {
    case at::kFloat: adascale_rows<float>(z, z_perturbed, k1, k2, q.data_ptr<float>(), c_o.data_ptr<float>()); break;
    case at::kHalf: adascale_rows<c10::Half>(z, z_perturbed, k1, k2, q.data_ptr<float>(), c_o.data_ptr<float>()); break;
    default: adascale_rows<c10::BFloat16>(z, z_perturbed, k1, k2, q.data_ptr<float>(), c_o.data_ptr<float>()); break;
  }
  return {q, c_o};
}

}  // namespace actshift
