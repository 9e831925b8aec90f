// Test-only kernels that exercise each CUDA feature the interpret backend emulates,
// each writing a result the test can compute independently.
#include "../../kernels_cu/common/cuconv.cuh"

struct ProbeParams {
  long long n;  // elements / threads the probe covers
};

// out[t*6 + k]: shfl_sync(src = 31 - lane), shfl_down(3), shfl_up(5), shfl_xor(7),
// shfl with width 8 (src 2 in each group), warp_reduce_sum of (lane+1).
template <typename T>
__global__ void probe_shuffles(const ProbeParams p, T* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  const T v = T(100 * blockIdx.x + threadIdx.x);
  const T a = __shfl_sync(0xffffffffu, v, 31 - lane);
  const T b = __shfl_down_sync(0xffffffffu, v, 3);
  const T c = __shfl_up_sync(0xffffffffu, v, 5);
  const T d = __shfl_xor_sync(0xffffffffu, v, 7);
  const T e = __shfl_sync(0xffffffffu, v, 2, 8);
  const T f = warp_reduce_sum(T(lane + 1));
  if (t < p.n) {
    out[t * 6 + 0] = a; out[t * 6 + 1] = b; out[t * 6 + 2] = c;
    out[t * 6 + 3] = d; out[t * 6 + 4] = e; out[t * 6 + 5] = f;
  }
}

// out[t*3 + k]: ballot(lane odd), any(lane == 17), all(lane < 31).
template <typename T>
__global__ void probe_votes(const ProbeParams p, T* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  const unsigned ballot = __ballot_sync(0xffffffffu, lane & 1);
  const int any = __any_sync(0xffffffffu, lane == 17);
  const int all = __all_sync(0xffffffffu, lane < 31);
  if (t < p.n) {
    out[t * 3 + 0] = T(__popc(ballot)); out[t * 3 + 1] = T(any); out[t * 3 + 2] = T(all);
  }
}

// Every thread of every block adds its global index + 1 into out[0] and 1 into out[1].
template <typename T>
__global__ void probe_atomics(const ProbeParams p, T* out) {
  const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (t < p.n) {
    atomicAdd(out, T(t + 1));
    atomicAdd(out + 1, T(1));
  }
}

// A 3-D block reverses its linear thread order through dynamic shared memory, and
// thread 0 publishes the block's sum through a static __shared__ slot; threads also
// record their 3-D index so the mapping can be checked.
template <typename T>
__global__ void probe_shared(const ProbeParams p, T* out) {
  CUCONV_DYNAMIC_SHARED(T, stage);
  __shared__ T block_total;
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  const int me = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  stage[me] = T(me + 1000 * blockIdx.x);
  __syncthreads();
  const T reversed = stage[nthreads - 1 - me];
  if (me == 0) {
    T total = T(0);
    for (int i = 0; i < nthreads; ++i) total += stage[i];
    block_total = total;
  }
  __syncthreads();
  T* o = out + (blockIdx.x * (long long)nthreads + me) * 3;
  o[0] = reversed;
  o[1] = block_total;
  o[2] = T(threadIdx.x * 10000 + threadIdx.y * 100 + threadIdx.z);
}

// A __syncthreads reached by only part of a warp while the rest waits at a warp
// barrier: a deadlock, which the interpret backend must report, not hang on.
template <typename T>
__global__ void probe_deadlock(const ProbeParams p, T* out) {
  if (threadIdx.x < 16) __syncthreads();
  else __syncwarp();
  out[threadIdx.x] = T(p.n);
}
