// Element types the torch-free CUDA launchers accept, shared by every csrc/cuda kernel and by
// csrc/torch_bindings_cuda.cpp, which maps a tensor's scalar type onto it.
#pragma once

namespace actshift {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

}  // namespace cuda
}  // namespace actshift
