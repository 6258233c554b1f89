// The masked low-rank op and its blend with the teacher, forward and backward, as a few
// calls of the masked GEMM kernel (masked_gemm.cuh). Host code only: argument checks,
// operand views, output allocation, split-K.
//
// The includer defines TUNECOMP_KERNEL_DEVICE (the device type the tensors must be on) and
// the two functions declared below: lowrank_cuda.cu launches the kernel on the current
// stream; tests/cuda_emulator runs it on CPU threads.
//
// Per call (N tokens, x [N, in], u [out, r], v [in, r], s = sqrt(1 - alpha²)):
//   forward   T = s·(x·Vm) [N, r]                                         (s = 1 unblended)
//             y = alpha·(x·W0ᵀ + b0) + T·Umᵀ + s·b                       (one GEMM, two K segments)
//             From 64·SMs tokens on, one fused launch: each block holds its 64 tokens' T in
//             shared memory (the tokens alone fill the GPU, so no block recomputes T); below,
//             two launches, T going through device memory (a few MB: it stays in L2).
//   backward  G = s·(dy·Um) [N, r]
//             dx = alpha·(dy·W0) + G·Vmᵀ                                  (one GEMM, two K segments)
//             T = x·Vm;  dU = s·(dyᵀ·T) ⊙ Mu;  dV = (xᵀ·G) ⊙ Mv           (split over tokens)
//             db = s·Σ dy
// T and G ([N, r], in x's dtype, as eager PyTorch rounds them) are rounded to x's dtype.
// The blend folded (fold / fold_grad_x, chosen by tunecomp.ops.folding_pays):
//             W = alpha·W0 + s·Um·Vmᵀ [out, in]                            (one GEMM, W0 its addend)
//   forward   y = x·Wᵀ + (alpha·b0 + s·b)                                   (ATen: cuBLAS)
//   backward  dx = dy·W                                                     (ATen: cuBLAS)
#pragma once

#include <algorithm>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "checks.h"
#include "masked_gemm.cuh"

namespace tunecomp {
namespace cuda_ops {

using cuda_kernels::GemmParams;
using cuda_kernels::Operand;
using cuda_kernels::Segment;
using checks::check_grad_y;
using checks::check_same;
using checks::check_vector;

// Supplied by the includer.
void launch_masked_gemm(const GemmParams& params, at::ScalarType dtype, int64_t grid_z);
void launch_fused_forward(const GemmParams& t, const GemmParams& y, int64_t t_ld,
                          at::ScalarType dtype, int64_t shared_bytes);
int64_t multiprocessor_count(const at::Tensor& like);
// The most dynamic shared memory one block of the fused forward may have on like's device.
int64_t fused_shared_memory_limit(const at::Tensor& like);

constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct DtypeTag {
  using type = T;
};

// f(DtypeTag<T>{}) with T the kernels' element type for dtype.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(DtypeTag<float>{});
    case at::kHalf: return f(DtypeTag<__half>{});
    case at::kBFloat16: return f(DtypeTag<__nv_bfloat16>{});
    default:
      TORCH_CHECK_TYPE(false, "the cuda backend takes float32, float16 or bfloat16; got ", dtype);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_inputs(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& mask_u,
                         const std::optional<at::Tensor>& mask_v) {
  TORCH_CHECK_VALUE(x.device().type() == TUNECOMP_KERNEL_DEVICE, "x must be a ",
                    c10::DeviceTypeName(TUNECOMP_KERNEL_DEVICE), " tensor; got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "x must be float32, float16 or bfloat16 for the cuda backend; got ", dtype);
  checks::check_lowrank_args(x, u, v, bias, mask_u, mask_v);
  for (int64_t n : {u.size(0), v.size(0), u.size(1)}) {
    TORCH_CHECK_VALUE(ceil_div(n, cuda_kernels::kBlockN) <= kMaxGridY,
                      "out_features, in_features and rank must be at most ",
                      kMaxGridY * cuda_kernels::kBlockN, "; got u ", u.sizes(), " v ", v.sizes());
  }
}

inline void check_teacher(const at::Tensor& x, const at::Tensor& u, const at::Tensor& weight,
                          const at::Tensor& alpha) {
  check_same(weight, "teacher_weight", x, 2);
  TORCH_CHECK_VALUE(weight.size(0) == u.size(0) && weight.size(1) == x.size(1),
                    "teacher_weight must have shape (out_features, in_features) = (", u.size(0),
                    ", ", x.size(1), "); got ", weight.sizes());
  TORCH_CHECK_VALUE(alpha.device() == x.device(), "alpha must be on x's device ", x.device(),
                    "; got ", alpha.device());
  TORCH_CHECK_TYPE(alpha.scalar_type() == at::kFloat, "alpha must be a float32 tensor; got ",
                   alpha.scalar_type());
  TORCH_CHECK_VALUE(alpha.numel() == 1, "alpha must have one element; got shape ",
                    alpha.sizes());
}

// Element (i, j) = t[i, j], or t[j, i] when transposed; the mask is read the same way.
inline Operand operand(const at::Tensor& t, bool transposed = false,
                       const std::optional<at::Tensor>& mask = std::nullopt) {
  Operand op;
  op.data = t.data_ptr();
  op.stride_i = t.stride(transposed ? 1 : 0);
  op.stride_j = t.stride(transposed ? 0 : 1);
  if (mask.has_value()) {
    op.mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
    op.mask_stride_i = mask->stride(transposed ? 1 : 0);
    op.mask_stride_j = mask->stride(transposed ? 0 : 1);
  }
  return op;
}

inline void set_bias(GemmParams& p, int slot, const std::optional<at::Tensor>& bias, int scale) {
  if (!bias.has_value()) return;
  p.bias[slot] = bias->data_ptr();
  p.bias_stride[slot] = bias->stride(0);
  p.bias_scale[slot] = scale;
}

// Runs p into a new [p.m, p.n] tensor of like's dtype. split: the K of the single segment
// may be cut over blocks (grid z) when the output has too few tiles to fill the GPU; not
// with biases or an addend, which every split's partial would add again.
inline at::Tensor run(GemmParams p, const at::Tensor& like, bool split = false) {
  using cuda_kernels::kBlockK;
  const int64_t tiles = ceil_div(p.m, cuda_kernels::kBlockM) * ceil_div(p.n, cuda_kernels::kBlockN);
  int64_t k_per_split = 0;
  if (split && p.num_segments == 1 && p.bias[0] == nullptr && p.bias[1] == nullptr &&
      p.addend == nullptr && tiles > 0) {
    const int64_t sms = multiprocessor_count(like);
    const int64_t k = p.seg[0].k;
    // Aim at two blocks per SM; each split keeps at least four K tiles.
    const int64_t splits = std::min(ceil_div(2 * sms, tiles), ceil_div(k, 4 * kBlockK));
    if (tiles < sms && splits > 1) k_per_split = ceil_div(ceil_div(k, splits), kBlockK) * kBlockK;
  }
  if (k_per_split == 0) {
    at::Tensor out = at::empty({p.m, p.n}, like.options());
    p.out = out.data_ptr();
    launch_masked_gemm(p, like.scalar_type(), 1);
    return out;
  }
  const int64_t splits = ceil_div(p.seg[0].k, k_per_split);
  at::Tensor partial = at::empty({splits, p.m, p.n}, like.options().dtype(at::kFloat));
  p.out = partial.data_ptr();
  p.k_per_split = k_per_split;
  launch_masked_gemm(p, like.scalar_type(), splits);
  return partial.sum(0).to(like.scalar_type());
}

// The blend's folded weight W = alpha·W0 + s·Um·Vmᵀ [out, in], in u's dtype.
inline at::Tensor folded_weight(const at::Tensor& u, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask_u,
                                const std::optional<at::Tensor>& mask_v,
                                const at::Tensor& teacher_weight, const float* alpha_ptr) {
  GemmParams p;
  p.m = u.size(0);
  p.n = v.size(0);
  p.seg[0] = Segment{operand(u, false, mask_u), operand(v, true, mask_v), u.size(1)};
  p.scale_first = cuda_kernels::kScaleStudent;
  p.alpha = alpha_ptr;
  p.addend = teacher_weight.data_ptr();
  p.addend_stride_i = teacher_weight.stride(0);
  p.addend_stride_j = teacher_weight.stride(1);
  p.addend_scale = cuda_kernels::kScaleAlpha;
  return run(p, u);
}

// y = alpha·(x·W0ᵀ + b0) + s·(x·Vm·Umᵀ + b), or the plain op when teacher_weight is absent;
// with fold (blend only), as x·Wᵀ + (alpha·b0 + s·b) with the folded weight.
inline at::Tensor forward(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& mask_u,
                          const std::optional<at::Tensor>& mask_v,
                          const std::optional<at::Tensor>& teacher_weight,
                          const std::optional<at::Tensor>& teacher_bias,
                          const std::optional<at::Tensor>& alpha, bool fold = false) {
  check_inputs(x, u, v, bias, mask_u, mask_v);
  const bool blended = teacher_weight.has_value();
  if (blended) {
    check_teacher(x, u, *teacher_weight, *alpha);
    check_vector(teacher_bias, "teacher_bias", x, u.size(0));
  }
  const int64_t n = x.size(0), in = x.size(1), out = u.size(0), rank = u.size(1);
  if (n == 0) return at::empty({0, out}, x.options());
  const float* alpha_ptr = blended ? alpha->data_ptr<float>() : nullptr;
  if (blended && fold) {
    // s from the float32 alpha, then both rounded: in bf16, alpha = 0.9995 rounds to 1.0,
    // and s computed from that would be 0 instead of 0.032.
    const at::Tensor alpha32 = alpha->reshape({});
    const at::Tensor a = alpha32.to(x.scalar_type());
    const at::Tensor s = at::sqrt((1 - alpha32) * (1 + alpha32)).to(x.scalar_type());
    std::optional<at::Tensor> folded_bias;
    if (teacher_bias.has_value()) folded_bias = *teacher_bias * a;
    if (bias.has_value()) folded_bias = folded_bias ? *folded_bias + *bias * s : *bias * s;
    return at::linear(x, folded_weight(u, v, mask_u, mask_v, *teacher_weight, alpha_ptr),
                      folded_bias);
  }

  GemmParams pt;  // T = s·(x·Vm)
  pt.m = n;
  pt.n = rank;
  pt.seg[0] = Segment{operand(x), operand(v, false, mask_v), in};
  pt.scale_first = blended ? cuda_kernels::kScaleStudent : cuda_kernels::kScaleOne;
  pt.alpha = alpha_ptr;

  const int64_t t_ld = ceil_div(rank, cuda_kernels::kBlockN) * cuda_kernels::kBlockN + cuda_kernels::kPadAB;
  const int64_t t_bytes = cuda_kernels::kBlockM * t_ld * x.element_size();
  const bool fused = n >= cuda_kernels::kBlockM * multiprocessor_count(x) &&
                     t_bytes <= fused_shared_memory_limit(x);
  at::Tensor t;  // T in device memory, unless the fused kernel holds it in shared memory
  if (!fused) t = run(pt, x);

  GemmParams py;  // y = [alpha·(x·W0ᵀ)] + T·Umᵀ + biases
  py.m = n;
  py.n = out;
  py.alpha = alpha_ptr;
  const Segment student{fused ? Operand{} : operand(t), operand(u, true, mask_u), rank, fused};
  if (blended) {
    py.seg[0] = Segment{operand(x), operand(*teacher_weight, true), in};
    py.seg[1] = student;
    py.num_segments = 2;
    py.scale_first = cuda_kernels::kScaleAlpha;
    set_bias(py, 0, teacher_bias, cuda_kernels::kScaleAlpha);
    set_bias(py, 1, bias, cuda_kernels::kScaleStudent);
  } else {
    py.seg[0] = student;
    set_bias(py, 0, bias, cuda_kernels::kScaleOne);
  }
  if (!fused) return run(py, x);
  at::Tensor y = at::empty({n, out}, x.options());
  py.out = y.data_ptr();
  launch_fused_forward(pt, py, t_ld, x.scalar_type(), t_bytes);
  return y;
}

// {grad_x, grad_u, grad_v, grad_b} of forward (grad_b empty unless has_bias); with
// fold_grad_x (blend only), grad_x = dy·W with the folded weight.
inline std::vector<at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x,
                                        const at::Tensor& u, const at::Tensor& v,
                                        const std::optional<at::Tensor>& mask_u,
                                        const std::optional<at::Tensor>& mask_v,
                                        const std::optional<at::Tensor>& teacher_weight,
                                        const std::optional<at::Tensor>& alpha, bool has_bias,
                                        bool fold_grad_x = false) {
  check_inputs(x, u, v, std::nullopt, mask_u, mask_v);
  check_grad_y(grad_y, x, u);
  const bool blended = teacher_weight.has_value();
  if (blended) check_teacher(x, u, *teacher_weight, *alpha);
  const int64_t n = x.size(0), in = x.size(1), out = u.size(0), rank = u.size(1);
  if (n == 0) {
    return {at::empty_like(x), at::zeros_like(u), at::zeros_like(v),
            has_bias ? at::zeros({out}, u.options()) : at::empty({0}, u.options())};
  }
  const float* alpha_ptr = blended ? alpha->data_ptr<float>() : nullptr;
  const int student = blended ? cuda_kernels::kScaleStudent : cuda_kernels::kScaleOne;

  GemmParams pg;  // G = s·(dy·Um)
  pg.m = n;
  pg.n = rank;
  pg.seg[0] = Segment{operand(grad_y), operand(u, false, mask_u), out};
  pg.scale_first = student;
  pg.alpha = alpha_ptr;
  const at::Tensor g = run(pg, x);

  at::Tensor grad_x;
  if (blended && fold_grad_x) {  // dx = dy·W, W the folded weight
    grad_x = at::mm(grad_y, folded_weight(u, v, mask_u, mask_v, *teacher_weight, alpha_ptr));
  }
  GemmParams pdx;  // dx = [alpha·(dy·W0)] + G·Vmᵀ
  pdx.m = n;
  pdx.n = in;
  pdx.alpha = alpha_ptr;
  const Segment through_student{operand(g), operand(v, true, mask_v), rank};
  if (blended) {
    pdx.seg[0] = Segment{operand(grad_y), operand(*teacher_weight), out};
    pdx.seg[1] = through_student;
    pdx.num_segments = 2;
    pdx.scale_first = cuda_kernels::kScaleAlpha;
  } else {
    pdx.seg[0] = through_student;
  }
  if (!grad_x.defined()) grad_x = run(pdx, x);

  GemmParams pt;  // T = x·Vm, recomputed rather than saved by the forward
  pt.m = n;
  pt.n = rank;
  pt.seg[0] = Segment{operand(x), operand(v, false, mask_v), in};
  const at::Tensor t = run(pt, x);

  GemmParams pu;  // dU = s·(dyᵀ·T) ⊙ Mu
  pu.m = out;
  pu.n = rank;
  pu.seg[0] = Segment{operand(grad_y, true), operand(t), n};
  pu.scale_first = student;
  pu.alpha = alpha_ptr;
  if (mask_u.has_value()) {
    pu.out_mask = reinterpret_cast<const uint8_t*>(mask_u->data_ptr<bool>());
    pu.out_mask_stride_i = mask_u->stride(0);
    pu.out_mask_stride_j = mask_u->stride(1);
  }
  const at::Tensor grad_u = run(pu, x, /*split=*/true);

  GemmParams pv;  // dV = (xᵀ·G) ⊙ Mv
  pv.m = in;
  pv.n = rank;
  pv.seg[0] = Segment{operand(x, true), operand(g), n};
  if (mask_v.has_value()) {
    pv.out_mask = reinterpret_cast<const uint8_t*>(mask_v->data_ptr<bool>());
    pv.out_mask_stride_i = mask_v->stride(0);
    pv.out_mask_stride_j = mask_v->stride(1);
  }
  const at::Tensor grad_v = run(pv, x, /*split=*/true);

  at::Tensor grad_b = at::empty({0}, u.options());
  if (has_bias) {
    at::Tensor sum = grad_y.sum(0, /*keepdim=*/false, at::kFloat);
    if (blended) {
      sum = sum * at::sqrt((1.0 - *alpha) * (1.0 + *alpha)).reshape({});
    }
    grad_b = sum.to(x.scalar_type());
  }
  return {grad_x, grad_u, grad_v, grad_b};
}

}  // namespace cuda_ops
}  // namespace tunecomp
