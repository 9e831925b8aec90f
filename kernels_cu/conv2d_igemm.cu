// conv2d_igemm: conv2d forward (torch.nn.functional.conv2d semantics) as an implicit
// GEMM on the tensor cores, float16 / bfloat16 storage with float32 accumulation.
// Opt-in only (conv2d(..., algorithm="implicit_gemm")); kernels_cu/conv2d.cu stays the
// general path, and this kernel must match its conv2d_fwd.
//
// STATUS: compile-checked for sm_80 / sm_90 and verified on the interpret backend (whose
// mma fallback follows the PTX ISA fragment layout, pinned by tests/kernels/mma_probe.cu);
// NOT YET RUN OR TIMED ON A GPU. A first GPU session should run tests/test_conv2d_igemm.py
// (the probe test first) on the cuda backend before trusting any number.
//
// Layout (contiguous NCHW, G = groups, Cin_g = Cin/G, Cout_g = Cout/G):
//   x [B, Cin, H, W]    w [Cout, Cin_g, KH, KW]    bias [Cout] (nullable)    y [B, Cout, Ho, Wo]
//
// Forward, for output channel o in group g = o / Cout_g:
//   y[b,o,oy,ox] = bias[o] + sum_{c<Cin_g, ky, kx} w[o,c,ky,kx] * x[b, g*Cin_g+c, iy, ix]
//   iy = oy*SH - PH + ky*DH,  ix = ox*SW - PW + kx*DW   (terms outside the image are 0)
// (Gradients: not implemented here; conv2d_backward uses kernels_cu/conv2d.cu.)
//
// GEMM mapping, per group g:  Y_g[m, n] = sum_k A[m, k] * B[k, n]
//   m = (b*Ho + oy)*Wo + ox        M = B*Ho*Wo     (output pixels of the whole batch)
//   n = output channel in group    N = Cout_g
//   k = (c*KH + ky)*KW + kx        K = Cin_g*KH*KW (the filter's flattened order)
//   A[m, k] = x[b, g*Cin_g+c, iy, ix] or 0 outside the image: im2col, gathered on the
//             fly into shared memory, never materialised in device memory
//   B[k, n] = w[g*Cout_g + n, c, ky, kx]: each weight row is already K-contiguous,
//             i.e. the ".col" B operand of mma.sync
//
// Tiles and thread mapping (128 threads = 4 warps per block):
//   block tile 64 (M) x 64 (N), K walked in steps of BK = 32; work items are
//   (group, m tile, n tile) with the n tile fastest, walked by a grid-stride loop.
//   Per BK step the block stages A as a_tile[64][32+8] and B as b_tile[64][32+8]
//   (both K-contiguous, rows padded by 8 elements = 16 bytes so that the fragment
//   loads of a warp, rows g = 0..7 x pairs t = 0..3, hit 32 distinct banks):
//     A gather: thread tid owns pixel row tid % 64 (its b, oy, ox decoded once per
//       tile) and k = tid/64 + 2i, i < 16: consecutive threads read consecutive pixels,
//       i.e. consecutive ox of one input row, coalesced for stride 1.
//     B load: thread tid owns k = tid % 32 and rows n = tid/32 + 4i, i < 16: K-contiguous,
//       coalesced along each weight row.
//   Out-of-range m, n, k (edge tiles, K not a multiple of 32) and padding taps are
//   staged as 0, so every mma runs unmasked; the epilogue masks the stores.
//   Warp w owns the 32 x 32 sub-tile at (32*(w % 2), 32*(w / 2)) = 2 (M) x 4 (N)
//   m16n8k16 tiles, 32 float accumulators per lane; per BK step 2 k16 slices x 8 mma.
//   Fragment ownership (mma.cuh, PTX ISA m16n8k16 layout), lane = 4*gid + tid4:
//     A regs: a_tile[row0 + gid (+8)][k16 + 2*tid4 (+8) .. +1]
//     B regs: b_tile[col0 + gid][k16 + 2*tid4 (+8) .. +1]
//     D:      acc[mi][ni][2h + j] = Y[row0 + gid + 8h][col0 + 2*tid4 + j]
//   Epilogue: y = from_acc<T>(acc + bias[o]) straight from the accumulator fragments.
// Determinism: every output's K sum runs in the same fixed order (k steps, then the
// mma's own reduction); no atomics, no split-K. Bitwise reproducible for a fixed shape.
// Index math is 64-bit (index_t) throughout.
//
// What should bound it on an H100, and what to try next (all UNMEASURED):
//   - As written it is bound by the A gather, not the tensor cores: scalar 2-byte global
//     loads with a 64-bit div/mod decode of k per element, a full __syncthreads round
//     trip per BK step with no overlap of loads and mma, and 4-byte shared-memory
//     fragment loads. Expect a small fraction of the ~990 dense TFLOP/s (fp16/bf16) peak.
//   - Next steps, roughly in order of payoff: a per-tile (c, ky, kx) -> offset table (or
//     incremental k decode) instead of div/mod; 32-bit indices inside a tile where the
//     host proves they fit; ldmatrix.x4 for fragment loads; cp.async double/triple
//     buffering of both tiles (the B tile and the interior of the A tile are plain
//     16-byte copies); larger tiles (128x128 or 128x256, BK 32/64) with more warps;
//     stores staged through shared memory for coalesced NCHW writes.
//   - For Hopper proper: NHWC (channels-last) activations so that A rows are
//     Cin-contiguous and can be fetched by TMA (cp.async.bulk.tensor, im2col mode) into
//     swizzled shared memory, and wgmma.mma_async (sm_90a) issued per warpgroup with
//     a multi-stage mbarrier pipeline; those need an sm_90a build and a GPU to tune.
#include "common/cuconv.cuh"
#include "common/mma.cuh"

// Every field is a 64-bit integer so the host can pack it as a flat int64 array.
struct Conv2dIgemmParams {
  long long batch, in_channels, in_h, in_w;
  long long out_channels, out_h, out_w;
  long long kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  long long groups;
};

constexpr int kIgemmThreads = 128;                    // 4 warps; the host launches exactly this
constexpr int kIgemmBM = 64, kIgemmBN = 64, kIgemmBK = 32;
constexpr int kIgemmLd = kIgemmBK + 8;                // padded row of a staged tile (elements)

template <typename T>
__global__ void __launch_bounds__(kIgemmThreads)
conv2d_igemm_fwd(const Conv2dIgemmParams p, const T* __restrict__ x, const T* __restrict__ w,
                 const T* __restrict__ bias, T* __restrict__ y) {
  __align__(16) __shared__ T a_tile[kIgemmBM * kIgemmLd];
  __align__(16) __shared__ T b_tile[kIgemmBN * kIgemmLd];
  const index_t cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const index_t taps = p.kernel_h * p.kernel_w, K = cin_g * taps;
  const index_t pixels = p.out_h * p.out_w, M = p.batch * pixels;
  const index_t m_tiles = ceil_div(M, kIgemmBM), n_tiles = ceil_div(cout_g, kIgemmBN);
  const index_t items = p.groups * m_tiles * n_tiles;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gid = lane >> 2, tid4 = lane & 3;
  const int warp_m = 32 * (warp & 1), warp_n = 32 * (warp >> 1);
  const int a_row = tid % kIgemmBM, a_k = tid / kIgemmBM;  // A gather: one pixel row per thread
  const int b_k = tid % kIgemmBK, b_row = tid / kIgemmBK;  // B load: one k column per thread
  const T zero = from_acc<T>(0.0f);

  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t n_tile = item % n_tiles, m_tile = (item / n_tiles) % m_tiles;
    const index_t group = item / (n_tiles * m_tiles);
    const index_t m0 = m_tile * kIgemmBM, n0 = n_tile * kIgemmBN;

    // This thread's gather pixel: decoded once per tile.
    const index_t am = m0 + a_row;
    const bool a_valid = am < M;
    const index_t a_img = a_valid ? am / pixels : 0, a_pix = a_valid ? am % pixels : 0;
    const index_t iy0 = (a_pix / p.out_w) * p.stride_h - p.pad_h;
    const index_t ix0 = (a_pix % p.out_w) * p.stride_w - p.pad_w;
    const T* x_group = x + (a_img * p.in_channels + group * cin_g) * p.in_h * p.in_w;
    const T* w_group = w + group * cout_g * K;

    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;

    for (index_t k0 = 0; k0 < K; k0 += kIgemmBK) {
      __syncthreads();  // the previous step's tiles have been consumed by every warp
#pragma unroll 4
      for (int i = 0; i < kIgemmBM * kIgemmBK / kIgemmThreads; ++i) {
        const int kk = a_k + 2 * i;
        const index_t k = k0 + kk;
        T v = zero;
        if (a_valid && k < K) {
          const index_t c = k / taps, tap = k % taps;
          const index_t iy = iy0 + (tap / p.kernel_w) * p.dilation_h;
          const index_t ix = ix0 + (tap % p.kernel_w) * p.dilation_w;
          if (iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w) v = x_group[(c * p.in_h + iy) * p.in_w + ix];
        }
        a_tile[a_row * kIgemmLd + kk] = v;
      }
#pragma unroll 4
      for (int i = 0; i < kIgemmBN * kIgemmBK / kIgemmThreads; ++i) {
        const int nn = b_row + (kIgemmThreads / kIgemmBK) * i;
        const index_t n = n0 + nn, k = k0 + b_k;
        b_tile[nn * kIgemmLd + b_k] = (n < cout_g && k < K) ? w_group[n * K + k] : zero;
      }
      __syncthreads();

#pragma unroll
      for (int ks = 0; ks < kIgemmBK; ks += 16) {
        mma_reg_t af[2][4], bf[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const T* base = a_tile + (warp_m + 16 * mi + gid) * kIgemmLd + ks + 2 * tid4;
          af[mi][0] = mma_load_pair(base);                     // A[gid][2t..]
          af[mi][1] = mma_load_pair(base + 8 * kIgemmLd);      // A[gid+8][2t..]
          af[mi][2] = mma_load_pair(base + 8);                 // A[gid][2t+8..]
          af[mi][3] = mma_load_pair(base + 8 * kIgemmLd + 8);  // A[gid+8][2t+8..]
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const T* base = b_tile + (warp_n + 8 * ni + gid) * kIgemmLd + ks + 2 * tid4;
          bf[ni][0] = mma_load_pair(base);      // B[2t..][gid]
          bf[ni][1] = mma_load_pair(base + 8);  // B[2t+8..][gid]
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_m16n8k16<T>(acc[mi][ni], af[mi], bf[ni]);
      }
    }

    // Epilogue: acc[mi][ni][2h + j] is Y[m0 + warp_m + 16mi + gid + 8h][n0 + warp_n + 8ni + 2tid4 + j].
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const index_t m = m0 + warp_m + 16 * mi + gid + 8 * h;
        if (m >= M) continue;
        const index_t img = m / pixels, pix = m % pixels;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const index_t n = n0 + warp_n + 8 * ni + 2 * tid4 + j;
            if (n >= cout_g) continue;
            const index_t o = group * cout_g + n;
            float v = acc[mi][ni][2 * h + j];
            if (bias != nullptr) v += to_acc(bias[o]);
            y[(img * p.out_channels + o) * pixels + pix] = from_acc<T>(v);
          }
        }
      }
    }
  }
}
