// CPU stand-ins for the CUDA built-ins and the wmma API that csrc/masked_gemm.cuh uses, so
// the kernel's source runs unchanged on the CPU: each block's threads are OS threads,
// __shared__ arrays are statics (one block runs at a time), __syncthreads is a barrier.
// wmma fragments hold the whole 16 x 16 tile in every thread of the warp, and lane 0 stores
// it; the products are exact in float, as on tensor cores, with fp32 accumulation. The
// alignment rules of load/store_matrix_sync, which the CPU would not enforce, are checked.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define TUNECOMP_EMULATE_CUDA 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static
#define __align__(bytes) __attribute__((aligned(bytes)))

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedDim3 threadIdx;
inline thread_local EmulatedDim3 blockIdx;
inline std::barrier<>* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

// The first misuse of an API whose contract the CPU would not enforce (wmma's alignment
// rules); the launcher turns it into an error after the kernel.
inline std::atomic<const char*> emulated_fault{nullptr};
inline void emulated_require(bool ok, const char* what) {
  const char* none = nullptr;
  if (!ok) emulated_fault.compare_exchange_strong(none, what);
}

inline unsigned char* emulated_dynamic_shared = nullptr;  // set by the launcher per block

// cp.async, emulated so that both orderings a pipeline can get wrong show: the destination is
// poisoned when the copy is issued (all bits set: NaN in every float type), so a copy issued
// into bytes another thread still reads breaks that read; and the data lands only when its
// thread waits for the copy's group, so reading before the wait sees the poison (the
// sources, the op's inputs, do not change during a launch). Per thread, like the hardware's
// groups.
struct EmulatedCopy {
  void* shared;
  const void* global;
  int bytes;
};
inline thread_local std::vector<EmulatedCopy> emulated_open_copies;  // not committed yet
inline thread_local std::deque<std::vector<EmulatedCopy>> emulated_copy_groups;
inline void emulated_copy_async(void* shared, const void* global, int bytes) {
  emulated_require(reinterpret_cast<uintptr_t>(shared) % bytes == 0 &&
                       reinterpret_cast<uintptr_t>(global) % bytes == 0,
                   "cp.async: source or destination not aligned to the copy's size");
  std::memset(shared, 0xff, bytes);
  emulated_open_copies.push_back({shared, global, bytes});
}
inline void emulated_commit_async() {
  emulated_copy_groups.push_back(std::move(emulated_open_copies));
  emulated_open_copies.clear();
}
inline void emulated_wait_async(int pending) {
  while (static_cast<int>(emulated_copy_groups.size()) > pending) {
    for (const EmulatedCopy& copy : emulated_copy_groups.front()) std::memcpy(copy.shared, copy.global, copy.bytes);
    emulated_copy_groups.pop_front();
  }
}
// Whether a thread ended with copies it never waited for (checked by the launcher).
inline bool emulated_copies_outstanding() { return !emulated_open_copies.empty() || !emulated_copy_groups.empty(); }
inline unsigned char* dynamic_shared_memory() { return emulated_dynamic_shared; }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator knows 16x16x16 only");
  static constexpr int num_elements = 256;
  float x[256];  // row-major 16 x 16: A [m][k], B [k][n], C [m][n]
};

// The CUDA programming guide's rules for load/store_matrix_sync: a 256-bit aligned pointer,
// and ldm a multiple of 16 bytes.
inline void check_wmma_pointer(const void* p, unsigned ldm, size_t element_bytes) {
  emulated_require(reinterpret_cast<uintptr_t>(p) % 32 == 0,
                   "wmma load/store_matrix_sync: pointer not 256-bit aligned");
  emulated_require(ldm * element_bytes % 16 == 0,
                   "wmma load/store_matrix_sync: ldm not a multiple of 16 bytes");
}

// Element (r, c) of the 16 x 16 tile at p: p[r·ldm + c] (row_major) or p[r + c·ldm] (col_major).
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>);
  check_wmma_pointer(p, ldm, sizeof(T));
  constexpr bool col = std::is_same_v<Layout, col_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = static_cast<float>(col ? p[r + c * ldm] : p[r * ldm + c]);
}

template <typename T, typename ALayout, typename BLayout>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, ALayout>& a,
                     const fragment<matrix_b, 16, 16, 16, T, BLayout>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) sum += a.x[m * 16 + k] * b.x[k * 16 + n];
      out[m * 16 + n] = sum;
    }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (float& e : f.x) e = value;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  check_wmma_pointer(p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0 || layout != mem_row_major) return;  // lane 0 writes the tile
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[r * 16 + c];
}

}  // namespace wmma
}  // namespace nvcuda
