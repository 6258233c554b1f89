// Python bindings of tunecomp._C: the only file that includes pybind11.
#include <torch/extension.h>

#include "tunecomp.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tunecomp native kernels";
  m.def("masked_lowrank_forward_cpu", &tunecomp::masked_lowrank_forward_cpu,
        "y = x @ where(mask_v, v, 0) @ where(mask_u, u, 0).T + bias, x 2-D on the CPU",
        py::arg("x"), py::arg("u"), py::arg("v"), py::arg("bias") = py::none(),
        py::arg("mask_u") = py::none(), py::arg("mask_v") = py::none());
#ifdef TUNECOMP_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_compiled_archs", &tunecomp::cuda_compiled_archs,
        "SM architectures the CUDA sources were compiled for");
#else
  m.attr("with_cuda") = false;
#endif
}
