// Test-only kernels whose memory-access profile is known by hand (tests/test_profile.py).
//
// strided_copy<T>: out[t] = in[t * stride], one element per thread, 32 threads per block.
//   Global loads of one warp touch 32 floats `stride` floats apart: 4 sectors per request
//   at stride 1 (128 contiguous bytes), 32 at stride >= 8 (one sector per lane).
//   The stores are always contiguous: 4 sectors per request.
// shared_stride<T>: each lane writes tile[lane * stride], waits at a barrier, and reads
//   the same word back into out[t]. A word's bank is its index mod 32, so the lanes of a
//   warp meet gcd(stride, 32)-fold in one bank: 1 wavefront at strides 1 and 33, 32 at
//   stride 32.
struct ProfileProbeParams {
  long long n;       // elements of out (threads)
  long long stride;  // in elements
};

template <typename T>
__global__ void strided_copy(const ProfileProbeParams p, const T* in, T* out) {
  const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (t < p.n) out[t] = in[t * p.stride];
}

template <typename T>
__global__ void shared_stride(const ProfileProbeParams p, const T* in, T* out) {
  __shared__ T tile[32 * 33];
  const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  tile[lane * p.stride] = in[t];
  __syncthreads();
  out[t] = tile[lane * p.stride];
}
