// The "cuda" backend: entry points of the masked low-rank op on CUDA tensors (see
// lowrank_cuda_ops.h for the composition, masked_gemm.cuh for the kernel). Every launch goes
// on the current stream of x's device; no call syncs the host, so all of them can be
// captured in a CUDA graph.
#include "tunecomp.h"

#include <array>
#include <atomic>

// c10's CUDA headers only: ATen/cuda/CUDAContext.h also pulls in the cuBLAS and cuSPARSE
// headers, which a toolkit with just nvcc and the runtime does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define TUNECOMP_KERNEL_DEVICE c10::DeviceType::CUDA
#include "lowrank_cuda_ops.h"

namespace tunecomp {

namespace cuda_ops {

namespace {

// A device attribute, asked once per device (no host sync: safe inside a graph capture).
template <cudaDeviceAttr kAttribute>
int device_attribute(int device) {
  static std::array<std::atomic<int>, 64> cache{};  // per device index; 0 = not asked yet
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  int value = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttribute, device));
    if (cached) cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// A block may have more than 48 KB of shared memory (static + dynamic) only after the kernel
// opts in. Done once per device and kernel, to the most forward() may ask for (the device's
// limit minus the kernel's static tiles), and never lowered: a per-launch exact size could
// shrink it under another thread's (or a captured graph's) larger launch.
template <typename T>
void opt_in_to_large_shared_memory(int device) {
  static std::array<std::atomic<bool>, 64> done{};
  const bool cached = device >= 0 && device < static_cast<int>(done.size());
  if (cached && done[device].load(std::memory_order_acquire)) return;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, cuda_kernels::fused_lowrank_forward_kernel<T>));
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      cuda_kernels::fused_lowrank_forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device) -
          static_cast<int>(attributes.sharedSizeBytes)));
  if (cached) done[device].store(true, std::memory_order_release);
}

}  // namespace

void launch_masked_gemm(const GemmParams& params, at::ScalarType dtype, int64_t grid_z) {
  using namespace cuda_kernels;
  if (params.m == 0 || params.n == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(params.m, kBlockM)),
                  static_cast<unsigned>(ceil_div(params.n, kBlockN)),
                  static_cast<unsigned>(grid_z));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    masked_gemm_kernel<T><<<grid, kThreads, 0, stream>>>(params);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_fused_forward(const GemmParams& t, const GemmParams& y, int64_t t_ld,
                          at::ScalarType dtype, int64_t shared_bytes) {
  using namespace cuda_kernels;
  if (t.m == 0 || y.n == 0) return;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));  // x's device: the caller holds a CUDAGuard
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(ceil_div(t.m, kBlockM)));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    opt_in_to_large_shared_memory<T>(device);
    fused_lowrank_forward_kernel<T><<<grid, kThreads, shared_bytes, stream>>>(
        t, y, static_cast<int>(t_ld));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t fused_shared_memory_limit(const at::Tensor& like) {
  // the smallest limit over the kernel's instantiations (the fp32 one has the largest tiles)
  static_assert(sizeof(cuda_kernels::SharedTiles<float>) >= sizeof(cuda_kernels::SharedTiles<__half>) &&
                    sizeof(cuda_kernels::SharedTiles<float>) >= sizeof(cuda_kernels::SharedTiles<__nv_bfloat16>),
                "fused_shared_memory_limit assumes the fp32 tiles are the largest");
  return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(like.device().index()) -
         static_cast<int64_t>(sizeof(cuda_kernels::SharedTiles<float>));
}

int64_t multiprocessor_count(const at::Tensor& like) {
  return device_attribute<cudaDevAttrMultiProcessorCount>(like.device().index());
}

}  // namespace cuda_ops

namespace {

// x's device made current for the call: the launches go on its current stream.
c10::cuda::CUDAGuard on_device_of(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor; got ", x.device());
  return c10::cuda::CUDAGuard(x.device());
}

}  // namespace

at::Tensor lowrank_forward_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& mask_u,
                                const std::optional<at::Tensor>& mask_v) {
  const c10::cuda::CUDAGuard guard = on_device_of(x);
  return cuda_ops::forward(x, u, v, bias, mask_u, mask_v, std::nullopt, std::nullopt,
                           std::nullopt);
}

std::vector<at::Tensor> lowrank_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                              const at::Tensor& u, const at::Tensor& v,
                                              const std::optional<at::Tensor>& mask_u,
                                              const std::optional<at::Tensor>& mask_v,
                                              bool has_bias) {
  const c10::cuda::CUDAGuard guard = on_device_of(x);
  return cuda_ops::backward(grad_y, x, u, v, mask_u, mask_v, std::nullopt, std::nullopt,
                            has_bias);
}

at::Tensor blended_forward_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& mask_u,
                                const std::optional<at::Tensor>& mask_v,
                                const at::Tensor& teacher_weight,
                                const std::optional<at::Tensor>& teacher_bias,
                                const at::Tensor& alpha, bool fold) {
  const c10::cuda::CUDAGuard guard = on_device_of(x);
  return cuda_ops::forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha,
                           fold);
}

std::vector<at::Tensor> blended_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                              const at::Tensor& u, const at::Tensor& v,
                                              const std::optional<at::Tensor>& mask_u,
                                              const std::optional<at::Tensor>& mask_v,
                                              const at::Tensor& teacher_weight,
                                              const at::Tensor& alpha, bool has_bias,
                                              bool fold_grad_x) {
  const c10::cuda::CUDAGuard guard = on_device_of(x);
  return cuda_ops::backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias,
                            fold_grad_x);
}

}  // namespace tunecomp
