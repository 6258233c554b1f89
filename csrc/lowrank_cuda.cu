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

void launch_masked_gemm(const GemmParams& params, at::ScalarType dtype, int64_t grid_z) {
  using namespace cuda_kernels;
  if (params.m == 0 || params.n == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(params.m, kBlockM)),
                  static_cast<unsigned>(ceil_div(params.n, kBlockN)),
                  static_cast<unsigned>(grid_z));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat:
      masked_gemm_kernel<float><<<grid, kThreads, 0, stream>>>(params);
      break;
    case at::kHalf:
      masked_gemm_kernel<__half><<<grid, kThreads, 0, stream>>>(params);
      break;
    case at::kBFloat16:
      masked_gemm_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(params);
      break;
    default:
      TORCH_CHECK_TYPE(false, "the cuda backend takes float32, float16 or bfloat16; got ", dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

// A block may have more than 48 KB of shared memory (static + dynamic) only after the kernel
// opts in. Done once per device and kernel, to the most forward() may ask for (the device's
// limit minus the kernel's static tiles), and never lowered: a per-launch exact size could
// shrink it under another thread's (or a captured graph's) larger launch.
template <typename T>
void opt_in_to_large_shared_memory(int device) {
  static std::array<std::atomic<bool>, 64> done{};
  const bool cached = device >= 0 && device < static_cast<int>(done.size());
  if (cached && done[device].load(std::memory_order_acquire)) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, cuda_kernels::fused_lowrank_forward_kernel<T>));
  C10_CUDA_CHECK(cudaFuncSetAttribute(cuda_kernels::fused_lowrank_forward_kernel<T>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      optin - static_cast<int>(attributes.sharedSizeBytes)));
  if (cached) done[device].store(true, std::memory_order_release);
}

template <typename T>
void launch_fused(const GemmParams& t, const GemmParams& y, int64_t t_ld, int64_t shared_bytes,
                  cudaStream_t stream) {
  using namespace cuda_kernels;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));  // x's device: the caller holds a CUDAGuard
  opt_in_to_large_shared_memory<T>(device);
  const dim3 grid(static_cast<unsigned>(ceil_div(t.m, kBlockM)));
  fused_lowrank_forward_kernel<T><<<grid, kThreads, shared_bytes, stream>>>(t, y, static_cast<int>(t_ld));
}

}  // namespace

void launch_fused_forward(const GemmParams& t, const GemmParams& y, int64_t t_ld,
                          at::ScalarType dtype, int64_t shared_bytes) {
  if (t.m == 0 || y.n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat:
      launch_fused<float>(t, y, t_ld, shared_bytes, stream);
      break;
    case at::kHalf:
      launch_fused<__half>(t, y, t_ld, shared_bytes, stream);
      break;
    case at::kBFloat16:
      launch_fused<__nv_bfloat16>(t, y, t_ld, shared_bytes, stream);
      break;
    default:
      TORCH_CHECK_TYPE(false, "the cuda backend takes float32, float16 or bfloat16; got ", dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t fused_shared_memory_limit(const at::Tensor& like) {
  // the smallest limit over the kernel's instantiations (the fp32 one has the largest tiles)
  static std::array<std::atomic<int>, 64> cache{};
  const int device = like.device().index();
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  int optin = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (optin == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (cached) cache[device].store(optin, std::memory_order_relaxed);
  }
  return optin - static_cast<int64_t>(sizeof(cuda_kernels::SharedTiles<float>));
}

int64_t multiprocessor_count(const at::Tensor& like) {
  static std::array<std::atomic<int>, 64> cache{};  // per device index; 0 = not asked yet
  const int device = like.device().index();
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  int count = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    if (cached) cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

}  // namespace cuda_ops

at::Tensor lowrank_forward_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& mask_u,
                                const std::optional<at::Tensor>& mask_v) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor; got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda_ops::forward(x, u, v, bias, mask_u, mask_v, std::nullopt, std::nullopt,
                           std::nullopt);
}

std::vector<at::Tensor> lowrank_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                              const at::Tensor& u, const at::Tensor& v,
                                              const std::optional<at::Tensor>& mask_u,
                                              const std::optional<at::Tensor>& mask_v,
                                              bool has_bias) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor; got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda_ops::backward(grad_y, x, u, v, mask_u, mask_v, std::nullopt, std::nullopt,
                            has_bias);
}

at::Tensor blended_forward_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& mask_u,
                                const std::optional<at::Tensor>& mask_v,
                                const at::Tensor& teacher_weight,
                                const std::optional<at::Tensor>& teacher_bias,
                                const at::Tensor& alpha) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor; got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda_ops::forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha);
}

std::vector<at::Tensor> blended_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                              const at::Tensor& u, const at::Tensor& v,
                                              const std::optional<at::Tensor>& mask_u,
                                              const std::optional<at::Tensor>& mask_v,
                                              const at::Tensor& teacher_weight,
                                              const at::Tensor& alpha, bool has_bias) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor; got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda_ops::backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias);
}

}  // namespace tunecomp
