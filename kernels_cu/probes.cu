// Fragment probes: one tiny kernel per tensor-core helper of common/mma.cuh that the
// tensor-core kernels (conv2d_igemm.cu, depthwise_tc.cu) build on. cuconv/_probes.py runs them
// at the first use of a device and compares each result, exactly, with the answer that
// mma.cuh's documented fragment layouts imply, computed in NumPy. On a GPU that checks the
// instructions against the layouts the host fallbacks emulate; on the interpret backend it
// checks the host fallbacks themselves.
//
// Launch: tiles / 2 blocks of 64 threads (two warps, so that one warp's lanes are not the
// block's first 32 threads, as in the conv kernels); warp w of the grid handles tile w.
// lane = threadIdx.x % 32, g = lane >> 2, t = lane % 4.
//
// probe_mma<T>: d = A B + c for one tile per warp, with the instruction each storage type's
// tensor-core path uses (conv2d_igemm.cu's igemm_mma_step):
//   T = __half, __nv_bfloat16: mma.sync m16n8k16 (K = 16); each fragment register is two
//     K-adjacent elements read by mma_load_pair, as the conv kernels read their tiles:
//       a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//       b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   T = float: mma.sync m16n8k8 .tf32 (K = 8), each element through mma_to_tf32:
//       a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]
//       b[0] = B[t][g], b[1] = B[t+4][g]
//   both: c[i], d[i] = C, D[g + 8 (i >> 1)][2t + (i & 1)] (float32)
//   Arrays: a [tiles, 16, K] (rows of A), bt [tiles, 8, K] (columns of B, K-contiguous: the
//   ".col" operand), c and d [tiles, 16, 8] float32.
//
// probe_fragment_load<T>: how each storage type's operands enter a fragment register.
//   T = __half, __nv_bfloat16: ldmatrix.x4 (mma_ldmatrix_x4). The warp stages src[w] (32 rows
//     of 8 elements) in shared memory; lane l supplies the address of row (5l + 3 + w) % 32, a
//     permutation, so a mix-up of the lanes that supply addresses shows. Lane l receives in
//     register i the 32-bit word l % 4 (elements 2(l % 4) and 2(l % 4) + 1, the first in the
//     low half) of the row that lane 8i + l / 4 supplied, and writes register i to
//     out[w][l][2i..2i+1].
//   T = float: cvt.rna.tf32.f32 (mma_to_tf32): out[w][l][j] = the bits of tf32(src[w][l][j]).
//   Arrays: src, out [tiles, 32, 8] T.
#include "common/cuconv.cuh"
#include "common/mma.cuh"

struct ProbeParams {
  long long tiles;  // one tile per warp, an even count: the grid is tiles / 2 blocks of 64 threads
};

template <typename T>
__global__ void probe_mma(const ProbeParams p, const T* __restrict__ a, const T* __restrict__ bt,
                          const float* __restrict__ c, float* __restrict__ d) {
  constexpr int K = sizeof(T) == 2 ? 16 : 8;
  const long long tile = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* A = a + tile * 16 * K;
  const T* Bt = bt + tile * 8 * K;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = c[tile * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  mma_reg_t af[4], bf[2];
  if constexpr (sizeof(T) == 2) {
    for (int r = 0; r < 4; ++r) af[r] = mma_load_pair(A + (g + 8 * (r & 1)) * K + 2 * t + 8 * (r >> 1));
    for (int r = 0; r < 2; ++r) bf[r] = mma_load_pair(Bt + g * K + 2 * t + 8 * r);
    mma_m16n8k16<T>(acc, af, bf);
  } else {
    for (int r = 0; r < 4; ++r) af[r] = mma_to_tf32(A[(g + 8 * (r & 1)) * K + t + 4 * (r >> 1)]);
    for (int r = 0; r < 2; ++r) bf[r] = mma_to_tf32(Bt[g * K + t + 4 * r]);
    mma_m16n8k8_tf32(acc, af, bf);
  }
  for (int i = 0; i < 4; ++i) d[tile * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = acc[i];
}

template <typename T>
__global__ void probe_fragment_load(const ProbeParams p, const T* __restrict__ src, T* __restrict__ out) {
  const long long tile = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31, warp_in_block = threadIdx.x >> 5;
  const T* row = src + (tile * 32 + lane) * 8;
  mma_reg_t* words = reinterpret_cast<mma_reg_t*>(out + (tile * 32 + lane) * 8);
  if constexpr (sizeof(T) == 2) {
    __align__(16) __shared__ T rows[2][32 * 8];  // each warp's 32 rows, 16 bytes apart
    T* staged = rows[warp_in_block];
    for (int j = 0; j < 8; ++j) staged[lane * 8 + j] = row[j];
    __syncthreads();
    mma_reg_t r[4];
    mma_ldmatrix_x4(r, staged + (5 * lane + 3 + int(tile % 32)) % 32 * 8);
    for (int i = 0; i < 4; ++i) words[i] = r[i];
  } else {
    for (int j = 0; j < 8; ++j) words[j] = mma_to_tf32(row[j]);
  }
}
