// The GPU kernels behind the "cuda" backend: a tiled GEMM whose operands are read through
// strides (so transposes are free) with optional masks applied on load, over up to two
// K segments, with a fused epilogue; and the fused forward built from the same mainloop
// (fused_lowrank_forward_kernel, at the end).
//
//   C[M, N] = scale_first · (A0 · B0)  +  A1 · B1          (the second segment is optional)
//           + scale(bias0) · bias0[n]  +  scale(bias1) · bias1[n]
//           + scale(addend) · addend[m, n]                     (optional)
//   C[m, n] = 0 where out_mask[m, n] is false
//
// where an operand element (i, j) is data[i·stride_i + j·stride_j], or 0 where its mask is
// false (a select, not a multiply: a NaN in a pruned entry never reaches the sum). The scales
// are 1, alpha or sqrt(1 - alpha²), with alpha read from device memory by every block, so
// a new alpha neither needs a host sync nor invalidates a captured CUDA graph.
// Every product of the masked low-rank op and its blend is one such GEMM (lowrank_cuda_ops.h).
//
// Tiles are 64 x 64 x 32, four warps. fp16 and bf16 multiply on tensor cores (wmma 16x16x16,
// fp32 accumulation); fp32 runs on the FMA units in fp32 (IEEE, like torch's default matmul
// precision "highest"). Global loads are 16-byte runs along each operand's unit-stride dim
// where alignment allows, copied asynchronously into a ring of shared-memory stages (cp.async):
// kStages - 1 K tiles are in flight while the tensor cores multiply an earlier one, and the
// masks, copied beside the tiles, are applied in shared memory once a stage has landed (see
// mainloop). The problem's edges and odd strides are loaded synchronously, masked on load.
// Operands whose unit stride runs down the tile's columns are staged transposed
// (StageTiles). The accumulator goes through shared memory for the epilogue, so every output
// element is written by one thread with plain bounds checks.
// Split-K (the factor gradients, whose K is the token count) writes fp32 partial tiles
// [splits, M, N] that the host sums.
//
// This header is also compiled on the CPU by tests/cuda_emulator, which supplies stand-ins
// for the CUDA built-ins and wmma, to test the indexing without a GPU.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef TUNECOMP_EMULATE_CUDA
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "tunecomp's CUDA kernels need sm_80 or newer (bf16 tensor cores): set TUNECOMP_CUDA_ARCHS"
#endif
#endif

namespace tunecomp {
namespace cuda_kernels {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kBlockK = 32;
constexpr int kThreads = 128;  // four warps, 2 x 2 over the 64 x 64 output tile
// Row padding of the shared tiles: wmma needs row strides that are multiples of 16 bytes,
// and the shift spreads a tile column over the banks.
constexpr int kPadAB = 8;
constexpr int kPadC = 4;

enum ScaleKind : int { kScaleOne = 0, kScaleAlpha = 1, kScaleStudent = 2 };

// Element (i, j) of a 2-D operand; the mask, if any, is indexed the same way.
struct Operand {
  const void* data = nullptr;
  int64_t stride_i = 0, stride_j = 0;
  // A bool mask's bytes, read as bytes: any nonzero byte is kept (a bool tensor made from a
  // uint8 buffer may hold 2 or 255, which read as bool would be undefined).
  const uint8_t* mask = nullptr;
  int64_t mask_stride_i = 0, mask_stride_j = 0;
};

struct Segment {  // A [M, k] · B [k, N]
  Operand a, b;
  int64_t k = 0;
  bool a_in_shared = false;  // A is the fused forward's T, held in shared memory (a unused)
};

struct GemmParams {
  int64_t m = 0, n = 0;
  Segment seg[2];
  int num_segments = 1;
  int scale_first = kScaleOne;  // ScaleKind of the first segment's product
  const void* bias[2] = {nullptr, nullptr};  // [n] in the operands' dtype, or null
  int64_t bias_stride[2] = {0, 0};
  int bias_scale[2] = {kScaleOne, kScaleOne};
  const float* alpha = nullptr;  // device scalar; null when no scale reads it
  const void* addend = nullptr;  // [m, n] in the operands' dtype (the fold's teacher weight)
  int64_t addend_stride_i = 0, addend_stride_j = 0;
  int addend_scale = kScaleOne;
  const uint8_t* out_mask = nullptr;  // as Operand::mask
  int64_t out_mask_stride_i = 0, out_mask_stride_j = 0;
  // [m, n] contiguous in the operands' dtype; or, with k_per_split > 0 (one segment only),
  // fp32 partial sums [gridDim.z, m, n], block z covering k in [z·k_per_split, +k_per_split)
  void* out = nullptr;
  int64_t k_per_split = 0;
};

#ifndef TUNECOMP_EMULATE_CUDA
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(32) unsigned char tunecomp_dynamic_shared[];
  return tunecomp_dynamic_shared;
}
#endif

// Asynchronous global -> shared copies (cp.async, sm_80+): a thread's copies are grouped by
// commit_async(); wait_async<n>() returns once at most n of its groups are still in flight.
// Another thread sees the data only after a barrier that follows its writer's wait.
#ifndef TUNECOMP_EMULATE_CUDA
template <int kBytes>
__device__ __forceinline__ void copy_async(void* shared, const void* global) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  if constexpr (kBytes == 16) {  // .cg: bypass L1 (the tiles are read once per block)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(address), "l"(global), "n"(kBytes));
  }
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
#else  // tests/cuda_emulator/cuda_mock.h: copies land at the wait, not before
template <int kBytes>
inline void copy_async(void* shared, const void* global) { emulated_copy_async(shared, global, kBytes); }
inline void commit_async() { emulated_commit_async(); }
template <int kPending>
inline void wait_async() { emulated_wait_async(kPending); }
#endif

template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ float to_float<__half>(__half value) { return __half2float(value); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) {
  return __bfloat162float(value);
}

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16(value);
}

__device__ __forceinline__ float scale_value(int kind, float alpha) {
  if (kind == kScaleAlpha) return alpha;
  // s as sqrt((1 - alpha)(1 + alpha)): 1 - alpha is exact near alpha = 1, 1 - alpha² is not.
  // NaN for alpha outside [-1, 1], as on every backend (a tensor alpha's range is unchecked).
  if (kind == kScaleStudent) return sqrtf((1.0f - alpha) * (1.0f + alpha));
  return 1.0f;
}

// Operand element (i, j); 0 outside [rows, cols) or where the mask is false.
template <typename T>
__device__ __forceinline__ T load_element(const Operand& op, int64_t i, int64_t j, int64_t rows,
                                          int64_t cols) {
  if (i >= rows || j >= cols) return from_float<T>(0.0f);
  if (op.mask != nullptr && op.mask[i * op.mask_stride_i + j * op.mask_stride_j] == 0) {
    return from_float<T>(0.0f);
  }
  return static_cast<const T*>(op.data)[i * op.stride_i + j * op.stride_j];
}

// Tiles are loaded in runs of 16 bytes (8 fp16/bf16 or 4 fp32 elements) along the operand's
// unit-stride dim: one 128-bit load per run where the rows are 16-byte aligned, element by
// element otherwise (odd strides, views, the edges of the problem).
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// The kSize mask bytes of a run as one integer (one byte each; nonzero: kept).
template <typename T>
using MaskBits = std::conditional_t<Pack<T>::kSize == 8, uint64_t, uint32_t>;

struct RunLayout {
  bool along_j;      // runs go along the operand's j (else along i, its unit-stride dim)
  bool vector;       // runs are single 16-byte loads
  bool mask_vector;  // ... and their mask bytes a single MaskBits load
};

template <typename T>
__device__ __forceinline__ RunLayout run_layout(const Operand& op) {
  constexpr int kSize = Pack<T>::kSize;
  RunLayout layout;
  layout.along_j = !(op.stride_i == 1 && op.stride_j != 1);
  const int64_t unit = layout.along_j ? op.stride_j : op.stride_i;
  const int64_t other = layout.along_j ? op.stride_i : op.stride_j;
  // Run starts are multiples of kSize elements along the run (tile origins are multiples of
  // 32), so aligned data and an `other` stride in whole runs keep every run 16-byte aligned;
  // the same for the mask's kSize-byte runs.
  layout.vector = unit == 1 && other % kSize == 0 &&
                  reinterpret_cast<uintptr_t>(op.data) % 16 == 0;
  const int64_t mask_unit = layout.along_j ? op.mask_stride_j : op.mask_stride_i;
  const int64_t mask_other = layout.along_j ? op.mask_stride_i : op.mask_stride_j;
  layout.mask_vector = layout.vector && op.mask != nullptr && mask_unit == 1 &&
                       mask_other % kSize == 0 && reinterpret_cast<uintptr_t>(op.mask) % kSize == 0;
  return layout;
}

// The first (row, col) of run e of a rows x cols tile. Consecutive threads take consecutive
// runs along the unit-stride dim, so the loads coalesce for row- and column-major operands.
template <typename T>
__device__ __forceinline__ void run_position(int e, int rows, int cols, bool along_j, int& r,
                                             int& c) {
  constexpr int kSize = Pack<T>::kSize;
  if (along_j) {
    r = e / (cols / kSize);
    c = (e % (cols / kSize)) * kSize;
  } else {
    r = (e % (rows / kSize)) * kSize;
    c = e / (rows / kSize);
  }
}

// A run's 16 bytes as 32-bit words.
struct alignas(16) Words {
  uint32_t w[4];
};

// A run's mask bytes when every element is kept (byte q nonzero: element q is).
template <typename T>
constexpr MaskBits<T> kAllKept = static_cast<MaskBits<T>>(0x0101010101010101ull);

// Elements (i, j) ... (kSize along the run) of the operand, one by one: 0 outside
// [rows, cols) or where the mask is false (a select: a NaN in a pruned entry stays out). The
// path of the problem's edges and odd strides; whole aligned runs are copied (put_run).
template <typename T>
__device__ __forceinline__ Words load_run_elements(const Operand& op, bool along_j, int64_t i, int64_t j,
                                                   int64_t rows, int64_t cols) {
  const int di = along_j ? 0 : 1, dj = along_j ? 1 : 0;
  Pack<T> elements;
  for (int q = 0; q < Pack<T>::kSize; ++q) elements.v[q] = load_element<T>(op, i + q * di, j + q * dj, rows, cols);
  Words run;
  memcpy(&run, &elements, sizeof(Words));
  return run;
}

// The run with the elements its mask bytes (keep) prune zeroed, word by word: an element's
// bits AND all ones or all zeros, the same as selecting it or +0.
template <typename T>
__device__ __forceinline__ Words kept(const Words& data, MaskBits<T> keep) {
  constexpr int kPerWord = 4 / sizeof(T);
  constexpr uint32_t kElementBits = sizeof(T) == 4 ? 0xffffffffu : 0xffffu;
  Words out;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t keep_bits = 0;
#pragma unroll
    for (int e = 0; e < kPerWord; ++e) {
      const int q = w * kPerWord + e;
      keep_bits |= ((keep >> (8 * q)) & 0xff) != 0 ? kElementBits << (16 * e) : 0u;
    }
    out.w[w] = data.w[w] & keep_bits;
  }
  return out;
}

// fp16 / bf16: tensor cores. Each warp owns a 32 x 32 quarter of the tile as 2 x 2 fragments.
template <typename T>
struct MmaEngine {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ __forceinline__ void zero() {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  // a: the A tile at this K step's first column, lda its leading dim (the staged tile, or
  // the fused forward's T held in shared memory); b: the staged B tile. *_col: the tile is
  // stored transposed (A as [k][m], B as [n][k]), read as wmma col_major fragments.
  __device__ __forceinline__ void step(const T* a, int lda, bool a_col, const T* b, int ldb,
                                       bool b_col) {
    using nvcuda::wmma::col_major;
    using nvcuda::wmma::row_major;
    if (a_col) {
      if (b_col) step_with<col_major, col_major>(a, lda, b, ldb);
      else step_with<col_major, row_major>(a, lda, b, ldb);
    } else {
      if (b_col) step_with<row_major, col_major>(a, lda, b, ldb);
      else step_with<row_major, row_major>(a, lda, b, ldb);
    }
  }

  template <typename ALayout, typename BLayout>
  __device__ __forceinline__ void step_with(const T* a, int lda, const T* b, int ldb) {
    using namespace nvcuda;
    constexpr bool a_col = std::is_same<ALayout, wmma::col_major>::value;
    constexpr bool b_col = std::is_same<BLayout, wmma::col_major>::value;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    for (int kk = 0; kk < kBlockK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
      for (int i = 0; i < 2; ++i) {
        const int m = wm * 32 + i * 16;  // fragment origin (m, kk): A[m][k] or A_t[k][m]
        wmma::load_matrix_sync(fa[i], a_col ? a + kk * lda + m : a + m * lda + kk, lda);
      }
      for (int j = 0; j < 2; ++j) {
        const int n = wn * 32 + j * 16;  // fragment origin (kk, n): B[k][n] or B_t[n][k]
        wmma::load_matrix_sync(fb[j], b_col ? b + n * ldb + kk : b + kk * ldb + n, ldb);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void scale(float s) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        for (int e = 0; e < acc[i][j].num_elements; ++e) acc[i][j].x[e] *= s;
  }

  __device__ __forceinline__ void store(float (*c)[kBlockN + kPadC]) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j],
                                        kBlockN + kPadC, nvcuda::wmma::mem_row_major);
  }
};

// fp32: FMA units. Thread (ty, tx) of a 8 x 16 grid owns rows ty + 8i and columns tx + 16j.
struct FmaEngine {
  float acc[8][4];

  __device__ __forceinline__ void zero() {
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }

  // Row-major tiles only (kTransposedTiles is false for fp32: transposed, the per-k reads
  // below would conflict on the banks instead of the stores).
  __device__ __forceinline__ void step(const float* a, int lda, bool, const float* b, int ldb, bool) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int k = 0; k < kBlockK; ++k) {
      float a_col[8], b_row[4];
      for (int i = 0; i < 8; ++i) a_col[i] = a[(ty + 8 * i) * lda + k];
      for (int j = 0; j < 4; ++j) b_row[j] = b[k * ldb + tx + 16 * j];
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a_col[i], b_row[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void scale(float s) {
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] *= s;
  }

  __device__ __forceinline__ void store(float (*c)[kBlockN + kPadC]) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) c[ty + 8 * i][tx + 16 * j] = acc[i][j];
  }
};

template <typename T>
struct EngineFor {
  using type = MmaEngine<T>;
};
template <>
struct EngineFor<float> {
  using type = FmaEngine;
};

// The pipeline's depth: K tiles in flight (global -> shared, cp.async) while the tensor cores
// multiply an earlier one is kStages - 1. Three stages of bf16/fp16 tiles (14 KiB each) fit
// the 48 KiB of static shared memory; fp32's tiles are twice as large, so two.
template <typename T>
constexpr int kStages = sizeof(T) == 2 ? 3 : 2;

// One pipeline stage: the A and B tiles of a K step and, per run (see run_position), the
// mask bytes of its kSize elements (MaskBits), applied in shared memory once the stage has
// landed. An operand whose 16-byte runs go along its tile rows is stored row-major (A [m][k],
// B [k][n]); one whose runs go down the tile columns (unit stride along m for A, along k for
// B: dyᵀ, xᵀ, Uᵀ, W0ᵀ, Vᵀ) is stored transposed (A [k][m], B [n][k]) on the tensor-core path,
// so its runs are contiguous 16-byte copies instead of eight stores down a column hitting the
// same banks.
template <typename T>
struct StageTiles {
  static constexpr bool kTransposedTiles = sizeof(T) == 2;
  static constexpr int kLdA = kBlockK + kPadAB, kLdAT = kBlockM + kPadAB;  // A [m][k], A [k][m]
  static constexpr int kLdB = kBlockN + kPadAB, kLdBT = kBlockK + kPadAB;  // B [k][n], B [n][k]
  static constexpr int kElemsA = kBlockM * kLdA > kBlockK * kLdAT ? kBlockM * kLdA : kBlockK * kLdAT;
  static constexpr int kElemsB = kBlockK * kLdB > kBlockN * kLdBT ? kBlockK * kLdB : kBlockN * kLdBT;
  static constexpr int kRunsA = kBlockM * kBlockK / Pack<T>::kSize / kThreads;  // per thread
  static constexpr int kRunsB = kBlockK * kBlockN / Pack<T>::kSize / kThreads;
  T a[kElemsA];
  T b[kElemsB];
  MaskBits<T> keep_a[kRunsA * kThreads];  // run l of thread tid at l * kThreads + tid
  MaskBits<T> keep_b[kRunsB * kThreads];
};

// The pipeline's stages, and the accumulator tile of the epilogue in the same bytes (it is
// written after the last K step and read before the next mainloop's first copy).
template <typename T>
struct SharedTiles {
  using Stage = StageTiles<T>;
  union {
    Stage stage[kStages<T>];
    float c[kBlockM][kBlockN + kPadC];
  };
};

// Where run (r, c) of a tile (run_position) goes in its stage: the element offset of its
// first element, or -1 where its elements are not contiguous there (fp32 runs down a
// column of a row-major tile: stored one by one).
template <typename T>
__device__ __forceinline__ int run_offset(bool along_j, int r, int c, int ld, int ld_transposed) {
  if (along_j) return r * ld + c;
  return StageTiles<T>::kTransposedTiles ? c * ld_transposed + r : -1;
}

// Puts the run of op at (i, j) into tile (offset from run_offset; -1: element by element at
// rows r.. of column c of the row-major tile with leading dim ld, fp32 only) and its mask
// bytes into keep. Aligned whole runs are copied asynchronously (fp32 runs down a column as
// one copy per element), the mask bytes too where they are contiguous and aligned; the rest
// (the problem's edges, odd strides) is loaded now with the mask applied, and keep says all
// kept.
template <typename T>
__device__ __forceinline__ void put_run(const Operand& op, RunLayout layout, int64_t i, int64_t j,
                                        int64_t rows, int64_t cols, T* tile, int offset, int r,
                                        int c, int ld, MaskBits<T>& keep) {
  constexpr int kSize = Pack<T>::kSize;
  const bool whole = layout.along_j ? (i < rows && j + kSize <= cols) : (j < cols && i + kSize <= rows);
  const T* source = static_cast<const T*>(op.data) + (whole ? i * op.stride_i + j * op.stride_j : 0);
  if (layout.vector && whole) {
    if (offset >= 0) {
      copy_async<16>(tile + offset, source);
    } else if constexpr (sizeof(T) == 4) {  // a run down a column (unit stride along i)
#pragma unroll
      for (int q = 0; q < kSize; ++q) copy_async<4>(tile + (r + q) * ld + c, source + q);
    }
    if (op.mask == nullptr) return;
    const uint8_t* mask = op.mask + i * op.mask_stride_i + j * op.mask_stride_j;
    if (layout.mask_vector) {
      copy_async<sizeof(MaskBits<T>)>(&keep, mask);
    } else {
      const int64_t step = layout.along_j ? op.mask_stride_j : op.mask_stride_i;
      MaskBits<T> bits = 0;
#pragma unroll
      for (int q = 0; q < kSize; ++q) bits |= static_cast<MaskBits<T>>(mask[q * step] != 0) << (8 * q);
      keep = bits;
    }
    return;
  }
  const Words run = load_run_elements<T>(op, layout.along_j, i, j, rows, cols);
  if (offset >= 0) {
    *reinterpret_cast<Words*>(tile + offset) = run;
  } else {
    Pack<T> elements;
    memcpy(&elements, &run, sizeof(Words));
    for (int q = 0; q < kSize; ++q) tile[(r + q) * ld + c] = elements.v[q];
  }
  if (op.mask != nullptr) keep = kAllKept<T>;
}

// Zeroes the pruned elements of a landed run in place (keep: its mask bytes): at offset, or
// (offset -1, fp32) down column c from row r of the row-major tile with leading dim ld.
template <typename T>
__device__ __forceinline__ void mask_run(T* tile, int offset, int r, int c, int ld, MaskBits<T> keep) {
  if (keep == kAllKept<T>) return;
  if (offset >= 0) {
    *reinterpret_cast<Words*>(tile + offset) = kept<T>(*reinterpret_cast<const Words*>(tile + offset), keep);
    return;
  }
#pragma unroll
  for (int q = 0; q < Pack<T>::kSize; ++q) {
    if (((keep >> (8 * q)) & 0xff) == 0) tile[(r + q) * ld + c] = from_float<T>(0.0f);
  }
}

// Accumulates the output tile (m0, n0) of p over its K segments into engine (zeroed by the
// caller), the first segment's product scaled by p.scale_first. A segment with a_in_shared
// reads A from a_shared instead: rows m0.. of a matrix held in shared memory with row stride
// a_shared_ld (the fused forward's T). Begins and ends with a barrier (tiles.c shares the
// stages' bytes).
//
// Pipeline: K tile t goes to stage t % kStages. Before the tensor cores take tile t, tile
// t + kStages - 1 is issued into the stage tile t - 1 used; every thread waits for its own
// copies of tile t (wait_async), a barrier makes them everyone's, the masks are applied to
// the landed runs (each thread its own runs, then a barrier; skipped for an unmasked
// segment), and the step runs from shared memory.
template <typename T, typename Engine>
__device__ __forceinline__ void mainloop(const GemmParams& p, int64_t m0, int64_t n0,
                                         int64_t split, const T* a_shared, int a_shared_ld,
                                         SharedTiles<T>& tiles, Engine& engine, float alpha) {
  using Stage = StageTiles<T>;
  constexpr int kDepth = kStages<T>;
  const int tid = threadIdx.x;
  // The K range of each segment (scalars, not arrays indexed by segment: those would live
  // in local memory); split-K narrows the first (and then only) one. The second segment
  // always starts at 0.
  int64_t begin0 = 0, end0 = p.seg[0].k;
  if (p.k_per_split > 0) {
    begin0 = split * p.k_per_split;
    end0 = begin0 + p.k_per_split < end0 ? begin0 + p.k_per_split : end0;
  }
  const int64_t end1 = p.num_segments > 1 ? p.seg[1].k : 0;
  const int64_t tiles0 = end0 > begin0 ? (end0 - begin0 + kBlockK - 1) / kBlockK : 0;
  const int64_t tiles1 = end1 > 0 ? (end1 + kBlockK - 1) / kBlockK : 0;
  const int64_t total_tiles = tiles0 + tiles1;

  // K tile t (counted over both segments): its segment, first k and end of K.
  auto locate = [&](int64_t t, int& s, int64_t& k0, int64_t& k_end) {
    s = t < tiles0 ? 0 : 1;
    k0 = s == 0 ? begin0 + t * kBlockK : (t - tiles0) * kBlockK;
    k_end = s == 0 ? end0 : end1;
  };

  auto issue = [&](int64_t t) {  // K tile t -> its stage (copies in flight), bounds applied
    int s;
    int64_t k0, k_end;
    locate(t, s, k0, k_end);
    const Segment& seg = p.seg[s];
    Stage& stage = tiles.stage[t % kDepth];
    if (!seg.a_in_shared) {
      const RunLayout la = run_layout<T>(seg.a);
#pragma unroll
      for (int l = 0; l < Stage::kRunsA; ++l) {
        int r, c;
        run_position<T>(tid + l * kThreads, kBlockM, kBlockK, la.along_j, r, c);
        put_run<T>(seg.a, la, m0 + r, k0 + c, p.m, k_end, stage.a,
                   run_offset<T>(la.along_j, r, c, Stage::kLdA, Stage::kLdAT), r, c, Stage::kLdA,
                   stage.keep_a[l * kThreads + tid]);
      }
    }
    const RunLayout lb = run_layout<T>(seg.b);
#pragma unroll
    for (int l = 0; l < Stage::kRunsB; ++l) {
      int r, c;
      run_position<T>(tid + l * kThreads, kBlockK, kBlockN, lb.along_j, r, c);
      put_run<T>(seg.b, lb, k0 + r, n0 + c, k_end, p.n, stage.b,
                 run_offset<T>(lb.along_j, r, c, Stage::kLdB, Stage::kLdBT), r, c, Stage::kLdB,
                 stage.keep_b[l * kThreads + tid]);
    }
  };
  auto apply_masks = [&](int64_t t, const Segment& seg) {  // on this thread's runs of tile t
    Stage& stage = tiles.stage[t % kDepth];
    if (!seg.a_in_shared && seg.a.mask != nullptr) {
      const bool along_j = run_layout<T>(seg.a).along_j;
#pragma unroll
      for (int l = 0; l < Stage::kRunsA; ++l) {
        int r, c;
        run_position<T>(tid + l * kThreads, kBlockM, kBlockK, along_j, r, c);
        mask_run<T>(stage.a, run_offset<T>(along_j, r, c, Stage::kLdA, Stage::kLdAT), r, c, Stage::kLdA,
                    stage.keep_a[l * kThreads + tid]);
      }
    }
    if (seg.b.mask != nullptr) {
      const bool along_j = run_layout<T>(seg.b).along_j;
#pragma unroll
      for (int l = 0; l < Stage::kRunsB; ++l) {
        int r, c;
        run_position<T>(tid + l * kThreads, kBlockK, kBlockN, along_j, r, c);
        mask_run<T>(stage.b, run_offset<T>(along_j, r, c, Stage::kLdB, Stage::kLdBT), r, c, Stage::kLdB,
                    stage.keep_b[l * kThreads + tid]);
      }
    }
  };

  __syncthreads();  // the previous epilogue has read tiles.c, whose bytes the stages reuse
  for (int t = 0; t < kDepth - 1; ++t) {
    if (t < total_tiles) issue(t);
    commit_async();  // one group per tile, empty ones included: wait_async counts groups
  }
  for (int64_t t = 0; t < total_tiles; ++t) {
    wait_async<kDepth - 2>();  // this thread's copies of tile t have landed
    __syncthreads();           // ... and everyone's; everyone is past step t - 1
    int s;
    int64_t k0, k_end;
    locate(t, s, k0, k_end);
    const Segment& seg = p.seg[s];
    if ((!seg.a_in_shared && seg.a.mask != nullptr) || seg.b.mask != nullptr) {
      apply_masks(t, seg);
      __syncthreads();
    }
    if (t + kDepth - 1 < total_tiles) issue(t + kDepth - 1);  // into the stage of tile t - 1
    commit_async();
    const Stage& stage = tiles.stage[t % kDepth];
    const bool b_col = Stage::kTransposedTiles && !run_layout<T>(seg.b).along_j;
    const int ldb = b_col ? Stage::kLdBT : Stage::kLdB;
    if (!seg.a_in_shared) {
      const bool a_col = Stage::kTransposedTiles && !run_layout<T>(seg.a).along_j;
      engine.step(stage.a, a_col ? Stage::kLdAT : Stage::kLdA, a_col, stage.b, ldb, b_col);
    } else {
      engine.step(a_shared + k0, a_shared_ld, false, stage.b, ldb, b_col);
    }
    if (t + 1 == tiles0) engine.scale(scale_value(p.scale_first, alpha));
  }
  wait_async<0>();  // only empty groups are left; none may outlive the loop
  __syncthreads();  // every step done before tiles.c is written over the stages
}

// The epilogue of output tile (m0, n0), from the accumulator in tiles.c: biases, output
// mask, then p.out (or the fp32 partial sums of split `split`).
template <typename T>
__device__ __forceinline__ void store_output(const GemmParams& p, int64_t m0, int64_t n0,
                                             int64_t split, const SharedTiles<T>& tiles,
                                             float alpha) {
  const float bias_scale[2] = {scale_value(p.bias_scale[0], alpha),
                               scale_value(p.bias_scale[1], alpha)};
  const float addend_scale = scale_value(p.addend_scale, alpha);
  for (int e = threadIdx.x; e < kBlockM * kBlockN; e += kThreads) {
    const int r = e / kBlockN, c = e % kBlockN;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm >= p.m || gn >= p.n) continue;
    float value = tiles.c[r][c];
    for (int s = 0; s < 2; ++s) {
      if (p.bias[s] != nullptr) {
        value += bias_scale[s] * to_float(static_cast<const T*>(p.bias[s])[gn * p.bias_stride[s]]);
      }
    }
    if (p.addend != nullptr) {
      value += addend_scale *
               to_float(static_cast<const T*>(p.addend)[gm * p.addend_stride_i + gn * p.addend_stride_j]);
    }
    if (p.out_mask != nullptr && p.out_mask[gm * p.out_mask_stride_i + gn * p.out_mask_stride_j] == 0) {
      value = 0.0f;
    }
    if (p.k_per_split > 0) {
      static_cast<float*>(p.out)[(split * p.m + gm) * p.n + gn] = value;
    } else {
      static_cast<T*>(p.out)[gm * p.n + gn] = from_float<T>(value);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) masked_gemm_kernel(const GemmParams p) {
  __shared__ __align__(32) SharedTiles<T> tiles;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBlockN;
  const float alpha = p.alpha != nullptr ? *p.alpha : 0.0f;
  typename EngineFor<T>::type engine;
  engine.zero();
  mainloop<T>(p, m0, n0, blockIdx.z, nullptr, 0, tiles, engine, alpha);
  engine.store(tiles.c);
  __syncthreads();
  store_output<T>(p, m0, n0, blockIdx.z, tiles, alpha);
}

// The fused forward for many tokens: block x takes tokens [64x, 64x + 64), computes their
// T = x·Vm (t.m = N, t.n = rank, scaled by t.scale_first) into shared memory, 64 columns at
// a time, then every output tile of y from it (y's segment with a_in_shared reads T), so T
// never goes to device memory. (The teacher's segment of the blend reads the block's x
// again for every output tile, as the unfused GEMM does; from L2.)
// Dynamic shared memory: 64 rows of t_ld elements, t_ld = rank rounded up to 64, plus 8.
template <typename T>
__global__ void __launch_bounds__(kThreads) fused_lowrank_forward_kernel(const GemmParams t,
                                                                         const GemmParams y,
                                                                         int t_ld) {
  __shared__ __align__(32) SharedTiles<T> tiles;
  T* t_tile = reinterpret_cast<T*>(dynamic_shared_memory());
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const float alpha = t.alpha != nullptr ? *t.alpha : 0.0f;
  typename EngineFor<T>::type engine;
  for (int64_t n0 = 0; n0 < t_ld - kPadAB; n0 += kBlockN) {
    engine.zero();
    mainloop<T>(t, m0, n0, 0, nullptr, 0, tiles, engine, alpha);
    engine.store(tiles.c);
    __syncthreads();
    for (int e = threadIdx.x; e < kBlockM * kBlockN; e += kThreads) {
      const int r = e / kBlockN, c = e % kBlockN;  // columns past the rank hold exact zeros
      t_tile[r * t_ld + n0 + c] = from_float<T>(n0 + c < t.n ? tiles.c[r][c] : 0.0f);
    }
  }
  __syncthreads();
  for (int64_t n0 = 0; n0 < y.n; n0 += kBlockN) {
    engine.zero();
    mainloop<T>(y, m0, n0, 0, t_tile, t_ld, tiles, engine, alpha);
    engine.store(tiles.c);
    __syncthreads();
    store_output<T>(y, m0, n0, 0, tiles, alpha);
  }
}

}  // namespace cuda_kernels
}  // namespace tunecomp
