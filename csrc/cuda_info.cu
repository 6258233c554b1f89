// Compiled by nvcc whenever the CUDA part of the extension is built: reports which SM
// architectures the device code was generated for, so `python -m tunecomp info` can tell
// whether this build runs natively on the GPU at hand.
#include <vector>

namespace tunecomp {

std::vector<int> cuda_compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};  // nvcc defines it as e.g. 800,900
#else
  return {};
#endif
}

}  // namespace tunecomp
