// Test-only probe of kernels_cu/common/mma.cuh (fp16/bf16 m16n8k16 first; the TF32
// m16n8k8 probe and the cvt.rna.tf32.f32 rounding probe at the end): every warp multiplies its own random
// A (16x16, row-major) by B (16x8, row-major K x N) and adds C (16x8 float32). Each lane
// loads ITS fragments straight from global memory with the layout documented in
// mma.cuh (the PTX ISA's m16n8k16 table), calls mma_m16n8k16<T>, and writes its D
// fragment back with the same layout. The test compares D with A @ B + C, so a fallback
// whose layout differs from the documented one, or a GPU whose instruction differs
// from the fallback, fails.
#include "../../kernels_cu/common/cuconv.cuh"
#include "../../kernels_cu/common/mma.cuh"

struct MmaProbeParams {
  long long tiles;  // matrices in the batch: warp w of the grid handles tile w
};

// a [tiles, 16, 16] T, b [tiles, 16, 8] T, c [tiles, 16, 8] float, d [tiles, 16, 8] float
template <typename T>
__global__ void probe_mma(const MmaProbeParams p, const T* __restrict__ a, const T* __restrict__ b,
                          const float* __restrict__ c, float* __restrict__ d) {
  const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool active = warp < p.tiles;  // every lane still joins the mma (warp-wide)
  const long long tile = active ? warp : 0;
  const T* A = a + tile * 256;
  const T* B = b + tile * 128;
  const float* C = c + tile * 128;
  mma_reg_t af[4], bf[2];
  // a(2r), a(2r+1) in register r: rows g (r = 0, 2) / g+8 (r = 1, 3), cols 2t(+8 for r >= 2)
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
    af[r] = mma_pack(A[row * 16 + col], A[row * 16 + col + 1]);
  }
  // b(2r), b(2r+1) in register r: rows 2t, 2t+1 (+8 for r = 1), column g
  for (int r = 0; r < 2; ++r) {
    const int row = 2 * t + 8 * r;
    bf[r] = mma_pack(B[row * 8 + g], B[(row + 1) * 8 + g]);
  }
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  mma_m16n8k16<T>(acc, af, bf);
  if (active)
    for (int i = 0; i < 4; ++i) d[tile * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = acc[i];
}

// TF32 probe of mma_m16n8k8_tf32 (T = float): a [tiles, 16, 8], b [tiles, 8, 8] (row-major
// K x N), c and d [tiles, 16, 8], all float32. Each lane rounds ITS A and B elements with
// mma_to_tf32 (cvt.rna.tf32.f32) and places them by the PTX ISA m16n8k8 .tf32 table:
//   a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4];  b0 = B[t][g], b1 = B[t+4][g].
// The test compares D with tf32(A) @ tf32(B) + C (exactly, for inputs made to hit ties).
template <typename T>
__global__ void probe_mma_tf32(const MmaProbeParams p, const T* __restrict__ a, const T* __restrict__ b,
                               const float* __restrict__ c, float* __restrict__ d) {
  const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool active = warp < p.tiles;  // every lane still joins the mma (warp-wide)
  const long long tile = active ? warp : 0;
  const T* A = a + tile * 128;
  const T* B = b + tile * 64;
  const float* C = c + tile * 128;
  mma_reg_t af[4], bf[2];
  for (int r = 0; r < 4; ++r) af[r] = mma_to_tf32(A[(g + 8 * (r & 1)) * 8 + t + 4 * (r >> 1)]);
  for (int r = 0; r < 2; ++r) bf[r] = mma_to_tf32(B[(t + 4 * r) * 8 + g]);
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  mma_m16n8k8_tf32(acc, af, bf);
  if (active)
    for (int i = 0; i < 4; ++i) d[tile * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = acc[i];
}

// mma_to_tf32 alone: the bits of cvt.rna.tf32.f32(in[i]) into out[i], i < p.tiles (any 1-D grid).
template <typename T>
__global__ void probe_tf32_round(const MmaProbeParams p, const T* __restrict__ in, T* __restrict__ out) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.tiles;
       i += (long long)gridDim.x * blockDim.x)
    reinterpret_cast<mma_reg_t*>(out)[i] = mma_to_tf32(in[i]);
}

// ldmatrix probe of mma_ldmatrix_x4 (T = __half / __nv_bfloat16): warp w copies src[w] (32 rows x 8
// elements) into shared memory (rows 16 bytes apart), lane l supplies the address of row
// (5l + 3 + w) % 32 (a permutation, so the address-provider mapping matters), and writes its four
// registers to out[w, l, 0..7] (register i as elements 2i (low half), 2i + 1). The test expects the
// PTX ISA rule: register i of lane l = word l % 4 of the row supplied by lane 8i + l / 4.
template <typename T>
__global__ void probe_ldmatrix(const MmaProbeParams p, const T* __restrict__ src, T* __restrict__ out) {
  __align__(16) __shared__ T rows[2][32 * 8];  // one 32 x 8 matrix per warp of the 64-thread block
  const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 1;
  const bool active = warp < p.tiles;  // every lane still joins the ldmatrix (warp-wide)
  const long long tile = active ? warp : 0;
  for (int j = 0; j < 8; ++j) rows[w][lane * 8 + j] = src[(tile * 32 + lane) * 8 + j];
  __syncthreads();
  mma_reg_t r[4];
  mma_ldmatrix_x4(r, &rows[w][((5 * lane + 3 + int(tile)) % 32) * 8]);
  if (active)
    for (int i = 0; i < 4; ++i) reinterpret_cast<mma_reg_t*>(out)[(tile * 32 + lane) * 4 + i] = r[i];
}
