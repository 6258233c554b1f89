// Declarations shared by the extension's sources; bindings.cpp exposes them to Python.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace tunecomp {

at::Tensor masked_lowrank_forward_cpu(const at::Tensor& x, const at::Tensor& u,
                                      const at::Tensor& v,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& mask_u,
                                      const std::optional<at::Tensor>& mask_v);

#ifdef TUNECOMP_WITH_CUDA
// The SM architectures this build compiled device code for (e.g. {80, 90}).
std::vector<int> cuda_compiled_archs();
#endif

}  // namespace tunecomp
