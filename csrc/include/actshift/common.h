// Portability macros shared by the CPU (g++) and CUDA (nvcc) translation units.
// Nothing here may include torch headers: csrc/cuda builds without torch.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ACTSHIFT_HD __host__ __device__ __forceinline__
#else
#define ACTSHIFT_HD inline
#endif

#include <cstdint>
