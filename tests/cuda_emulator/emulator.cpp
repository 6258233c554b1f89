// The "cuda" backend's host code and kernel (csrc/lowrank_cuda_ops.h, csrc/masked_gemm.cuh)
// compiled for the CPU against cuda_mock.h, exposing the same four entry points as
// tunecomp._C. Built by tests/cuda_emulator/__init__.py; slow, for small test shapes only.
#include "cuda_mock.h"

#include <thread>
#include <vector>

#include <torch/extension.h>

#define TUNECOMP_KERNEL_DEVICE c10::DeviceType::CPU
#include "lowrank_cuda_ops.h"

namespace tunecomp {
namespace cuda_ops {

namespace {
int64_t emulated_sms = 4;  // few, so that small test problems take the split-K path

template <typename T>
void emulate(const GemmParams& params, int64_t grid_z) {
  using namespace cuda_kernels;
  const int64_t grid_x = ceil_div(params.m, kBlockM), grid_y = ceil_div(params.n, kBlockN);
  for (int64_t z = 0; z < grid_z; ++z)
    for (int64_t y = 0; y < grid_y; ++y)
      for (int64_t x = 0; x < grid_x; ++x) {
        std::barrier<> barrier(kThreads);
        emulated_block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (int t = 0; t < kThreads; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            blockIdx = {static_cast<unsigned>(x), static_cast<unsigned>(y),
                        static_cast<unsigned>(z)};
            masked_gemm_kernel<T>(params);
          });
        }
        for (auto& thread : threads) thread.join();
      }
}
}  // namespace

void launch_masked_gemm(const GemmParams& params, at::ScalarType dtype, int64_t grid_z) {
  if (params.m == 0 || params.n == 0) return;
  switch (dtype) {
    case at::kFloat: return emulate<float>(params, grid_z);
    case at::kHalf: return emulate<__half>(params, grid_z);
    case at::kBFloat16: return emulate<__nv_bfloat16>(params, grid_z);
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);
  }
}

int64_t multiprocessor_count(const at::Tensor&) { return emulated_sms; }

}  // namespace cuda_ops
}  // namespace tunecomp

namespace ops = tunecomp::cuda_ops;
using OptTensor = std::optional<at::Tensor>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_forward_cuda",
        [](const at::Tensor& x, const at::Tensor& u, const at::Tensor& v, const OptTensor& bias,
           const OptTensor& mask_u, const OptTensor& mask_v) {
          return ops::forward(x, u, v, bias, mask_u, mask_v, std::nullopt, std::nullopt,
                              std::nullopt);
        },
        py::arg("x"), py::arg("u"), py::arg("v"), py::arg("bias") = py::none(),
        py::arg("mask_u") = py::none(), py::arg("mask_v") = py::none());
  m.def("lowrank_backward_cuda",
        [](const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
           const at::Tensor& v, const OptTensor& mask_u, const OptTensor& mask_v,
           bool has_bias) {
          return ops::backward(grad_y, x, u, v, mask_u, mask_v, std::nullopt, std::nullopt,
                               has_bias);
        },
        py::arg("grad_y"), py::arg("x"), py::arg("u"), py::arg("v"),
        py::arg("mask_u") = py::none(), py::arg("mask_v") = py::none(),
        py::arg("has_bias") = true);
  m.def("blended_forward_cuda",
        [](const at::Tensor& x, const at::Tensor& u, const at::Tensor& v, const OptTensor& bias,
           const OptTensor& mask_u, const OptTensor& mask_v, const at::Tensor& teacher_weight,
           const OptTensor& teacher_bias, const at::Tensor& alpha) {
          return ops::forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias,
                              alpha);
        });
  m.def("blended_backward_cuda",
        [](const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
           const at::Tensor& v, const OptTensor& mask_u, const OptTensor& mask_v,
           const at::Tensor& teacher_weight, const at::Tensor& alpha, bool has_bias) {
          return ops::backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha,
                               has_bias);
        });
  m.def("set_multiprocessor_count", [](int64_t count) { ops::emulated_sms = count; });
}
