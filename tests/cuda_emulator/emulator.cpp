// The "cuda" backend's host code and kernel (csrc/lowrank_cuda_ops.h, csrc/masked_gemm.cuh)
// compiled for the CPU against cuda_mock.h, exposing the same four entry points as
// tunecomp._C. Built by tests/cuda_emulator/__init__.py; slow, for small test shapes only.
#include "cuda_mock.h"

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include <torch/extension.h>

#define TUNECOMP_KERNEL_DEVICE c10::DeviceType::CPU
#include "lowrank_cuda_ops.h"

namespace tunecomp {
namespace cuda_ops {

namespace {
int64_t emulated_sms = 4;  // few, so that small test problems take the split-K and fused paths
int64_t emulated_fused_launches = 0;

// Runs kernel() as every thread of every block of the grid, one block at a time, with
// shared_bytes of (NaN-filled: nothing may read it before writing) dynamic shared memory.
template <typename Kernel>
void emulate(int64_t grid_x, int64_t grid_y, int64_t grid_z, int64_t shared_bytes, Kernel kernel) {
  using namespace cuda_kernels;
  std::vector<float> dynamic_shared((shared_bytes + 3) / 4 + 8);
  for (int64_t z = 0; z < grid_z; ++z)
    for (int64_t y = 0; y < grid_y; ++y)
      for (int64_t x = 0; x < grid_x; ++x) {
        std::fill(dynamic_shared.begin(), dynamic_shared.end(), std::nanf(""));
        emulated_dynamic_shared = reinterpret_cast<unsigned char*>(
            (reinterpret_cast<uintptr_t>(dynamic_shared.data()) + 31) / 32 * 32);
        std::barrier<> barrier(kThreads);
        emulated_block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (int t = 0; t < kThreads; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            blockIdx = {static_cast<unsigned>(x), static_cast<unsigned>(y),
                        static_cast<unsigned>(z)};
            kernel();
            emulated_require(!emulated_copies_outstanding(), "cp.async copies never waited for");
          });
        }
        for (auto& thread : threads) thread.join();
        const char* fault = emulated_fault.exchange(nullptr);
        TORCH_CHECK(fault == nullptr, "emulated kernel: ", fault);
      }
}

template <typename T>
void emulate_gemm(const GemmParams& params, int64_t grid_z) {
  using namespace cuda_kernels;
  emulate(ceil_div(params.m, kBlockM), ceil_div(params.n, kBlockN), grid_z, 0,
          [&] { masked_gemm_kernel<T>(params); });
}

template <typename T>
void emulate_fused(const GemmParams& t, const GemmParams& y, int64_t t_ld, int64_t shared_bytes) {
  using namespace cuda_kernels;
  emulate(ceil_div(t.m, kBlockM), 1, 1, shared_bytes,
          [&] { fused_lowrank_forward_kernel<T>(t, y, static_cast<int>(t_ld)); });
}
}  // namespace

void launch_masked_gemm(const GemmParams& params, at::ScalarType dtype, int64_t grid_z) {
  if (params.m == 0 || params.n == 0) return;
  dispatch_dtype(dtype, [&](auto tag) { emulate_gemm<typename decltype(tag)::type>(params, grid_z); });
}

void launch_fused_forward(const GemmParams& t, const GemmParams& y, int64_t t_ld,
                          at::ScalarType dtype, int64_t shared_bytes) {
  if (t.m == 0 || y.n == 0) return;
  ++emulated_fused_launches;
  dispatch_dtype(dtype, [&](auto tag) {
    emulate_fused<typename decltype(tag)::type>(t, y, t_ld, shared_bytes);
  });
}

int64_t multiprocessor_count(const at::Tensor&) { return emulated_sms; }

int64_t fused_shared_memory_limit(const at::Tensor&) {  // an H100's opt-in limit
  return 227 * 1024 - static_cast<int64_t>(sizeof(cuda_kernels::SharedTiles<float>));
}

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
           const OptTensor& teacher_bias, const at::Tensor& alpha, bool fold) {
          return ops::forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias,
                              alpha, fold);
        },
        py::arg("x"), py::arg("u"), py::arg("v"), py::arg("bias"), py::arg("mask_u"),
        py::arg("mask_v"), py::arg("teacher_weight"), py::arg("teacher_bias"), py::arg("alpha"),
        py::arg("fold") = false);
  m.def("blended_backward_cuda",
        [](const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
           const at::Tensor& v, const OptTensor& mask_u, const OptTensor& mask_v,
           const at::Tensor& teacher_weight, const at::Tensor& alpha, bool has_bias,
           bool fold_grad_x) {
          return ops::backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha,
                               has_bias, fold_grad_x);
        },
        py::arg("grad_y"), py::arg("x"), py::arg("u"), py::arg("v"), py::arg("mask_u"),
        py::arg("mask_v"), py::arg("teacher_weight"), py::arg("alpha"), py::arg("has_bias") = true,
        py::arg("fold_grad_x") = false);
  m.def("set_multiprocessor_count", [](int64_t count) { ops::emulated_sms = count; });
  m.def("fused_launches", [] { return ops::emulated_fused_launches; },
        "how many fused forward launches ran (tests check the path is taken)");
}
