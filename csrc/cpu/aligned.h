// Kernels read tensors through typed pointers (float*, int64_t*, c10::Half*), which C++ requires
// to be aligned for their type. Tensors torch allocates always are; a view of foreign memory at an
// odd address (torch.frombuffer(buf, offset=1), from_blob) need not be, and a load through such a
// pointer is undefined behaviour (UBSan: "load of misaligned address"). The CPU ops therefore pass
// their inputs through aligned(): the tensor itself, or in that rare case a contiguous copy.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace actshift {
namespace cpu {

// Every dtype the ops take (fp32/fp16/bf16, int32, int64) has an alignment equal to its size.
inline bool is_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % t.element_size() == 0;
}

inline at::Tensor aligned(const at::Tensor& t) {
  return is_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline std::optional<at::Tensor> aligned(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(aligned(*t)) : std::nullopt;
}

}  // namespace cpu
}  // namespace actshift
