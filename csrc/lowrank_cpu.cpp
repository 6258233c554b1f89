// CPU kernels of the masked low-rank op, forward and backward, float32.
//
// Two paths, chosen by the caller (tunecomp/ops.py) from the factors' density:
//
// dense  : the masked factors are formed once and the chain runs as two BLAS GEMMs
//          (at::mm), the fastest way while most entries are kept.
// sparse : for high pruning ratios. Work in token-minor ("transposed") layout, where every
//          operation is an axpy or a dot product over a contiguous row of tokens:
//            xt [in, N] = xᵀ
//            tt [r, N]  : tt[j] = Σ_{k kept in V[:, j]} V[k, j]·xt[k]
//            yt [out, N]: yt[o] = b[o] + Σ_{j kept in U[o, :]} U[o, j]·tt[j]
//          so the cost is (kept entries)·N multiply-adds instead of r·(in+out)·N, and
//          pruned entries are never touched. Backward in the same layout:
//            gt [r, N]  : gt[j] = Σ_{o kept in U[:, j]} U[o, j]·dyt[o]
//            dxt[in, N] : dxt[k] = Σ_{j kept in V[k, :]} V[k, j]·gt[j]
//            dU[o, j]   = dot(dyt[o], tt[j]) for kept (o, j) only, 0 elsewhere
//            dV[k, j]   = dot(xt[k], gt[j])  for kept (k, j) only
//            db[o]      = Σ dyt[o]
//          Both passes run a chunk of tokens at a time: each chunk of x (and grad_y)
//          is transposed into a thread's buffers, the whole chain runs there, and results
//          go back token-major, so no [N, features] operand is transposed whole.
// Token chunks are spread over threads with at::parallel_for (OpenMP); the inner loops are
// compiled twice, for x86-64-v3 (AVX2 + FMA) and baseline x86-64, and picked at load time.
#include "tunecomp.h"

#include "checks.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace tunecomp {

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TUNECOMP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TUNECOMP_CLONES
#endif

// Token chunk: the rows of every operand are cut into chunks of this many tokens, and the
// chunk loop is the outer one, so the source rows' chunks a thread touches stay in its L2
// (a [768, 64] float slice is 192 KiB) while each output chunk lives in registers. The
// forward takes 32: less zero padding at ViT token counts (197 = 7 x 32 - 27 = 4 x 64 - 59)
// and a [3072, 32] slice still in L2; the backward, whose factor gradients sum a dot product
// per kept entry per chunk, takes 64. Measured on 2 cores (rank 192, 4 ViT-B shapes x 197
// and 1576 tokens, paired against 64 for both passes): the forward 1.13x faster at 10% kept
// and 1.19x at 25% (geometric means; 1.02-1.41x), a training step 1.04-1.06x; 32 in the
// backward as well measured 0.95-0.99x there.
constexpr int64_t kForwardChunk = 32;
constexpr int64_t kBackwardChunk = 64;

// Eight floats, loaded and stored unaligned. Explicit vectors: GCC left the plain-loop
// version of gather_axpy scalar (4x slower, measured), and the default clone still gets
// SSE pairs from these.
typedef float Vec8 __attribute__((vector_size(32), aligned(4), may_alias));

inline Vec8 load8(const float* p) { return *reinterpret_cast<const Vec8*>(p); }
inline void store8(float* p, Vec8 v) { *reinterpret_cast<Vec8*>(p) = v; }

// out[0:Chunk] += Σ_e value[e]·src[index[e]·Chunk : +Chunk]: every buffer the sparse path
// reads this way is a chunk of Chunk tokens (zero padded), so the output stays in Chunk/8 vector
// registers.
template <int64_t Chunk>
TUNECOMP_CLONES void gather_axpy(const float* __restrict value, const int32_t* __restrict index,
                                 int64_t count, const float* __restrict src,
                                 float* __restrict out) {
  static_assert(Chunk % 8 == 0, "a chunk is whole vectors");
  Vec8 acc[Chunk / 8];
  for (int k = 0; k < Chunk / 8; ++k) acc[k] = load8(out + 8 * k);
  for (int64_t e = 0; e < count; ++e) {
    const float a = value[e];
    const Vec8 scale = {a, a, a, a, a, a, a, a};
    const float* row = src + static_cast<int64_t>(index[e]) * Chunk;
#pragma GCC unroll 8
    for (int k = 0; k < Chunk / 8; ++k) acc[k] += scale * load8(row + 8 * k);
  }
  for (int k = 0; k < Chunk / 8; ++k) store8(out + 8 * k, acc[k]);
}

// sums[e] += dot(left[q], right[index[e]]) over a chunk, for every entry e of every group q:
// the factor gradients at kept entries, a chunk of tokens at a time (left and right hold
// Chunk-token rows). Entries are independent, so their dots overlap in the pipeline.
template <int64_t Chunk>
TUNECOMP_CLONES void accumulate_dots(const int64_t* __restrict start,
                                     const int32_t* __restrict index, int64_t groups,
                                     const float* __restrict left, const float* __restrict right,
                                     float* __restrict sums) {
  static_assert(Chunk % 16 == 0 && Chunk >= 16, "a chunk is pairs of vectors");
  for (int64_t q = 0; q < groups; ++q) {
    const float* a = left + q * Chunk;
    for (int64_t e = start[q]; e < start[q + 1]; ++e) {
      const float* b = right + static_cast<int64_t>(index[e]) * Chunk;
      Vec8 acc0 = load8(a) * load8(b), acc1 = load8(a + 8) * load8(b + 8);
#pragma GCC unroll 4
      for (int k = 16; k < Chunk; k += 16) {
        acc0 += load8(a + k) * load8(b + k);
        acc1 += load8(a + k + 8) * load8(b + k + 8);
      }
      acc0 += acc1;
      float total = 0;
      for (int l = 0; l < 8; ++l) total += acc0[l];
      sums[e] += total;
    }
  }
}

// The kept entries of a masked [rows, cols] matrix, grouped by row (by_row) or by column:
// group g lists (index along the other dim, value) at [start[g], start[g+1]). The raw
// pointers are read once here: data_ptr<T>() checks the dtype on every call, and the hot
// loops index these per group and per token chunk (reading them there cost the sparse
// forward about 10%: ViT-B fc1, 1576 tokens, rank 192, 5-20% kept, one thread).
struct Groups {
  Groups(at::Tensor start_, at::Tensor index_, at::Tensor value_)
      : start(std::move(start_)), index(std::move(index_)), value(std::move(value_)),
        starts(start.data_ptr<int64_t>()), indices(index.data_ptr<int32_t>()),
        values(value.data_ptr<float>()), groups(start.numel() - 1) {}
  at::Tensor start;  // int64 [groups + 1]
  at::Tensor index;  // int32 [kept]
  at::Tensor value;  // float [kept]
  const int64_t* starts;
  const int32_t* indices;
  const float* values;
  int64_t groups;
};

Groups kept_entries(const at::Tensor& w, const std::optional<at::Tensor>& mask, bool by_row) {
  // Two passes over the factor, no temporaries beyond a cursor per group: count the kept
  // entries of each group, then place each at its group's cursor (in index order within a
  // group). Temporaries would be freed at once, but the heap keeps them: packing a ViT-B
  // through nonzero()/masked_select() left ~3x the packed bytes resident.
  // Neither pass branches on the mask (a mask pruned at random mispredicts a branch on a
  // large share of its entries): counts add the mask's bytes, and every entry is written at
  // its group's cursor, which advances by the mask's byte; a pruned entry's write is
  // overwritten by the group's next kept one, and none is written once the group is full.
  const at::Tensor wc = w.contiguous();
  const at::Tensor mc = mask.has_value() ? mask->contiguous() : at::Tensor();
  const int64_t rows = wc.size(0), cols = wc.size(1), groups = by_row ? rows : cols;
  const float* wp = wc.data_ptr<float>();
  // The mask's bytes. A bool tensor may hold bytes other than 0 and 1 (a uint8 buffer viewed as
  // bool): every nonzero byte counts as kept, as torch and the other backends read it.
  const uint8_t* mp =
      mask.has_value() ? reinterpret_cast<const uint8_t*>(mc.data_ptr<bool>()) : nullptr;
  at::Tensor start = at::zeros({groups + 1}, wc.options().dtype(at::kLong));
  int64_t* sp = start.data_ptr<int64_t>();
  if (!mp) {
    for (int64_t g = 0; g < groups; ++g) sp[g + 1] = by_row ? cols : rows;
  } else if (by_row) {
    for (int64_t r = 0; r < rows; ++r) {
      int64_t count = 0;
      for (int64_t c = 0; c < cols; ++c) count += mp[r * cols + c] != 0;
      sp[r + 1] = count;
    }
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) sp[c + 1] += mp[r * cols + c] != 0;
  }
  for (int64_t g = 0; g < groups; ++g) sp[g + 1] += sp[g];
  at::Tensor index = at::empty({sp[groups]}, wc.options().dtype(at::kInt));
  at::Tensor value = at::empty({sp[groups]}, wc.options());
  int32_t* ip = index.data_ptr<int32_t>();
  float* vp = value.data_ptr<float>();
  if (by_row) {  // the cursor stays in a register along the row
    for (int64_t r = 0; r < rows; ++r) {
      int64_t e = sp[r];
      for (int64_t c = 0; c < cols; ++c) {
        if (e < sp[r + 1]) {  // the group is not full yet
          ip[e] = static_cast<int32_t>(c);
          vp[e] = wp[r * cols + c];
        }
        e += mp ? mp[r * cols + c] != 0 : 1;
      }
    }
  } else {
    std::vector<int64_t> cursor(sp, sp + groups);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t e = cursor[c];
        if (e < sp[c + 1]) {
          ip[e] = static_cast<int32_t>(r);
          vp[e] = wp[r * cols + c];
        }
        cursor[c] = e + (mp ? mp[r * cols + c] != 0 : 1);
      }
  }
  return Groups(start, index, value);
}

// The four groupings the sparse path uses, in the order of pack_groups_cpu's result: the
// forward needs the first two, the backward the first, third and fourth.
enum Slot { kVByCol = 0, kUByRow = 1, kUByCol = 2, kVByRow = 3 };

// A grouping handed in by the caller, checked before any index is used: `groups` groups of
// entries whose indices lie in [0, limit). O(groups + entries), against the
// O(entries · tokens) of the products that use it.
Groups checked_groups(const at::Tensor& start, const at::Tensor& index, const at::Tensor& value,
                      int64_t groups, int64_t limit, const char* name) {
  TORCH_CHECK_VALUE(start.device().is_cpu() && index.device().is_cpu() && value.device().is_cpu(),
                    name, " must be CPU tensors; got (", start.device(), ", ", index.device(), ", ",
                    value.device(), ")");
  TORCH_CHECK_TYPE(start.scalar_type() == at::kLong && index.scalar_type() == at::kInt &&
                       value.scalar_type() == at::kFloat,
                   name, " must be (int64 starts, int32 indices, float32 values); got (",
                   start.scalar_type(), ", ", index.scalar_type(), ", ", value.scalar_type(), ")");
  TORCH_CHECK_VALUE(start.dim() == 1 && index.dim() == 1 && value.dim() == 1 &&
                        start.is_contiguous() && index.is_contiguous() && value.is_contiguous(),
                    name, " must be contiguous 1-D tensors; got sizes (", start.sizes(), ", ",
                    index.sizes(), ", ", value.sizes(), ") and strides (", start.strides(), ", ",
                    index.strides(), ", ", value.strides(), ")");
  TORCH_CHECK_VALUE(start.numel() == groups + 1, name, " must have ", groups + 1,
                    " starts (one per group, plus the end); got ", start.numel());
  TORCH_CHECK_VALUE(index.numel() == value.numel(), name, " must have as many indices as values; got ",
                    index.numel(), " and ", value.numel());
  const int64_t* s = start.data_ptr<int64_t>();
  bool ordered = s[0] == 0 && s[groups] == index.numel();
  for (int64_t g = 0; g < groups && ordered; ++g) ordered = s[g] <= s[g + 1];
  TORCH_CHECK_VALUE(ordered, name, " starts must rise from 0 to the number of entries (",
                    index.numel(), ")");
  const int32_t* i = index.data_ptr<int32_t>();
  const auto [low, high] = std::minmax_element(i, i + index.numel());
  TORCH_CHECK_VALUE(index.numel() == 0 || (*low >= 0 && *high < limit), name,
                    " indices must lie in [0, ", limit, "); got [", index.numel() ? *low : 0, ", ",
                    index.numel() ? *high : 0, "]");
  return Groups(start, index, value);
}

// Grouping `slot` from `packed` (three tensors per slot, from pack_groups_cpu) when given,
// else built now from the factor and its mask.
Groups grouping(const std::optional<std::vector<at::Tensor>>& packed, Slot slot,
                const at::Tensor& w, const std::optional<at::Tensor>& mask, bool by_row) {
  if (!packed.has_value()) return kept_entries(w, mask, by_row);
  TORCH_CHECK_VALUE(packed->size() == 12 || packed->size() == 6,
                    "packed must hold the 6 or 12 tensors of pack_groups_cpu; got ",
                    packed->size());
  TORCH_CHECK_VALUE(3 * slot + 3 <= static_cast<int>(packed->size()),
                    "packed holds the forward groupings only: pack with backward=True for the "
                    "sparse backward");
  return checked_groups((*packed)[3 * slot], (*packed)[3 * slot + 1], (*packed)[3 * slot + 2],
                        by_row ? w.size(0) : w.size(1), by_row ? w.size(1) : w.size(0),
                        "packed does not match these factors (pack them again):");
}

// out[i] = keep[i] ? w[i] : +0.0, as a bit mask: no branch to mispredict on a mask that is
// half kept at random, and a NaN in a pruned entry still never leaks. keep: the mask's bytes,
// any nonzero one kept (read as bytes: a bool holding another value than 0 or 1 is undefined).
TUNECOMP_CLONES void select_kept(const float* __restrict w, const uint8_t* __restrict keep,
                                 float* __restrict out, int64_t n) {
  typedef uint32_t __attribute__((may_alias)) Bits;  // float storage read as its bits
  const Bits* __restrict bits = reinterpret_cast<const Bits*>(w);
  Bits* __restrict out_bits = reinterpret_cast<Bits*>(out);
  for (int64_t i = 0; i < n; ++i) out_bits[i] = bits[i] & (0u - static_cast<uint32_t>(keep[i] != 0));
}

at::Tensor masked(const at::Tensor& factor, const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return factor;
  // Select, not multiply: a NaN stored in a pruned entry must not leak (see reference.py).
  // A plain loop: at::where measured 3.5x slower than this here (1.2 ms for 3072x192).
  const at::Tensor w = factor.contiguous(), keep = mask->contiguous();
  at::Tensor out = at::empty_like(w);
  const float* wp = w.data_ptr<float>();
  const uint8_t* kp = reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    select_kept(wp + begin, kp + begin, op + begin, end - begin);
  });
  return out;
}

// x on the CPU in float32 and every other argument like it (checks.h).
void check_inputs(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                  const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& mask_u,
                  const std::optional<at::Tensor>& mask_v) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor; got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float32 for the cpu backend; got ",
                   x.scalar_type());
  checks::check_lowrank_args(x, u, v, bias, mask_u, mask_v);
}

// The sparse path works on chunks of Chunk tokens, each in buffers that stay in a thread's
// L2: the operands' chunks transposed to [features, Chunk] rows (a [768, 64] float slice is
// 192 KiB), and results written back transposed. Transposes go through blocks of kBlock
// features: whole cache lines on the strided side (one feature at a time, every store hit
// the same L1 set: rows are 4 KiB multiples apart for ViT widths).
constexpr int64_t kBlock = 16;
// The transpose in reads its Chunk rows side by side, one cache line of each per block:
// more streams than the hardware prefetcher follows, so each row's line kPrefetch floats
// ahead is prefetched by hand. With the zero fill left to a short last chunk, measured on 2
// cores (sparse forward, 1576 tokens, rank 192, 10% kept, paired with the previous code in
// one process): 1.24x faster at 3072->768, 1.09x at 768->768, 1.06x at 768->3072.
constexpr int64_t kPrefetch = 32;

// buf[k·Chunk + i] = src[(n0 + i)·width + k] for i < len, 0 for len <= i < Chunk.
template <int64_t Chunk>
void load_transposed(const float* src, int64_t width, int64_t n0, int64_t len, float* buf) {
  if (len < Chunk) std::fill(buf, buf + width * Chunk, 0.0f);  // a short last chunk
  for (int64_t k0 = 0; k0 < width; k0 += kBlock) {
    const int64_t kn = std::min(kBlock, width - k0);
    for (int64_t i = 0; i < len; ++i) {
      const float* row = src + (n0 + i) * width;
      if (k0 + kPrefetch < width) __builtin_prefetch(row + k0 + kPrefetch);
      for (int64_t k = k0; k < k0 + kn; ++k) buf[k * Chunk + i] = row[k];
    }
  }
}

// dst[(n0 + i)·width + k] = buf[k·Chunk + i] for i < len: load_transposed's inverse.
template <int64_t Chunk>
void store_transposed(const float* buf, int64_t width, int64_t n0, int64_t len, float* dst) {
  for (int64_t k0 = 0; k0 < width; k0 += kBlock) {
    const int64_t kn = std::min(kBlock, width - k0);
    for (int64_t i = 0; i < len; ++i)
      for (int64_t k = k0; k < k0 + kn; ++k) dst[(n0 + i) * width + k] = buf[k * Chunk + i];
  }
}

// dst[q] = Σ_{(j, a) in group q} a·src[j] for every group q, on Chunk-token rows.
template <int64_t Chunk>
void grouped_rows(const Groups& g, const float* src, float* dst) {
  std::fill(dst, dst + g.groups * Chunk, 0.0f);
  for (int64_t q = 0; q < g.groups; ++q)
    gather_axpy<Chunk>(g.values + g.starts[q], g.indices + g.starts[q],
                       g.starts[q + 1] - g.starts[q], src, dst + q * Chunk);
}

// dst[(n0 + i)·g.groups + q] = (bias[q] or 0) + Σ_{(j, a) in group q} a·src[j][i] for i < len:
// grouped_rows written straight back to token-major rows, kBlock groups at a time through
// `block` ([kBlock, Chunk]; the chunk's len rows of dst are len cache lines, filled in turn).
template <int64_t Chunk>
void store_grouped(const Groups& g, const float* src, const float* bias, float* dst,
                   int64_t n0, int64_t len, float* block) {
  const int64_t width = g.groups;
  for (int64_t q0 = 0; q0 < width; q0 += kBlock) {
    const int64_t qn = std::min(kBlock, width - q0);
    for (int64_t b = 0; b < qn; ++b) {
      const int64_t q = q0 + b;
      float* acc = block + b * Chunk;
      std::fill(acc, acc + Chunk, bias ? bias[q] : 0.0f);
      gather_axpy<Chunk>(g.values + g.starts[q], g.indices + g.starts[q],
                         g.starts[q + 1] - g.starts[q], src, acc);
    }
    for (int64_t i = 0; i < len; ++i)
      for (int64_t b = 0; b < qn; ++b) dst[(n0 + i) * width + q0 + b] = block[b * Chunk + i];
  }
}

// The sparse forward from the groupings of V's kept entries by rank component (gv) and of
// U's by output (gu). Per chunk: xt = x's chunk transposed, tt[j] = Σ V[k, j]·xt[k],
// y = b + Σ U[o, j]·tt[j]. With tp, T = x·Vm [N, r] is also written there, for the backward.
at::Tensor sparse_forward(const at::Tensor& x, const Groups& gv, const Groups& gu,
                          const std::optional<at::Tensor>& bias, float* tp = nullptr) {
  const int64_t n = x.size(0), in = x.size(1), out = gu.groups, rank = gv.groups;
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({n, out}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* bp = bias.has_value() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  constexpr int64_t C = kForwardChunk;
  at::parallel_for(0, (n + C - 1) / C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xt(in * C), tt(rank * C), block(kBlock * C);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t n0 = c * C, len = std::min(C, n - n0);
      load_transposed<C>(xp, in, n0, len, xt.data());
      grouped_rows<C>(gv, xt.data(), tt.data());
      if (tp) store_transposed<C>(tt.data(), rank, n0, len, tp);
      store_grouped<C>(gu, tt.data(), bp, yp, n0, len, block.data());
    }
  });
  return y;
}

// The sparse backward, in one pass over the tokens with the forward's chunks. Per chunk:
//   xt, dyt : x's and grad_y's chunks transposed
//   tt[j] = Σ_{k kept in V[:, j]} V[k, j]·xt[k]     (the forward's T again, by gv; or
//                                                    read from tp, the forward's T [N, r])
//   gt[j] = Σ_{o kept in U[:, j]} U[o, j]·dyt[o]    (by gu_col)
//   dx    = Σ_{j kept in V[k, :]} V[k, j]·gt[j]     (by gv_row, written back token-major)
// and the chunk's share of dU[o, j] = dyt[o]·tt[j] and dV[k, j] = xt[k]·gt[j], at kept
// entries only, in one sum per kept entry (in gu_row's and gv_row's entry order). So no
// [N, features] operand is ever transposed whole, and no [r, N] intermediate is stored.
// Each of P slices of the chunks (P = threads) sums its own shares; the slices' sums are
// added in slice order, so the result does not depend on the scheduling.
std::vector<at::Tensor> sparse_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                        const Groups& gv, const Groups& gu_row,
                                        const Groups& gu_col, const Groups& gv_row,
                                        const float* tp) {
  const int64_t n = x.size(0), in = x.size(1), out = gu_row.groups, rank = gv.groups;
  const at::Tensor xc = x.contiguous(), dyc = grad_y.contiguous();
  const float* xp = xc.data_ptr<float>();
  const float* dyp = dyc.data_ptr<float>();
  at::Tensor dx = at::empty({n, in}, x.options());
  float* dxp = dx.data_ptr<float>();
  const int64_t kept_u = gu_row.index.numel(), kept_v = gv_row.index.numel();
  constexpr int64_t C = kBackwardChunk;
  const int64_t chunks = (n + C - 1) / C;
  const int64_t slices = std::min<int64_t>(chunks, at::get_num_threads());
  std::vector<std::vector<float>> sums(slices);  // per slice: dU's kept entries, then dV's
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xt(in * C), dyt(out * C), tt(rank * C), gt(rank * C), block(kBlock * C);
    for (int64_t s = begin; s < end; ++s) {
      sums[s].assign(kept_u + kept_v, 0.0f);
      for (int64_t c = s * chunks / slices; c < (s + 1) * chunks / slices; ++c) {
        const int64_t n0 = c * C, len = std::min(C, n - n0);
        load_transposed<C>(xp, in, n0, len, xt.data());
        load_transposed<C>(dyp, out, n0, len, dyt.data());
        if (tp)
          load_transposed<C>(tp, rank, n0, len, tt.data());
        else
          grouped_rows<C>(gv, xt.data(), tt.data());
        grouped_rows<C>(gu_col, dyt.data(), gt.data());
        accumulate_dots<C>(gu_row.starts, gu_row.indices, gu_row.groups, dyt.data(), tt.data(),
                        sums[s].data());
        accumulate_dots<C>(gv_row.starts, gv_row.indices, gv_row.groups, xt.data(), gt.data(),
                        sums[s].data() + kept_u);
        store_grouped<C>(gv_row, gt.data(), nullptr, dxp, n0, len, block.data());
      }
    }
  });
  // Scatter the kept entries' sums into the gradients: pruned entries stay exactly 0.
  auto scatter = [&](const Groups& g, int64_t offset) {
    at::Tensor grad = at::zeros({g.groups, rank}, x.options());
    float* gp = grad.data_ptr<float>();
    for (int64_t q = 0; q < g.groups; ++q)
      for (int64_t e = g.starts[q]; e < g.starts[q + 1]; ++e) {
        float total = 0;
        for (int64_t s = 0; s < slices; ++s) total += sums[s][offset + e];
        gp[q * rank + g.indices[e]] = total;
      }
    return grad;
  };
  return {dx, scatter(gu_row, 0), scatter(gv_row, kept_u)};
}

}  // namespace

at::Tensor lowrank_forward_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& mask_u,
                               const std::optional<at::Tensor>& mask_v, bool sparse,
                               const std::optional<std::vector<at::Tensor>>& packed) {
  if (!sparse)
    return lowrank_forward_with_t_cpu(x, u, v, bias, mask_u, mask_v, false, std::nullopt)[0];
  check_inputs(x, u, v, bias, mask_u, mask_v);
  return sparse_forward(x, grouping(packed, kVByCol, v, mask_v, false),  // per rank j: kept k
                        grouping(packed, kUByRow, u, mask_u, true), bias);  // per output o: kept j
}

std::vector<at::Tensor> lowrank_forward_with_t_cpu(const at::Tensor& x, const at::Tensor& u,
                                                   const at::Tensor& v,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& mask_u,
                                                   const std::optional<at::Tensor>& mask_v,
                                                   bool sparse,
                                                   const std::optional<std::vector<at::Tensor>>&
                                                       packed) {
  check_inputs(x, u, v, bias, mask_u, mask_v);
  if (sparse) {
    at::Tensor t = at::empty({x.size(0), u.size(1)}, x.options());
    at::Tensor y = sparse_forward(x, grouping(packed, kVByCol, v, mask_v, false),
                                  grouping(packed, kUByRow, u, mask_u, true), bias,
                                  t.data_ptr<float>());
    return {y, t};
  }
  const at::Tensor t = at::mm(x, masked(v, mask_v));
  const at::Tensor u_kept = masked(u, mask_u);
  return {bias.has_value() ? at::addmm(*bias, t, u_kept.t()) : at::mm(t, u_kept.t()), t};
}

at::Tensor lowrank_forward_packed_cpu(const at::Tensor& x, const std::vector<at::Tensor>& packed,
                                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor; got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float32; got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [tokens, in]; got ", x.sizes());
  TORCH_CHECK_VALUE(packed.size() == 6,
                    "packed must hold the 6 tensors of pack_groups_cpu(backward=False); got ",
                    packed.size());
  // V's groups: one per rank component j, indices along in; U's: one per output, along r.
  const int64_t rank = packed[0].numel() - 1, out = packed[3].numel() - 1;
  TORCH_CHECK_VALUE(rank >= 0 && out >= 0, "packed starts must hold rank + 1 and out_features + 1 "
                    "entries; got ", packed[0].numel(), " and ", packed[3].numel());
  const Groups gv = checked_groups(packed[0], packed[1], packed[2], rank, x.size(1),
                                   "packed V (starts, indices, values):");
  const Groups gu = checked_groups(packed[3], packed[4], packed[5], out, rank,
                                   "packed U (starts, indices, values):");
  checks::check_vector(bias, "bias", x, out);
  return sparse_forward(x, gv, gu, bias);
}

std::vector<at::Tensor> lowrank_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                             const at::Tensor& u, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask_u,
                                             const std::optional<at::Tensor>& mask_v,
                                             bool has_bias, bool sparse,
                                             const std::optional<std::vector<at::Tensor>>& packed,
                                             const std::optional<at::Tensor>& saved_t) {
  check_inputs(x, u, v, std::nullopt, mask_u, mask_v);
  checks::check_grad_y(grad_y, x, u);
  if (saved_t.has_value()) {
    checks::check_same(*saved_t, "t", x, 2);
    TORCH_CHECK_VALUE(saved_t->size(0) == x.size(0) && saved_t->size(1) == u.size(1),
                      "t must have shape (tokens, rank) = (", x.size(0), ", ", u.size(1),
                      "); got ", saved_t->sizes());
  }
  const at::Tensor grad_b = has_bias ? grad_y.sum(0) : at::empty({0}, x.options());
  if (!sparse) {
    const at::Tensor u_m = masked(u, mask_u), v_m = masked(v, mask_v);
    const at::Tensor t = saved_t.has_value() ? *saved_t : at::mm(x, v_m);
    const at::Tensor g = at::mm(grad_y, u_m);
    return {at::mm(g, v_m.t()), masked(at::mm(grad_y.t(), t), mask_u),
            masked(at::mm(x.t(), g), mask_v), grad_b};
  }
  const at::Tensor tc = saved_t.has_value() ? saved_t->contiguous() : at::Tensor();
  std::vector<at::Tensor> grads =
      sparse_backward(grad_y, x, grouping(packed, kVByCol, v, mask_v, false),
                      grouping(packed, kUByRow, u, mask_u, true),
                      grouping(packed, kUByCol, u, mask_u, false),
                      grouping(packed, kVByRow, v, mask_v, true),
                      saved_t.has_value() ? tc.data_ptr<float>() : nullptr);
  grads.push_back(grad_b);
  return grads;
}

}  // namespace tunecomp

namespace tunecomp {

namespace {

void check_factors(const at::Tensor& u, const at::Tensor& v) {
  TORCH_CHECK_TYPE(u.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                   "u and v must be float32; got ", u.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK_VALUE(u.device().is_cpu() && v.device().is_cpu(), "u and v must be CPU tensors; got ",
                    u.device(), " and ", v.device());
  TORCH_CHECK_VALUE(u.dim() == 2 && v.dim() == 2 && u.size(1) == v.size(1),
                    "u and v must be 2-D [out, r] and [in, r] of the same rank; got ", u.sizes(),
                    " and ", v.sizes());
  // int32 indices: every dim must fit
  TORCH_CHECK_VALUE(std::max({u.size(0), v.size(0), u.size(1)}) <= INT32_MAX,
                    "u and v dims must fit int32 indices; got ", u.sizes(), " and ", v.sizes());
}

bool of_u(Slot slot) { return slot == kUByRow || slot == kUByCol; }
bool by_row(Slot slot) { return slot == kUByRow || slot == kVByRow; }

}  // namespace

std::vector<at::Tensor> pack_groups_cpu(const at::Tensor& u, const at::Tensor& v,
                                        const std::optional<at::Tensor>& mask_u,
                                        const std::optional<at::Tensor>& mask_v, bool backward) {
  check_factors(u, v);
  checks::check_mask(mask_u, u, "mask_u");
  checks::check_mask(mask_v, v, "mask_v");
  // in the order of enum Slot; the groupings are independent, so threads build them apart
  const int64_t count = backward ? 4 : 2;
  std::vector<at::Tensor> packed(3 * count);
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const Slot slot = static_cast<Slot>(s);
      const Groups g = kept_entries(of_u(slot) ? u : v, of_u(slot) ? mask_u : mask_v, by_row(slot));
      packed[3 * s] = g.start;
      packed[3 * s + 1] = g.index;
      packed[3 * s + 2] = g.value;
    }
  });
  return packed;
}

std::vector<at::Tensor> pack_values_cpu(const at::Tensor& u, const at::Tensor& v,
                                        const std::vector<at::Tensor>& packed) {
  check_factors(u, v);
  TORCH_CHECK_VALUE(packed.size() == 12 || packed.size() == 6,
                    "packed must hold the 6 or 12 tensors of pack_groups_cpu; got ", packed.size());
  const at::Tensor uc = u.contiguous(), vc = v.contiguous();
  // every grouping checked against these factors before any index is used
  std::vector<Groups> groups;
  for (int64_t s = 0; s < static_cast<int64_t>(packed.size()) / 3; ++s) {
    const Slot slot = static_cast<Slot>(s);
    groups.push_back(grouping(packed, slot, of_u(slot) ? uc : vc, std::nullopt, by_row(slot)));
  }
  std::vector<at::Tensor> fresh(packed);
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const Slot slot = static_cast<Slot>(s);
      const Groups& g = groups[s];
      const at::Tensor& w = of_u(slot) ? uc : vc;
      const float* wp = w.data_ptr<float>();
      const int64_t cols = w.size(1);
      at::Tensor value = at::empty_like(g.value);
      float* vp = value.data_ptr<float>();
      for (int64_t q = 0; q < g.groups; ++q)
        for (int64_t e = g.starts[q]; e < g.starts[q + 1]; ++e)
          vp[e] = by_row(slot) ? wp[q * cols + g.indices[e]] : wp[g.indices[e] * cols + q];
      fresh[3 * s + 2] = value;
    }
  });
  return fresh;
}

}  // namespace tunecomp
