// Warp-level tensor-core helpers: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
// and mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (sm_80+), ldmatrix.x4 (sm_75+), and the
// register packing and tf32 rounding they need. On the GPU each helper is one inline PTX
// instruction; under CUCONV_INTERPRET (the host emulation, which has no PTX) a fallback in
// cuconv_mma_host reproduces the instruction's result with the SAME per-lane fragment layout,
// gathering the warp's fragments with __shfl_sync (slow, exact in layout), so that a kernel's
// fragment indexing is exercised on the host exactly as the GPU runs it. tests/kernels/mma_probe.cu
// checks every helper against the layouts below (on the GPU, the instruction against them too).
//
// Fragment layout: PTX ISA, section "Matrix Fragments for mma.m16n8k16 with floating
// point type" (9.7.14.5.8 in PTX ISA 8.x, docs.nvidia.com/cuda/parallel-thread-execution,
// figures "MMA .m16n8k16 fragment layout for matrix A / B / accumulator C/D with .f16 /
// .bf16 type"). With lane = %laneid, g = lane >> 2 (groupID), t = lane % 4
// (threadID_in_group):
//
//   A (16x16, row-major M x K): 8 elements a0..a7 in four 32-bit registers, register r
//     holding a(2r) in its low 16 bits and a(2r+1) in its high 16 bits:
//       row(ai) = g      for i in {0,1,4,5},   g + 8 for i in {2,3,6,7}
//       col(ai) = 2t + (i & 1)   for i < 4,    2t + (i & 1) + 8 for i >= 4
//     i.e. a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1],
//          a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9].
//   B (16x8, K x N, ".col": each column is K-contiguous): 4 elements b0..b3 in two
//     32-bit registers (b0, b2 in the low halves):
//       row(bi) = 2t + (i & 1) for i < 2,  2t + (i & 1) + 8 for i >= 2;  col(bi) = g
//     i.e. b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g].
//   C, D (16x8 float32): c0..c3,
//       row(ci) = g for i < 2,  g + 8 for i >= 2;  col(ci) = 2t + (i & 1)
//     i.e. c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1].
//
// Numerics: D = A*B + C with float32 accumulation. The fallback forms each element
// as C + sum_k A*B in double (every fp16/bf16 product is exact) and rounds once to
// float; the hardware's internal fp32 summation may differ from it in the last bits of
// the float32 accumulator, far below the fp16/bf16 rounding of a kernel's output.
// Every lane of the warp must call a helper together (it is a warp-wide instruction),
// from a 1-D block (the host fallback takes the lane as threadIdx.x % 32).
//
// TF32: mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (sm_80+), float32 storage.
// Fragment layout: PTX ISA, "Matrix Fragments for mma.m16n8k8" (9.7.14.5.7 in PTX ISA
// 8.x), figures "MMA .m16n8k8 fragment layout for matrix A / B with .tf32 type" and the
// .f32 accumulator. One tf32 element per 32-bit register, g and t as above:
//   A (16x8, row-major M x K): a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
//     (row = g for a0, a2 and g + 8 for a1, a3; col = t for a0, a1 and t + 4 for a2, a3).
//   B (8x8, K x N, ".col"): b0 = B[t][g], b1 = B[t+4][g] (row = t, t + 4; col = g).
//   C, D (16x8 float32): exactly the m16n8k16 layout above.
// Operand rounding: mma_to_tf32(v) is cvt.rna.tf32.f32, i.e. v rounded to 10 explicit
// mantissa bits, to nearest with ties AWAY from zero (an overflow rounds to +-inf), the
// 13 low bits zero; the host fallback does the identical bit operation
// ((bits + 0x1000) & ~0x1fff for finite v; inf and NaN kept). The instruction reads only
// the tf32 bits of an operand (the host fallback masks the 13 low bits too), so callers
// must round with mma_to_tf32 first: feeding raw floats would truncate instead.
// Numerics: tf32 x tf32 products are exact in double; the fallback sums each D element in
// double and rounds once to float (the hardware's fp32 accumulation may differ in the
// last bits, as for f16/bf16).
#pragma once

#include "cuconv.cuh"

#ifdef CUCONV_INTERPRET
#include <cstdint>
#include <cstring>
#endif

typedef unsigned int mma_reg_t;  // one 32-bit fragment register (two 16-bit elements)

// Whether a 16-bit storage type is bfloat16 (else half): it picks the mma instruction's operand type.
template <typename T>
constexpr bool mma_is_bf16 = false;
template <>
constexpr bool mma_is_bf16<__nv_bfloat16> = true;

// The 16 bits of a storage element (__half or __nv_bfloat16).
template <typename T>
__device__ __forceinline__ unsigned short mma_bits(T v) {
  static_assert(sizeof(T) == 2, "a 16-bit storage element");
#ifdef CUCONV_INTERPRET
  unsigned short u;
  std::memcpy(&u, &v, 2);
  return u;
#else
  if constexpr (mma_is_bf16<T>)
    return __bfloat16_as_ushort(v);
  else
    return __half_as_ushort(v);
#endif
}

// A fragment register from two elements: lo -> bits 0..15, hi -> bits 16..31.
template <typename T>
__device__ __forceinline__ mma_reg_t mma_pack(T lo, T hi) {
  return mma_reg_t(mma_bits(lo)) | (mma_reg_t(mma_bits(hi)) << 16);
}

// A fragment register from two consecutive elements p[0], p[1] (p 4-byte aligned):
// the layout above keeps every register's pair adjacent in a K-contiguous array.
template <typename T>
__device__ __forceinline__ mma_reg_t mma_load_pair(const T* p) {
#ifdef CUCONV_INTERPRET
  mma_reg_t r;
  std::memcpy(&r, p, 4);  // little-endian: p[0] in the low half, as on the GPU
  return r;
#else
  return *reinterpret_cast<const mma_reg_t*>(p);
#endif
}

#ifdef CUCONV_INTERPRET
namespace cuconv_mma_host {

// The value of the 16-bit element with these bits.
template <typename T>
inline double element(unsigned short bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  return double(to_acc(v));
}

// mma_to_tf32's fallback: the bit operation of cvt.rna.tf32.f32 (header).
inline mma_reg_t tf32_round(float v) {
  mma_reg_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x7fffffu) ? (u | 0x400000u) & 0xffffe000u : u;  // NaN, inf
  return (u + 0x1000u) & 0xffffe000u;  // + half a tf32 unit on the magnitude, then truncate: ties away from zero
}
inline double tf32_value(mma_reg_t r) {  // the operand as the tensor core reads it: its tf32 bits
  r &= 0xffffe000u;
  float f;
  std::memcpy(&f, &r, 4);
  return double(f);
}

// d += A*B for one m16n8kK tile of the warp, on the host, for E elements per fragment register
// (E = 2: m16n8k16 f16/bf16, E = 1: m16n8k8 tf32; K = 8E), value(r, e) being element e of register
// r. Both layouts (above) have the same shape: lane 4g + s holds a[0] = A[g][Es..], a[1] = A[g+8][Es..],
// a[2] = A[g][Es + K/2..], a[3] = A[g+8][Es + K/2..] and, for column n = g, b[0] = B[Es..][n],
// b[1] = B[Es + K/2..][n]. Each lane fetches by __shfl_sync the registers holding the two rows of A
// (g, g+8) and the two columns of B (2t, 2t+1) its D elements need, and sums each in k order in double.
template <int E, typename Value>
inline void mma_m16n8(float (&d)[4], const mma_reg_t (&a)[4], const mma_reg_t (&b)[2], Value value) {
  constexpr int K = 8 * E, kHalf = K / 2;
  const int lane = int(threadIdx.x & 31);  // blockDim.x is a multiple of 32 for these kernels
  const int g = lane >> 2, t = lane & 3;
  double arow[2][K], bcol[2][K];  // arow[h][k] = A[g + 8h][k], bcol[j][k] = B[k][2t + j]
  const unsigned long long a01 = (unsigned long long)a[0] | ((unsigned long long)a[1] << 32);
  const unsigned long long a23 = (unsigned long long)a[2] | ((unsigned long long)a[3] << 32);
  const unsigned long long b01 = (unsigned long long)b[0] | ((unsigned long long)b[1] << 32);
  for (int s = 0; s < 4; ++s) {  // the four lanes 4g + s hold rows g and g+8 of A
    const unsigned long long lo = __shfl_sync(0xffffffffu, a01, 4 * g + s);
    const unsigned long long hi = __shfl_sync(0xffffffffu, a23, 4 * g + s);
    const mma_reg_t r[4] = {mma_reg_t(lo), mma_reg_t(lo >> 32), mma_reg_t(hi), mma_reg_t(hi >> 32)};
    for (int e = 0; e < E; ++e) {
      arow[0][E * s + e] = value(r[0], e);
      arow[1][E * s + e] = value(r[1], e);
      arow[0][E * s + kHalf + e] = value(r[2], e);
      arow[1][E * s + kHalf + e] = value(r[3], e);
    }
  }
  for (int j = 0; j < 2; ++j) {
    for (int s = 0; s < 4; ++s) {  // the four lanes 4n + s (n = 2t + j) hold column n of B
      const unsigned long long v = __shfl_sync(0xffffffffu, b01, 4 * (2 * t + j) + s);
      for (int e = 0; e < E; ++e) {
        bcol[j][E * s + e] = value(mma_reg_t(v), e);
        bcol[j][E * s + kHalf + e] = value(mma_reg_t(v >> 32), e);
      }
    }
  }
  for (int i = 0; i < 4; ++i) {  // d[i] = D[g + 8*(i >> 1)][2t + (i & 1)]
    double sum = double(d[i]);
    for (int k = 0; k < K; ++k) sum += arow[i >> 1][k] * bcol[i & 1][k];
    d[i] = float(sum);
  }
}

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const mma_reg_t (&a)[4], const mma_reg_t (&b)[2]) {
  // element 0 in the low 16 bits, element 1 in the high ones
  mma_m16n8<2>(d, a, b, [](mma_reg_t r, int e) {
    return element<T>((unsigned short)(e == 0 ? r & 0xffffu : r >> 16));
  });
}
inline void mma_m16n8k8_tf32(float (&d)[4], const mma_reg_t (&a)[4], const mma_reg_t (&b)[2]) {
  mma_m16n8<1>(d, a, b, [](mma_reg_t r, int) { return tf32_value(r); });
}

}  // namespace cuconv_mma_host
#endif

// cvt.rna.tf32.f32: v rounded to tf32 (ties away from zero), as a fragment register.
__device__ __forceinline__ mma_reg_t mma_to_tf32(float v) {
#ifdef CUCONV_INTERPRET
  return cuconv_mma_host::tf32_round(v);
#else
  mma_reg_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
#endif
}

// One mma.sync.aligned with float32 accumulators d (read and written), A in a[0..3] and B in b[0..1];
// shape_types is the rest of the instruction name. A macro because an asm template must be a literal.
#define CUCONV_MMA_SYNC(shape_types)                                                 \
  asm volatile("mma.sync.aligned." shape_types                                       \
               " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

// d = A*B + d for one m16n8k8 tile (tf32 inputs from mma_to_tf32, f32 accumulators), layout above.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const mma_reg_t (&a)[4], const mma_reg_t (&b)[2]) {
#ifdef CUCONV_INTERPRET
  cuconv_mma_host::mma_m16n8k8_tf32(d, a, b);
#else
  CUCONV_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32");
#endif
}

// d = A*B + d for one m16n8k16 tile (T = __half or __nv_bfloat16 inputs, f32 accumulators), layout above.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const mma_reg_t (&a)[4], const mma_reg_t (&b)[2]) {
  static_assert(sizeof(T) == 2, "m16n8k16 takes 16-bit operands");
#ifdef CUCONV_INTERPRET
  cuconv_mma_host::mma_m16n8k16<T>(d, a, b);
#else
  if constexpr (mma_is_bf16<T>)
    CUCONV_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32");
  else
    CUCONV_MMA_SYNC("m16n8k16.row.col.f32.f16.f16.f32");
#endif
}
#undef CUCONV_MMA_SYNC

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (sm_75+): the warp loads four 8x8 matrices of 16-bit
// elements from shared memory. Semantics (PTX ISA, "Warp-level matrix load instruction: ldmatrix",
// 9.7.14.5.15 in PTX ISA 8.x/9.x): lane 8i + j (i < 4, j < 8) supplies the address of row j of
// matrix i, a 16-byte-aligned run of 8 consecutive elements (16 bytes) in shared memory; every
// lane then receives one 32-bit register per matrix, r[i] = elements 2t and 2t + 1 of row g of
// matrix i (g = lane >> 2, t = lane % 4; the lower-numbered element in the low 16 bits), i.e.
// the 32-bit word t of the row that lane 8i + g addressed. That is exactly the m16n8k16 A
// fragment when the four matrices are A's (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7,
// cols 8-15), (rows 8-15, cols 8-15), and two B fragments (b[0], b[1] of one n8 tile, then of
// the next) when they are B's K-contiguous (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
// (n 8-15, k 8-15). Every lane must call it (warp-wide), with `row` in shared memory.
// Host fallback: each lane fetches, for matrix i, the row pointer of lane 8i + g by __shfl_sync and
// copies word t of it: the same bits the instruction delivers (shared memory is plain host memory
// there, one copy per block, so another lane's pointer is valid in this lane).
#ifdef CUCONV_INTERPRET
namespace cuconv_mma_host {
inline void ldmatrix_x4(mma_reg_t (&r)[4], const void* row) {
  const int lane = int(threadIdx.x & 31);
  const unsigned long long mine = (unsigned long long)reinterpret_cast<uintptr_t>(row);
  for (int i = 0; i < 4; ++i) {
    const unsigned long long src = __shfl_sync(0xffffffffu, mine, 8 * i + (lane >> 2));
    std::memcpy(&r[i], reinterpret_cast<const unsigned char*>(uintptr_t(src)) + 4 * (lane & 3), 4);
  }
}
}  // namespace cuconv_mma_host
#endif

template <typename T>
__device__ __forceinline__ void mma_ldmatrix_x4(mma_reg_t (&r)[4], const T* row) {
  static_assert(sizeof(T) == 2, "ldmatrix .b16 loads 16-bit elements");
#ifdef CUCONV_INTERPRET
  cuconv_mma_host::ldmatrix_x4(r, row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
