// Declarations shared by the extension's sources; bindings.cpp exposes them to Python.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace tunecomp {

// y = x @ where(mask_v, v, 0) @ where(mask_u, u, 0).T + bias; x [N, in] float32 on the CPU.
// sparse: skip pruned entries (worth it at high pruning ratios), else two BLAS GEMMs.
at::Tensor lowrank_forward_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& mask_u,
                               const std::optional<at::Tensor>& mask_v, bool sparse);

// {grad_x, grad_u, grad_v, grad_b} of the op; grad_b is empty unless has_bias.
std::vector<at::Tensor> lowrank_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                             const at::Tensor& u, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask_u,
                                             const std::optional<at::Tensor>& mask_v,
                                             bool has_bias, bool sparse);

#ifdef TUNECOMP_WITH_CUDA
// The SM architectures this build compiled device code for (e.g. {80, 90}).
std::vector<int> cuda_compiled_archs();
#endif

}  // namespace tunecomp
