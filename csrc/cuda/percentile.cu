// CUDA kernels of the `percentile_scale` and `adascale_stats` ops. The per-row math
// (order-preserving keys, pick_bin, topk_sum, shape) comes from csrc/include/actshift/percentile.h,
// shared with the CPU kernel.
//
// Design
// - One thread block per row (rows on grid x; blocks loop over rows past 2^31 - 1), 128, 256 or
//   512 threads: the smallest block that covers the row in one sweep, else 512. A sweep walks the
//   row in index order, kThreads packs of kVec elements per step (16-byte loads and stores when
//   pointers and the row length allow, else one element), with the same number of steps in every
//   thread so block-wide collectives can run inside it.
// - Rows of up to kMaxStagedD elements are staged once in dynamic shared memory as (clipped) fp32,
//   so the selection passes read shared memory; longer rows re-read global memory (mostly L2) in
//   every pass, which is correct for any d.
// - tau, the k-th largest value, comes from an exact radix select on percentile::key(): 4 passes
//   of 8 bits, most significant first. Each pass histograms the digit of the elements whose key
//   matches the prefix chosen so far (shared-memory atomics, aggregated per warp because ReLU rows
//   put most elements in one bin), then a block-wide scan over the bins in descending order finds
//   the bin holding the remaining rank, exactly as pick_bin. Two histograms alternate so that a
//   pass can clear the next one while it picks: one barrier per counting sweep and one per pick.
//   The first counting sweep is fused into the staging sweep.
// - Elements are compared with tau by key, never as floats: "> tau" is key > key(tau) and "== tau"
//   is key == key(tau) (so -0.0 sits below +0.0), for c_gt, s_gt and the tie rank alike, as in the
//   CPU kernel, so every backend keeps the same elements. The select yields c_gt for free: the
//   rank left after the last pass is the number of elements equal to tau that are kept, k - c_gt.
// - kept(i) needs the index-ordered rank of i among the elements equal to tau only when some of
//   them are dropped; then each output step runs a block-wide exclusive scan of the tie counts,
//   carrying the running total from step to step.
// - A row holding NaN/Inf after the clip (a block-wide OR in the staging sweep), or whose k lies
//   outside [1, d] (the host checks k only for CPU tensors), skips the selection and gets NaN.
//   ReAct is elementwise: one sweep, no selection, nothing staged.
// - adascale_stats runs its two selections (k1, k2) side by side in the same sweeps.
// - Sums accumulate in fp32 per thread and combine in a cub::BlockReduce: deterministic for a
//   given shape, in a different order than the reference's sums.
#include "percentile.h"  // the launchers declared next to this file

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "convert.cuh"
#include "actshift/percentile.h"

namespace actshift {
namespace cuda {
namespace {

using percentile::key;
using percentile::kRadixBins;
using percentile::kRadixBits;
using percentile::kRadixPasses;

constexpr int kPackBytes = 16;
// Rows up to this length are staged in shared memory as fp32 (48 KB). Together with the kernels'
// static shared state (2-5 KB) that can pass the 48 KB a block gets by default; launch_rows then
// opts in to more (64 KB or more per block on every GPU since Volta).
constexpr int64_t kMaxStagedD = 12288;
constexpr size_t kSmemWithoutOptIn = 48 * 1024;
// Room for the alignment of the dynamic shared memory after the static state.
constexpr size_t kSmemSlack = 256;
// Threads each kernel keeps resident per SM (2 blocks of 512): caps registers at 64 per thread,
// enough to avoid spills, where ptxas' default for a bare block size spills to reach 32-40.
constexpr int kMinResidentThreads = 1024;

template <int N>
using Int = std::integral_constant<int, N>;

// Fixed-size tuple with elementwise +, so one block scan or reduction serves several selections
// or sums at once.
template <typename V, int N>
struct Tuple {
  V v[N];
  __host__ __device__ __forceinline__ Tuple operator+(const Tuple& o) const {
    Tuple t;
    for (int i = 0; i < N; ++i) t.v[i] = v[i] + o.v[i];
    return t;
  }
};

// The scan operator, spelled out: CUB's own sum functor and its ExclusiveSum's zero for a
// user-defined type have changed across CUDA releases.
struct Plus {
  template <typename U>
  __device__ __forceinline__ U operator()(const U& a, const U& b) const {
    return a + b;
  }
};

// kVec elements as fp32; with kVec > 1 a single 128-bit load.
template <int kVec, typename T>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[kVec]) {
  T raw[kVec];
  if constexpr (kVec == 1) {
    raw[0] = *p;
  } else {
    static_assert(kVec * sizeof(T) == kPackBytes, "a pack is 16 bytes");
    const uint4 bits = *reinterpret_cast<const uint4*>(p);
    memcpy(raw, &bits, sizeof(bits));
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_float(raw[j]);
}

template <int kVec, typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[kVec]) {
  T raw[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) raw[j] = from_float<T>(in[j]);
  if constexpr (kVec == 1) {
    *p = raw[0];
  } else {
    uint4 bits;
    memcpy(&bits, raw, sizeof(bits));
    *reinterpret_cast<uint4*>(p) = bits;
  }
}

// Calls f(i, valid) for the packs [i, i + kVec) of a row of d elements, one block-wide step of
// kThreads packs at a time in index order. Every thread takes the same number of steps (valid is
// false past the end), so f may run block-wide collectives.
template <int kThreads, int kVec, typename F>
__device__ __forceinline__ void for_each_pack(int64_t d, F&& f) {
  for (int64_t base = 0; base < d; base += int64_t{kThreads} * kVec) {
    const int64_t i = base + static_cast<int64_t>(threadIdx.x) * kVec;
    f(i, i < d);
  }
}

// The dynamic shared memory holding a staged row (16-byte aligned for float4 reads).
__device__ __forceinline__ float* staged_row() {
  extern __shared__ float4 staged_mem[];
  return reinterpret_cast<float*>(staged_mem);
}

// One row as fp32, min(z, clip) applied, kVec consecutive elements at a time.
template <typename T, int kVec_>
struct RowReader {
  static constexpr int kVec = kVec_;
  const T* src;
  float* staged;  // the row in shared memory, or nullptr when it is not staged
  bool has_clip;
  float clip;

  __device__ __forceinline__ void load_global(int64_t i, float (&v)[kVec]) const {
    load_pack(src + i, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = percentile::clip(v[j], has_clip, clip);
  }

  // Keeps a pack read by load_global for the later sweeps.
  __device__ __forceinline__ void stage(int64_t i, const float (&v)[kVec]) const {
    if (staged == nullptr) return;
    if constexpr (kVec % 4 == 0) {
#pragma unroll
      for (int j = 0; j < kVec; j += 4) {
        *reinterpret_cast<float4*>(staged + i + j) =
            make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) staged[i + j] = v[j];
    }
  }

  __device__ __forceinline__ void load(int64_t i, float (&v)[kVec]) const {
    if (staged == nullptr) {
      load_global(i, v);
    } else if constexpr (kVec % 4 == 0) {
#pragma unroll
      for (int j = 0; j < kVec; j += 4) {
        const float4 q = *reinterpret_cast<const float4*>(staged + i + j);
        v[j] = q.x;
        v[j + 1] = q.y;
        v[j + 2] = q.z;
        v[j + 3] = q.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = staged[i + j];
    }
  }
};

// Adds 1 to hist[bin] for every lane with bin >= 0. Lanes of a warp that hit the same bin are
// counted by one atomic: same-address shared atomics serialize, and a ReLU row holds mostly zeros.
// All 32 lanes must call it.
__device__ __forceinline__ void add_to_bin(int* hist, int bin) {
#if __CUDA_ARCH__ >= 700
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
  if (bin >= 0 && static_cast<int>(threadIdx.x % 32) == __ffs(peers) - 1) {
    atomicAdd(&hist[bin], __popc(peers));
  }
#else  // no __match_any_sync before Volta
  if (bin >= 0) atomicAdd(&hist[bin], 1);
#endif
}

// kSel exact radix selections over one row at once: the k[s]-th largest key for each s. Every
// thread holds the same selection state; shared memory holds the histograms and each pick.
//
// Protocol: construct (clears histogram 0), __syncthreads(), one sweep calling count() for every
// element, __syncthreads(), then finish() runs the remaining picks and counting sweeps.
template <int kSel, int kThreads>
class RadixSelect {
 public:
  using Counts = Tuple<int, kSel>;
  using Scan = cub::BlockScan<Counts, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;

  struct Shared {
    int hist[2][kSel][kRadixBins];  // pass p counts into hist[p % 2]
    typename Scan::TempStorage scan;
    int bin[kSel];    // the last pick: the bin holding the rank,
    int rank[kSel];   // the rank within that bin,
    int count[kSel];  // and the number of elements in it
  };

  __device__ RadixSelect(Shared& sh, const int (&k)[kSel]) : sh_(sh) {
#pragma unroll
    for (int s = 0; s < kSel; ++s) {
      prefix_[s] = 0;
      rank_[s] = k[s];
      count_[s] = 0;
      carry_[s] = 0;
    }
    for (int b = threadIdx.x; b < kSel * kRadixBins; b += kThreads) (&sh.hist[0][0][0])[b] = 0;
  }

  // Counts `key` in this pass' histogram of every selection whose prefix it matches. All threads
  // of the block call it the same number of times; valid is false for padding.
  __device__ __forceinline__ void count(uint32_t key, bool valid) {
    const int shift = digit_shift();
#pragma unroll
    for (int s = 0; s < kSel; ++s) {
      const bool match = valid && (key & mask_) == prefix_[s];
      const int digit = static_cast<int>((key >> shift) & (kRadixBins - 1));
      add_to_bin(sh_.hist[pass_ % 2][s], match ? digit : -1);
    }
  }

  // The remaining passes; `in` re-reads the row (a RowReader). Ends behind a barrier.
  template <typename Reader>
  __device__ void finish(const Reader& in, int64_t d) {
    constexpr int kVec = Reader::kVec;
    for (;;) {
      pick();
      __syncthreads();
      advance();
      if (pass_ == kRadixPasses) return;
      for_each_pack<kThreads, kVec>(d, [&](int64_t i, bool valid) {
        float v[kVec] = {};
        if (valid) in.load(i, v);
#pragma unroll
        for (int j = 0; j < kVec; ++j) count(key(v[j]), valid);
      });
      __syncthreads();
    }
  }

  // After finish(): the key of tau, the number of elements whose key equals it, and how many of
  // those are kept (k - c_gt).
  __device__ __forceinline__ uint32_t tau_key(int s) const { return prefix_[s]; }
  __device__ __forceinline__ int ties(int s) const { return count_[s]; }
  __device__ __forceinline__ int ties_kept(int s) const { return rank_[s]; }
  // Whether every element equal to tau is kept, so kept() needs no tie rank.
  __device__ __forceinline__ bool all_ties_kept() const {
    bool all = true;
#pragma unroll
    for (int s = 0; s < kSel; ++s) all = all && rank_[s] == count_[s];
    return all;
  }

  // For the current step of an index-ordered sweep: the number of elements equal to tau before
  // this thread's pack in the row, given `mine`, the number within it. Every thread calls it once
  // per step, steps in order.
  __device__ __forceinline__ Counts ties_before(const Counts& mine) {
    Counts before, step_total;
    Scan(sh_.scan).ExclusiveScan(mine, before, Counts{}, Plus{}, step_total);
    __syncthreads();  // the scan storage is reused by the next step
#pragma unroll
    for (int s = 0; s < kSel; ++s) {
      before.v[s] += carry_[s];
      carry_[s] += step_total.v[s];
    }
    return before;
  }

  // kept(i) for selection s: above tau, or equal to it with fewer than k - c_gt equal elements
  // before it. `before` is the count of equal elements ahead of this one (from ties_before(), or 0
  // when all_ties_kept()) and is advanced past it.
  __device__ __forceinline__ bool kept(int s, uint32_t key, int& before) const {
    if (key != prefix_[s]) return key > prefix_[s];
    return before++ < rank_[s];
  }

 private:
  __device__ __forceinline__ int digit_shift() const {
    return kRadixBits * (kRadixPasses - 1 - pass_);
  }

  // Each thread scans kBinsPerThread bins, thread 0 the highest, so the exclusive sum at bin b is
  // the number of candidates in the bins above it; b holds the rank when above < rank <= above +
  // hist[b], which is the bin pick_bin returns, with rank - above the rank left inside it. Also
  // clears the histogram the next pass counts into, which nobody reads any more.
  __device__ void pick() {
    constexpr int kBinsPerThread = kRadixBins > kThreads ? kRadixBins / kThreads : 1;
    static_assert(kBinsPerThread * kThreads >= kRadixBins, "every bin has a thread");
    const int cur = pass_ % 2;
    if (pass_ + 1 < kRadixPasses) {
      for (int b = threadIdx.x; b < kSel * kRadixBins; b += kThreads) {
        (&sh_.hist[1 - cur][0][0])[b] = 0;
      }
    }
    Counts own[kBinsPerThread], above[kBinsPerThread];
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      const int b = bin_of(j);
#pragma unroll
      for (int s = 0; s < kSel; ++s) own[j].v[s] = b >= 0 ? sh_.hist[cur][s][b] : 0;
    }
    Scan(sh_.scan).ExclusiveScan(own, above, Counts{}, Plus{});
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
#pragma unroll
      for (int s = 0; s < kSel; ++s) {
        const int a = above[j].v[s], n = own[j].v[s];
        if (a < rank_[s] && rank_[s] <= a + n) {  // exactly one bin per selection
          sh_.bin[s] = bin_of(j);
          sh_.rank[s] = rank_[s] - a;
          sh_.count[s] = n;
        }
      }
    }
  }

  // The bin a thread scans j-th, in descending order over the block; negative past the last bin.
  __device__ __forceinline__ int bin_of(int j) const {
    constexpr int kBinsPerThread = kRadixBins > kThreads ? kRadixBins / kThreads : 1;
    return kRadixBins - 1 - (static_cast<int>(threadIdx.x) * kBinsPerThread + j);
  }

  // Takes the pick (behind the barrier that follows pick()) into the prefix. The next pick
  // overwrites it only after the next counting sweep's barrier.
  __device__ __forceinline__ void advance() {
    const int shift = digit_shift();
#pragma unroll
    for (int s = 0; s < kSel; ++s) {
      prefix_[s] |= static_cast<uint32_t>(sh_.bin[s]) << shift;
      rank_[s] = sh_.rank[s];
      count_[s] = sh_.count[s];
    }
    mask_ |= static_cast<uint32_t>(kRadixBins - 1) << shift;
    ++pass_;
  }

  Shared& sh_;
  uint32_t prefix_[kSel];  // the digits chosen so far; after the last pass, the key of tau
  uint32_t mask_ = 0;      // the bits of prefix_ chosen so far
  int pass_ = 0;
  int rank_[kSel];   // the rank still to find among the candidates (1-based, largest first)
  int count_[kSel];  // the number of candidates left (elements matching the prefix; set by picks)
  int carry_[kSel];  // elements equal to tau in the steps of ties_before() so far
};

// ---- percentile_scale ---------------------------------------------------------------------------

template <typename T>
struct PercentileParams {
  const T* z;
  T* y;
  float* r;
  const int32_t* k;
  int64_t rows;
  int64_t d;
  int method;
  bool has_clip;
  float clip;
  bool staged;
};

template <int kThreads>
struct PercentileShared {
  typename RadixSelect<1, kThreads>::Shared select;
  typename cub::BlockReduce<Tuple<float, 2>, kThreads>::TempStorage reduce;
  float s1;
  float scale;  // e^r
};

template <typename T, int kThreads, int kVec>
__global__ void __launch_bounds__(kThreads, kMinResidentThreads / kThreads)
    percentile_kernel(const PercentileParams<T> p) {
  using Select = RadixSelect<1, kThreads>;
  using Reduce = cub::BlockReduce<Tuple<float, 2>, kThreads>;
  __shared__ PercentileShared<kThreads> sh;
  float* const staged = p.staged ? staged_row() : nullptr;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const RowReader<T, kVec> in{p.z + row * p.d, staged, p.has_clip, p.clip};

    if (p.method == percentile::kReact) {  // elementwise: no selection, no shared state
      for_each_pack<kThreads, kVec>(p.d, [&](int64_t i, bool valid) {
        if (!valid) return;
        float v[kVec];
        in.load_global(i, v);
        store_pack(p.y + row * p.d + i, v);
      });
      continue;
    }

    const int k = p.k[row];
    Select select(sh.select, {k});
    __syncthreads();  // histogram 0 cleared; the previous row is done with the shared state

    // Stage the row, with s1, the finiteness check and the first counting pass.
    float s1 = 0.0f;
    bool finite = true;
    for_each_pack<kThreads, kVec>(p.d, [&](int64_t i, bool valid) {
      float v[kVec] = {};
      if (valid) {
        in.load_global(i, v);
        in.stage(i, v);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        s1 += v[j];
        finite = finite && percentile::is_finite(v[j]);
        select.count(key(v[j]), valid);
      }
    });

    // NaN/Inf anywhere, or a k the host did not check (CUDA tensors), make the row NaN.
    if (__syncthreads_or(!finite) || k < 1 || k > p.d) {
      if (p.method != percentile::kRatio) {
        for_each_pack<kThreads, kVec>(p.d, [&](int64_t i, bool valid) {
          if (!valid) return;
          float v[kVec];
#pragma unroll
          for (int j = 0; j < kVec; ++j) v[j] = CUDART_NAN_F;
          store_pack(p.y + row * p.d + i, v);
        });
      }
      if (threadIdx.x == 0) p.r[row] = CUDART_NAN_F;
      continue;
    }

    select.finish(in, p.d);
    const uint32_t tau_key = select.tau_key(0);

    float s_gt = 0.0f;
    for_each_pack<kThreads, kVec>(p.d, [&](int64_t i, bool valid) {
      if (!valid) return;
      float v[kVec];
      in.load(i, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) s_gt += key(v[j]) > tau_key ? v[j] : 0.0f;
    });
    const Tuple<float, 2> sums = Reduce(sh.reduce).Reduce(Tuple<float, 2>{{s1, s_gt}}, Plus{});
    if (threadIdx.x == 0) {
      const int c_gt = k - select.ties_kept(0);
      const float s2 = percentile::topk_sum(sums.v[1], c_gt, k, percentile::from_key(tau_key));
      const float r = sums.v[0] / s2;
      p.r[row] = r;
      sh.s1 = sums.v[0];
      sh.scale = expf(r);
    }
    if (p.method == percentile::kRatio) continue;
    __syncthreads();  // s1 and scale
    const float row_s1 = sh.s1, scale = sh.scale;

    const bool tie_rank = percentile::needs_mask(p.method) && !select.all_ties_kept();
    for_each_pack<kThreads, kVec>(p.d, [&](int64_t i, bool valid) {
      float v[kVec] = {};
      if (valid) in.load(i, v);
      typename Select::Counts before{};
      if (tie_rank) {
        typename Select::Counts mine{};
#pragma unroll
        for (int j = 0; j < kVec; ++j) mine.v[0] += valid && key(v[j]) == tau_key;
        before = select.ties_before(mine);
      }
      if (!valid) return;
      float out[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const bool kept = select.kept(0, key(v[j]), before.v[0]);
        out[j] = percentile::shape(p.method, v[j], kept, row_s1, k, scale);
      }
      store_pack(p.y + row * p.d + i, out);
    });
  }
}

// ---- adascale_stats -----------------------------------------------------------------------------

template <typename T>
struct AdascaleParams {
  const T* z;
  const T* z_perturbed;
  float* q;
  float* c_o;
  int64_t rows;
  int64_t d;
  int k1;
  int k2;
  bool staged;
};

template <int kThreads>
struct AdascaleShared {
  typename RadixSelect<2, kThreads>::Shared select;
  typename cub::BlockReduce<Tuple<float, 2>, kThreads>::TempStorage reduce;
};

template <typename T, int kThreads, int kVec>
__global__ void __launch_bounds__(kThreads, kMinResidentThreads / kThreads)
    adascale_kernel(const AdascaleParams<T> p) {
  using Select = RadixSelect<2, kThreads>;
  using Reduce = cub::BlockReduce<Tuple<float, 2>, kThreads>;
  __shared__ AdascaleShared<kThreads> sh;
  float* const staged = p.staged ? staged_row() : nullptr;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const RowReader<T, kVec> in{p.z + row * p.d, staged, false, 0.0f};
    const T* const z_perturbed = p.z_perturbed + row * p.d;

    Select select(sh.select, {p.k1, p.k2});
    __syncthreads();  // histogram 0 cleared; the previous row is done with the shared state
    for_each_pack<kThreads, kVec>(p.d, [&](int64_t i, bool valid) {
      float v[kVec] = {};
      if (valid) {
        in.load_global(i, v);
        in.stage(i, v);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) select.count(key(v[j]), valid);
    });
    __syncthreads();
    select.finish(in, p.d);

    // Q and C_o, summed over the kept positions of selections 0 (k1) and 1 (k2).
    const bool tie_rank = !select.all_ties_kept();
    Tuple<float, 2> acc{};
    for_each_pack<kThreads, kVec>(p.d, [&](int64_t i, bool valid) {
      float v[kVec] = {};
      if (valid) in.load(i, v);
      typename Select::Counts before{};
      if (tie_rank) {
        typename Select::Counts mine{};
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
#pragma unroll
          for (int s = 0; s < 2; ++s) mine.v[s] += valid && key(v[j]) == select.tau_key(s);
        }
        before = select.ties_before(mine);
      }
      if (!valid) return;
      bool kept[2][kVec];
      bool any = false;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          kept[s][j] = select.kept(s, key(v[j]), before.v[s]);
          any = any || kept[s][j];
        }
      }
      if (!any) return;  // z̃ only matters at kept positions
      float w[kVec];
      load_pack(z_perturbed + i, w);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (kept[0][j]) acc.v[0] += fabsf(v[j] - w[j]);
        if (kept[1][j]) acc.v[1] += w[j] < 0.0f ? 0.0f : w[j];  // relu that keeps NaN, like clamp
      }
    });
    const Tuple<float, 2> sums = Reduce(sh.reduce).Reduce(acc, Plus{});
    if (threadIdx.x == 0) {
      p.q[row] = sums.v[0];
      p.c_o[row] = sums.v[1];
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kPackBytes == 0; }

// Calls f(Int<kThreads>, Int<kVec>) with the pack width (16-byte packs when `vectorize`, else one
// element) and the smallest block that covers a row of d elements in one step, at most 512.
template <typename T, typename F>
cudaError_t with_shape(int64_t d, bool vectorize, F&& f) {
  const auto with_threads = [&](auto vec) {
    const int64_t packs = ceil_div(d, decltype(vec)::value);
    if (packs <= 128) return f(Int<128>{}, vec);
    if (packs <= 256) return f(Int<256>{}, vec);
    return f(Int<512>{}, vec);
  };
  return vectorize ? with_threads(Int<kPackBytes / sizeof(T)>{}) : with_threads(Int<1>{});
}

// Launches one block per row with the staged row in dynamic shared memory, opting in beyond the
// default 48 KB per block where the static state and the row need it. A GPU that cannot give that
// much (before Volta) runs the row unstaged instead.
template <typename Params>
cudaError_t launch_rows(void (*kernel)(Params), int threads, size_t static_smem, Params p,
                        cudaStream_t stream) {
  size_t staged_bytes = p.staged ? static_cast<size_t>(p.d) * sizeof(float) : 0;
  if (static_smem + staged_bytes + kSmemSlack > kSmemWithoutOptIn &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(staged_bytes)) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the refusal so the launch reports only its own error
    p.staged = false;
    staged_bytes = 0;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(p.rows, INT32_MAX));
  kernel<<<blocks, threads, staged_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t percentile_typed(const PercentileParams<T>& p, cudaStream_t stream) {
  const bool vectorize = is_aligned(p.z) && is_aligned(p.y) && (p.d * sizeof(T)) % kPackBytes == 0;
  return with_shape<T>(p.d, vectorize, [&](auto threads, auto vec) {
    constexpr int kThreads = decltype(threads)::value;
    return launch_rows(percentile_kernel<T, kThreads, decltype(vec)::value>, kThreads,
                       sizeof(PercentileShared<kThreads>), p, stream);
  });
}

template <typename T>
cudaError_t adascale_typed(const AdascaleParams<T>& p, cudaStream_t stream) {
  const bool vectorize =
      is_aligned(p.z) && is_aligned(p.z_perturbed) && (p.d * sizeof(T)) % kPackBytes == 0;
  return with_shape<T>(p.d, vectorize, [&](auto threads, auto vec) {
    constexpr int kThreads = decltype(threads)::value;
    return launch_rows(adascale_kernel<T, kThreads, decltype(vec)::value>, kThreads,
                       sizeof(AdascaleShared<kThreads>), p, stream);
  });
}

}  // namespace

cudaError_t launch_percentile_scale(DType dtype, const void* z, void* y, float* r, const int32_t* k,
                                    int64_t rows, int64_t d, int method, bool has_clip, float clip,
                                    cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  // Counts and ranks are int.
  if (rows < 0 || d < 0 || d > INT32_MAX || method < percentile::kRatio ||
      method > percentile::kReact) {
    return cudaErrorInvalidValue;
  }
  // ReAct is elementwise and reads each element once: nothing to stage.
  const bool staged = method != percentile::kReact && d <= kMaxStagedD;
  const auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const PercentileParams<T> p{static_cast<const T*>(z), static_cast<T*>(y), r, k, rows, d,
                                method, has_clip, clip, staged};
    return percentile_typed(p, stream);
  };
  switch (dtype) {
    case DType::kFloat32: return run(static_cast<float*>(nullptr));
    case DType::kFloat16: return run(static_cast<__half*>(nullptr));
    case DType::kBFloat16: return run(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_adascale_stats(DType dtype, const void* z, const void* z_perturbed, float* q,
                                  float* c_o, int64_t rows, int64_t d, int k1, int k2,
                                  cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows < 0 || d > INT32_MAX || k1 < 1 || k1 > d || k2 < 1 || k2 > d) {
    return cudaErrorInvalidValue;
  }
  const bool staged = d <= kMaxStagedD;
  const auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const AdascaleParams<T> p{static_cast<const T*>(z), static_cast<const T*>(z_perturbed),
                              q, c_o, rows, d, k1, k2, staged};
    return adascale_typed(p, stream);
  };
  switch (dtype) {
    case DType::kFloat32: return run(static_cast<float*>(nullptr));
    case DType::kFloat16: return run(static_cast<__half*>(nullptr));
    case DType::kBFloat16: return run(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace actshift
