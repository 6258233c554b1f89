// Python bindings of tunecomp._C: the only file that includes pybind11.
#include <torch/extension.h>

#include "tunecomp.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tunecomp native kernels";
  // Every kernel lets go of the GIL while it runs, as torch's own ops do, so that other Python
  // threads (a server's request handling, a progress bar) run meanwhile. The arguments are
  // converted before and the results after, with the GIL held.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("lowrank_forward_cpu", &tunecomp::lowrank_forward_cpu, no_gil,
        "y = x @ where(mask_v, v, 0) @ where(mask_u, u, 0).T + bias, x [N, in] float32 on the CPU",
        py::arg("x"), py::arg("u"), py::arg("v"), py::arg("bias") = py::none(),
        py::arg("mask_u") = py::none(), py::arg("mask_v") = py::none(), py::arg("sparse") = false,
        py::arg("packed") = py::none());
  m.def("lowrank_forward_with_t_cpu", &tunecomp::lowrank_forward_with_t_cpu, no_gil,
        "[y, t]: lowrank_forward_cpu's y and t = x @ where(mask_v, v, 0), which "
        "lowrank_backward_cpu takes", py::arg("x"), py::arg("u"), py::arg("v"),
        py::arg("bias") = py::none(), py::arg("mask_u") = py::none(),
        py::arg("mask_v") = py::none(), py::arg("sparse") = false, py::arg("packed") = py::none());
  m.def("pack_groups_cpu", &tunecomp::pack_groups_cpu, no_gil,
        "the factors' kept entries grouped for the sparse forward (6 tensors) and, with "
        "backward=True, also for the sparse backward (12 tensors)",
        py::arg("u"), py::arg("v"), py::arg("mask_u") = py::none(), py::arg("mask_v") = py::none(),
        py::arg("backward") = true);
  m.def("pack_values_cpu", &tunecomp::pack_values_cpu, no_gil,
        "pack_groups_cpu's result with the values read again from u and v (the same kept "
        "entries)", py::arg("u"), py::arg("v"), py::arg("packed"));
  m.def("lowrank_forward_packed_cpu", &tunecomp::lowrank_forward_packed_cpu, no_gil,
        "lowrank_forward_cpu's sparse path from the kept entries alone: packed is "
        "pack_groups_cpu(..., backward=False)", py::arg("x"), py::arg("packed"),
        py::arg("bias") = py::none());
  m.def("lowrank_backward_cpu", &tunecomp::lowrank_backward_cpu, no_gil,
        "[grad_x, grad_u, grad_v, grad_b] of lowrank_forward_cpu", py::arg("grad_y"), py::arg("x"),
        py::arg("u"), py::arg("v"), py::arg("mask_u") = py::none(), py::arg("mask_v") = py::none(),
        py::arg("has_bias") = true, py::arg("sparse") = false, py::arg("packed") = py::none(),
        py::arg("t") = py::none());
#ifdef TUNECOMP_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_compiled_archs", &tunecomp::cuda_compiled_archs,
        "SM architectures the CUDA sources were compiled for");
  m.def("lowrank_forward_cuda", &tunecomp::lowrank_forward_cuda, no_gil,
        "y = x @ where(mask_v, v, 0) @ where(mask_u, u, 0).T + bias on CUDA tensors",
        py::arg("x"), py::arg("u"), py::arg("v"), py::arg("bias") = py::none(),
        py::arg("mask_u") = py::none(), py::arg("mask_v") = py::none());
  m.def("lowrank_backward_cuda", &tunecomp::lowrank_backward_cuda, no_gil,
        "[grad_x, grad_u, grad_v, grad_b] of lowrank_forward_cuda", py::arg("grad_y"),
        py::arg("x"), py::arg("u"), py::arg("v"), py::arg("mask_u") = py::none(),
        py::arg("mask_v") = py::none(), py::arg("has_bias") = true);
  m.def("blended_forward_cuda", &tunecomp::blended_forward_cuda, no_gil,
        "alpha*(x @ W0.T + b0) + sqrt(1-alpha^2)*lowrank_forward_cuda(...) on CUDA tensors",
        py::arg("x"), py::arg("u"), py::arg("v"), py::arg("bias"), py::arg("mask_u"),
        py::arg("mask_v"), py::arg("teacher_weight"), py::arg("teacher_bias"), py::arg("alpha"),
        py::arg("fold") = false);
  m.def("blended_backward_cuda", &tunecomp::blended_backward_cuda, no_gil,
        "[grad_x, grad_u, grad_v, grad_b] of blended_forward_cuda", py::arg("grad_y"),
        py::arg("x"), py::arg("u"), py::arg("v"), py::arg("mask_u"), py::arg("mask_v"),
        py::arg("teacher_weight"), py::arg("alpha"), py::arg("has_bias") = true,
        py::arg("fold_grad_x") = false);
#else
  m.attr("with_cuda") = false;
#endif
}
