// Test-only kernels with planted bugs for the CUCONV_SANITIZE checks (tests/test_sanitize.py).
// Each bug is on a line marked `// BUG: <name>`, which the tests look up; `p.fix` turns
// the bug off, so the same kernel also shows that the correct version is not reported.
#include "../../kernels_cu/common/cuconv.cuh"

struct BugParams {
  long long n;    // elements of `in` and `out`
  long long fix;  // 1: the correct kernel (uninitialized_shared: bit 0 fixes one bug, bit 1 the other)
};

// out[t] = in[t + 2]: reads past the end of `in` in the last two threads.
template <typename T>
__global__ void oob_read(const BugParams p, const T* in, T* out) {
  const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (t >= p.n) return;
  const long long src = p.fix ? t : t + 2;
  out[t] = in[src] * T(2);  // BUG: oob_read
}

// The bound check is off by one: thread n writes one element past the end of `out`.
template <typename T>
__global__ void oob_write(const BugParams p, const T* in, T* out) {
  const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (t > p.n - p.fix) return;
  out[t] = T(t);  // BUG: oob_write
}

// Each thread reads its right neighbour's staged value and then overwrites its own slot:
// without the barrier between the read and the write, the neighbour may see either value.
template <typename T>
__global__ void missing_barrier(const BugParams p, const T* in, T* out) {
  CUCONV_DYNAMIC_SHARED(T, stage);
  const int t = threadIdx.x;
  stage[t] = in[t];
  __syncthreads();
  const T right = stage[(t + 1) % blockDim.x];
  if (p.fix) __syncthreads();
  stage[t] = right * T(2);  // BUG: missing_barrier
  __syncthreads();
  out[t] = stage[t];
}

// The last thread's slot of `stage` is never written (the loop bound is off by one), and
// the static `total` is read without anyone writing it.
template <typename T>
__global__ void uninitialized_shared(const BugParams p, const T* in, T* out) {
  CUCONV_DYNAMIC_SHARED(T, stage);
  __shared__ T total;
  const int t = threadIdx.x;
  if (t < int(blockDim.x) - 1 + (p.fix & 1)) stage[t] = in[t];
  if ((p.fix & 2) && t == 0) total = T(1);
  __syncthreads();
  const T v = stage[blockDim.x - 1 - t];  // BUG: uninitialized_dynamic
  out[t] = v * total;  // BUG: uninitialized_static
}

// Reads a 4-byte value at byte offset 2 of `in`.
template <typename T>
__global__ void misaligned(const BugParams p, const T* in, T* out) {
  const int t = threadIdx.x;
  const char* base = reinterpret_cast<const char*>(in) + (p.fix ? 0 : 2);
  const volatile unsigned* word = reinterpret_cast<const unsigned*>(base) + t;
  out[t] = T(*word);  // BUG: misaligned
}

// Lanes exchange values through shared memory within each warp: __syncwarp orders each
// lane's write before its neighbour's read (warp-synchronous code racecheck must accept).
template <typename T>
__global__ void warp_exchange(const BugParams p, const T* in, T* out) {
  __shared__ T slots[64];
  const int t = threadIdx.x, lane = t & 31;
  slots[t] = T(0);
  __syncthreads();
  slots[t] = in[t];  // BUG: warp_exchange_write
  if (p.fix) __syncwarp();
  out[t] = slots[(t & ~31) + ((lane + 1) & 31)];  // BUG: warp_exchange
}
