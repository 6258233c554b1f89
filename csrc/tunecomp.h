// Declarations shared by the extension's sources; bindings.cpp exposes them to Python.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace tunecomp {

// y = x @ where(mask_v, v, 0) @ where(mask_u, u, 0).T + bias; x [N, in] float32 on the CPU.
// sparse: skip pruned entries (worth it at high pruning ratios), else two BLAS GEMMs.
// packed: the kept entries grouped as the sparse path needs them (pack_groups_cpu), reused
// while the factors and masks do not change; built on each call when absent.
at::Tensor lowrank_forward_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& mask_u,
                               const std::optional<at::Tensor>& mask_v, bool sparse,
                               const std::optional<std::vector<at::Tensor>>& packed);

// lowrank_forward_cpu, returning {y, t} with t = x @ where(mask_v, v, 0) [N, r], which
// lowrank_backward_cpu then takes instead of computing it again.
std::vector<at::Tensor> lowrank_forward_with_t_cpu(const at::Tensor& x, const at::Tensor& u,
                                                   const at::Tensor& v,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& mask_u,
                                                   const std::optional<at::Tensor>& mask_v,
                                                   bool sparse,
                                                   const std::optional<std::vector<at::Tensor>>&
                                                       packed);

// The kept entries of the factors grouped as the sparse forward needs them (V by column,
// U by row) and, with backward, also as the sparse backward does (U by column, V by row);
// three tensors each: group starts (int64), indices (int32), values (float).
std::vector<at::Tensor> pack_groups_cpu(const at::Tensor& u, const at::Tensor& v,
                                        const std::optional<at::Tensor>& mask_u,
                                        const std::optional<at::Tensor>& mask_v, bool backward);

// pack_groups_cpu's result for factors whose values changed but whose kept entries did not
// (a training step between two prunings): the same starts and indices, the values read
// again from u and v. O(kept entries), against packing's two passes over whole factors.
std::vector<at::Tensor> pack_values_cpu(const at::Tensor& u, const at::Tensor& v,
                                        const std::vector<at::Tensor>& packed);

// The sparse forward from the kept entries alone: packed is pack_groups_cpu's forward half
// (V's and U's starts, indices, values), checked here (sizes, order, index ranges);
// out_features and the rank come from it, in_features from x. For models whose pruned
// entries are gone (tunecomp.deploy's sparse form): no dense factors, no masks.
at::Tensor lowrank_forward_packed_cpu(const at::Tensor& x, const std::vector<at::Tensor>& packed,
                                      const std::optional<at::Tensor>& bias);

// {grad_x, grad_u, grad_v, grad_b} of the op; grad_b is empty unless has_bias. t: the
// forward's x @ where(mask_v, v, 0) (lowrank_forward_with_t_cpu), either path; computed here
// when absent.
std::vector<at::Tensor> lowrank_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                             const at::Tensor& u, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask_u,
                                             const std::optional<at::Tensor>& mask_v,
                                             bool has_bias, bool sparse,
                                             const std::optional<std::vector<at::Tensor>>& packed,
                                             const std::optional<at::Tensor>& t);

#ifdef TUNECOMP_WITH_CUDA
// The SM architectures this build compiled device code for (e.g. {80, 90}).
std::vector<int> cuda_compiled_archs();

// The "cuda" backend (lowrank_cuda.cu): the op, its blend with the frozen teacher
// alpha·(x·W0ᵀ + b0) + sqrt(1 - alpha²)·op(x), and their backward passes, on CUDA tensors
// (float32, float16, bfloat16; any strides). alpha is a one-element float32 device tensor.
// The backward functions return {grad_x, grad_u, grad_v, grad_b}, grad_b empty unless has_bias.
// fold / fold_grad_x: the blend through its folded weight alpha·W0 + s·Um·Vmᵀ (one GEMM of
// these kernels) and cuBLAS's dense GEMM, which tunecomp.ops picks where it is fewer FLOPs.
at::Tensor lowrank_forward_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& mask_u,
                                const std::optional<at::Tensor>& mask_v);
std::vector<at::Tensor> lowrank_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                              const at::Tensor& u, const at::Tensor& v,
                                              const std::optional<at::Tensor>& mask_u,
                                              const std::optional<at::Tensor>& mask_v,
                                              bool has_bias);
at::Tensor blended_forward_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& mask_u,
                                const std::optional<at::Tensor>& mask_v,
                                const at::Tensor& teacher_weight,
                                const std::optional<at::Tensor>& teacher_bias,
                                const at::Tensor& alpha, bool fold);
std::vector<at::Tensor> blended_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                              const at::Tensor& u, const at::Tensor& v,
                                              const std::optional<at::Tensor>& mask_u,
                                              const std::optional<at::Tensor>& mask_v,
                                              const at::Tensor& teacher_weight,
                                              const at::Tensor& alpha, bool has_bias,
                                              bool fold_grad_x);
#endif

}  // namespace tunecomp
