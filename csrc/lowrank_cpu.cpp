// CPU forward of the masked low-rank op, written with ATen: the first native function of
// tunecomp._C, so that the extension's build, load and error paths are exercised from day
// one. The multithreaded, sparse-aware CPU kernels replace it in their own change.
#include "tunecomp.h"

namespace tunecomp {

namespace {

void check_factor(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D; got ", t.dim(), "-D ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ",
                   x.scalar_type(), "; got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on x's device ", x.device(),
                    "; got ", t.device());
}

at::Tensor masked(const at::Tensor& factor, const std::optional<at::Tensor>& mask,
                  const char* name) {
  if (!mask.has_value()) return factor;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, name, " must be a bool tensor; got ",
                   mask->scalar_type());
  TORCH_CHECK_VALUE(mask->sizes() == factor.sizes(), name, " must have shape ",
                    factor.sizes(), "; got ", mask->sizes());
  TORCH_CHECK_VALUE(mask->device() == factor.device(), name, " must be on ", factor.device(),
                    "; got ", mask->device());
  // where, not multiply: a NaN stored in a pruned entry must not leak (see reference.py).
  return at::where(*mask, factor, at::zeros({}, factor.options()));
}

}  // namespace

at::Tensor masked_lowrank_forward_cpu(const at::Tensor& x, const at::Tensor& u,
                                      const at::Tensor& v,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& mask_u,
                                      const std::optional<at::Tensor>& mask_v) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor; got ", x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must have a floating dtype; got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [tokens, in]; got ", x.sizes());
  check_factor(u, "u", x);
  check_factor(v, "v", x);
  TORCH_CHECK_VALUE(x.size(1) == v.size(0), "x.shape[1] (in_features) must equal v.shape[0]; got ",
                    x.size(1), " and ", v.size(0));
  TORCH_CHECK_VALUE(u.size(1) == v.size(1), "u and v must have the same rank; got ", u.size(1),
                    " and ", v.size(1));
  const at::Tensor t = at::mm(x, masked(v, mask_v, "mask_v"));
  const at::Tensor u_kept = masked(u, mask_u, "mask_u");
  if (!bias.has_value()) return at::mm(t, u_kept.t());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == u.size(0),
                    "bias must have shape (out_features,) = (", u.size(0), ",); got ",
                    bias->sizes());
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ",
                   x.scalar_type(), "; got ", bias->scalar_type());
  return at::addmm(*bias, t, u_kept.t());
}

}  // namespace tunecomp
