// Shared device code for every cuconv kernel: storage/accumulator types, index
// helpers, dynamic shared memory and deterministic reductions. Compiled by NVRTC for
// the `cuda` backend and by the host compiler (with cuconv/interpret/cuda_emulation.h)
// for the `interpret` backend, so nothing here may use a CUDA feature the emulation
// header lacks; inline PTX goes behind a function with a host fallback.
#pragma once

#ifndef CUCONV_INTERPRET
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

// 64-bit everywhere a tensor index can exceed 2**31 elements.
typedef long long index_t;

// Storage type -> accumulator type: float32 accumulation for the 16-bit types and
// float, float64 for double.
template <typename T> struct Accumulator { typedef float type; };
template <> struct Accumulator<double> { typedef double type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename Accumulator<T>::type v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

__device__ __forceinline__ index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
__device__ __forceinline__ index_t min_index(index_t a, index_t b) { return a < b ? a : b; }

// The launch's dynamic shared memory as an array of T. On the GPU it is the usual
// extern __shared__ array; the interpret backend hands out its per-block buffer.
#ifdef CUCONV_INTERPRET
#define CUCONV_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::cuconv_emu::dynamic_shared_memory())
#else
#define CUCONV_DYNAMIC_SHARED(T, name)                                 \
  extern __shared__ __align__(16) unsigned char cuconv_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(cuconv_dynamic_smem)
#endif

template <typename Acc>
__device__ __forceinline__ Acc warp_reduce_sum(Acc v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of one value per thread; the result is valid in thread 0. The summation
// order depends only on blockDim.x, so a fixed launch shape gives bitwise-identical
// results run to run. blockDim.x must be a multiple of 32 (at most 1024); every
// thread of the block must call it.
template <typename Acc>
__device__ Acc block_reduce_sum(Acc v) {
  __shared__ Acc warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce_sum(v);
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : Acc(0);
  if (warp == 0) v = warp_reduce_sum(v);
  return v;
}
