// Argument checks shared by the native backends (CPU and CUDA): every failure is a Python
// ValueError/TypeError naming the argument, the expected and the actual. Each backend checks
// x's device and dtype itself first; these check the rest against x.
#pragma once

#include <optional>

#include <ATen/ATen.h>

namespace tunecomp {
namespace checks {

// t on x's device, in x's dtype, with `dim` dims.
inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on x's device ", x.device(),
                    "; got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ",
                   x.scalar_type(), "; got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D; got ", t.dim(), "-D ",
                    t.sizes());
}

inline void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& factor,
                       const char* name) {
  if (!mask.has_value()) return;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, name, " must be a bool tensor; got ",
                   mask->scalar_type());
  TORCH_CHECK_VALUE(mask->sizes() == factor.sizes(), name, " must have shape ",
                    factor.sizes(), "; got ", mask->sizes());
  TORCH_CHECK_VALUE(mask->device() == factor.device(), name, " must be on its factor's device ",
                    factor.device(), "; got ", mask->device());
}

// An optional [size] vector (a bias) like x.
inline void check_vector(const std::optional<at::Tensor>& t, const char* name,
                         const at::Tensor& x, int64_t size) {
  if (!t.has_value()) return;
  check_same(*t, name, x, 1);
  TORCH_CHECK_VALUE(t->size(0) == size, name, " must have shape (out_features,) = (", size,
                    ",); got ", t->sizes());
}

// x [N, in], u [out, r], v [in, r], r >= 1, masks of the factors' shapes, bias [out].
inline void check_lowrank_args(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& mask_u,
                               const std::optional<at::Tensor>& mask_v) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [tokens, in]; got ", x.sizes());
  check_same(u, "u", x, 2);
  check_same(v, "v", x, 2);
  TORCH_CHECK_VALUE(x.size(1) == v.size(0),
                    "x.shape[1] (in_features) must equal v.shape[0]; got ", x.size(1), " and ",
                    v.size(0));
  TORCH_CHECK_VALUE(u.size(1) == v.size(1), "u and v must have the same rank; got ", u.size(1),
                    " and ", v.size(1));
  TORCH_CHECK_VALUE(u.size(1) >= 1, "rank must be at least 1; got u ", u.sizes());
  check_mask(mask_u, u, "mask_u");
  check_mask(mask_v, v, "mask_v");
  check_vector(bias, "bias", x, u.size(0));
}

inline void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u) {
  check_same(grad_y, "grad_y", x, 2);
  TORCH_CHECK_VALUE(grad_y.size(0) == x.size(0) && grad_y.size(1) == u.size(0),
                    "grad_y must have shape (tokens, out_features) = (", x.size(0), ", ",
                    u.size(0), "); got ", grad_y.sizes());
}

}  // namespace checks
}  // namespace tunecomp
