// fp32 <-> storage-type conversions for the C++ CPU kernels, written so GCC vectorizes them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace actshift {
namespace cpu {

inline float load(const float* p, int64_t i) { return p[i]; }
inline void store(float* p, int64_t i, float v) { p[i] = v; }

#if defined(__x86_64__) && defined(__FLT16_MAX__)
// _Float16 conversions become vcvtph2ps/vcvtps2ph under F16C (round to nearest even, like c10::Half).
inline float load(const c10::Half* p, int64_t i) {
  return static_cast<float>(reinterpret_cast<const _Float16*>(p)[i]);
}
inline void store(c10::Half* p, int64_t i, float v) {
  reinterpret_cast<_Float16*>(p)[i] = static_cast<_Float16>(v);
}
#else
inline float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline void store(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }
#endif

inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void store(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// Whether the CPU runs the AVX2+FMA+F16C builds of the kernels' inner loops (the kernels
// compile each loop for the baseline ISA and with __attribute__((target("avx2,fma,f16c")))).
inline bool has_avx2_fma_f16c() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace actshift
