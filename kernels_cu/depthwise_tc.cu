// depthwise_tc: depthwise conv2d (groups == in_channels, any multiplier M = Cout / C) at
// stride 1 and dilation 1 on the tensor cores, forward, input gradient and weight gradient,
// float16 / bfloat16 storage with float32 accumulation (mma.sync m16n8k16, common/mma.cuh).
// Meant for large kernels (k >= 9 up to RepLKNet's 31); correct for any k >= 1. The host
// side is cuconv/ops/depthwise_tc.py; the CUDA-core kernels of kernels_cu/depthwise.cu
// stay the general path. Design note (FLOP inflation, why it should pay, GPU to-do list):
// docs/kernels/depthwise.md, section "Tensor-core path".
//
// STATUS: compile-checked for sm_80 / sm_90 and verified on the interpret backend (whose
// mma fallback follows the PTX fragment layout, pinned by tests/kernels/mma_probe.cu);
// NOT YET RUN OR TIMED ON A GPU.
//
// Layout (contiguous NCHW, output channel o reads input channel o / M):
//   x [B, C, H, W]   w [Cout, 1, KH, KW]   bias [Cout] (nullable)   y [B, Cout, Ho, Wo]
// Forward (stride 1, dilation 1, PH / PW the top / left padding; terms outside are 0):
//   y[b,o,oy,ox] = bias[o] + sum_{ky,kx} w[o,0,ky,kx] * x[b, o/M, oy - PH + ky, ox - PW + kx]
// Gradients, gy = dL/dy:
//   dL/dx[b,c,iy,ix] = sum_{m<M,ky,kx} w[c*M+m,0,ky,kx] * gy[b, c*M+m, iy + PH - ky, ix + PW - kx]
//                    = the forward's correlation of gy with w rotated by 180 degrees
//                      (w'[ky,kx] = w[KH-1-ky, KW-1-kx]) and padding PH' = KH-1-PH, PW' = KW-1-PW
//   dL/dw[o,0,ky,kx] = sum_{b,oy,ox} gy[b,o,oy,ox] * x[b, o/M, oy - PH + ky, ox - PW + kx]
//   dL/dbias[o]      = sum_{b,oy,ox} gy[b,o,oy,ox]   (conv2d.cu's conv2d_bwd_bias)
//
// FORWARD / INPUT GRADIENT as banded (Toeplitz) GEMMs, one (plane, TH x TW tile) per block
// item. For the forward, with a halo tile X staged from row oy0 - PH, column ox0 - PW:
//   Y[m, n] += sum_k X[m + ky, k] * T_ky[k, n]     for each ky < KH, in fp32
//   m = oy - oy0 (M = TH, 16 per mma row block), n = ox - ox0 (N = TW, 8 per mma),
//   k = halo column (K = TW + KW - 1, staged as span = that rounded up to 16 columns)
//   T_ky[k, n] = w[ky, k - n] for 0 <= k - n < KW, else 0: a band of KW diagonals built
//   from ONE weight row. The A operand is the halo itself (row m + ky is K-contiguous:
//   the ky shift is a row offset, no im2col); the B operand's column n is the weight row
//   shifted down by n, read from a zero-margined copy wz[i + 16] = w[ky, i] in shared
//   memory. A fragment register holds B[k][n], B[k+1][n] = wz[k-n], wz[k-n+1]: 4-byte
//   aligned only when k - n is even, so the row is staged twice, w_even[u] = wz(u - 16)
//   and w_odd[u] = wz(u - 17), and lanes with odd n (gid odd; n0 is a multiple of 8) read
//   the odd copy at u = k - n + 17 (even). Band skipping: for the n block [n0, n0 + 8) only
//   k in [n0, n0 + 7 + KW) is nonzero, so each warp walks only the k16 steps that meet
//   that range (warp-uniform test): ceil-ish((KW + 7) / 16) steps instead of span / 16.
//   The input gradient is the same code on the gy plane(s), with the weights staged
//   rotated and the halo origin at (iy0 - PH', ix0 - PW'); for M > 1 the M planes
//   c*M + m are accumulated in the same fp32 registers one after the other.
// Thread mapping: 32 * (TH/16) * (TW/32) threads; warp w owns output rows
//   16 * (w % (TH/16)) ... + 15 and columns 32 * (w / (TH/16)) ... + 31 = four n blocks,
//   4 x 4 fp32 accumulators per lane. Fragment ownership (mma.cuh), lane = 4*gid + tid4:
//     A regs: halo[(m0 + ky + gid (+8)) * pitch + k0 + 2*tid4 (+8) .. +1]
//     B regs: w_{even|odd}[ky * wlen + k0 + 2*tid4 (+8) - n + 16 (+1)], n = n0 + gid
//     D:      acc[s][2h + j] = Y[m0 + gid + 8h][n_base + 8s + 2*tid4 + j]
//   Shared memory (storage type T): halo [(TH + KH - 1) x pitch], pitch = span + 8
//   (pitch/2 words = 4 mod 8 banks: the 8 rows x 4 pairs of a fragment load hit 32 banks),
//   then w_even and w_odd [KH x wlen], wlen = KW + 40 rounded up to even.
//
// WEIGHT GRADIENT (depthwise_tc_bwd_weight), per channel o, for each TH x TW tile of gy
// (output rows oy0.., columns ox0..) with the x halo X staged from (oy0 - PH, ox0 - PW):
//   G[ky, kx] += sum_{r < TH} sum_j X[r + ky, j] * gy[oy0 + r, ox0 + j - kx]
//   a GEMM with M = ky (KH padded to 16), N = kx (KW padded to 8), K = (r, j), j < span:
//   A[ky, (r, j)] = X[r + ky, j] (the halo row r + ky, K-contiguous again) and
//   B[(r, j), kx] = gy tile row r shifted by kx, 0 outside the tile (a Hankel / Toeplitz
//   band: nonzero for 0 <= j - kx < TW). B is read like the forward's weights: the gy
//   tile row is staged twice with zero margins, g_even[r][u] = gyt(r, u - 16) and
//   g_odd[r][u] = gyt(r, u - 17), and odd kx (gid odd) read the odd copy. Only the k16
//   steps meeting [n0, n0 + 7 + TW) are walked for the n block [n0, n0 + 8).
//   Work item = (o, chunk): the B * ceil(Ho/TH) * ceil(Wo/TW) tiles of the batch, in
//   (b, tile row, tile column) order, are cut into p.chunks chunks of p.tiles_per_chunk
//   consecutive tiles (fixed by the shape). Warp w takes tile rows r = w, w + warps, ...
//   and the (ky block, kx block) pairs of the pass (<= 8 per pass, 8 x 4 accumulators
//   per lane; more than 8 pairs, i.e. k > 32, take further passes over the chunk). At the
//   end of the chunk every warp writes its fragments to shared memory (aliasing the
//   staged tiles) and the block adds them in warp order into ws[chunk, o, ky*KW + kx]
//   (fp32). depthwise_tc_reduce_chunks adds the chunks in chunk order. No atomics: every
//   sum has a fixed order given by the shape, so results are bitwise reproducible.
//   Shared memory: X [(TH + KHp - 1) x pitch] (KHp = KH rounded up to 16), g_even and
//   g_odd [TH x gpitch] (gpitch = span + 24), all T; the reduction buffer
//   [warps x 8 x 32 x 4] floats reuses the same bytes.
// Edges: everything staged outside the tensor (and every padded row / column) is 0, so
// every mma runs unmasked; stores are masked. Blocks walk their items with a grid-stride
// loop. Offsets into global tensors are 64-bit; offsets inside shared tiles are 32-bit.
#include "common/mma.cuh"

// Zero columns staged left of a weight row / gy tile row (see the header): even, >= 15.
constexpr int DWTC_MARGIN = 16;
// (ky block, kx block) accumulator tiles one weight-gradient warp holds per pass.
constexpr int DWTC_WGRAD_PAIRS = 8;

// One struct for all kernels; every field is a 64-bit integer (the host packs it).
struct DepthwiseTcParams {
  long long batch, in_channels, in_h, in_w;
  long long out_channels, out_h, out_w;
  long long kernel_h, kernel_w, pad_h, pad_w;
  long long multiplier;       // Cout / C
  long long tile_h, tile_w;   // pixels of a block item's tile (output; input for bwd_input)
  long long span;             // staged halo columns: tile_w + kernel_w - 1 rounded up to 16
  long long pitch;            // halo row pitch (elements), span + 8
  long long wlen;             // fwd / bwd_input: weight row copy length; bwd_weight: gy row pitch
  long long halo_rows;        // staged halo rows
  long long chunks;           // bwd_weight: chunks of the tile range (workspace rows)
  long long tiles_per_chunk;  // bwd_weight: consecutive tiles per chunk
};

// Stages an h x w window of one plane (top-left at (row0, col0), possibly outside it)
// into tile[r * pitch + c] as T, zero outside the plane. Coalesced along columns.
template <typename T>
__device__ __forceinline__ void dwtc_stage(T* tile, const T* __restrict__ plane, index_t rows, index_t cols,
                                           index_t row0, index_t col0, unsigned h, unsigned w, unsigned pitch) {
  const T zero = from_acc<T>(0.0f);
  for (unsigned e = threadIdx.x; e < h * w; e += blockDim.x) {
    const unsigned r = e / w, c = e % w;
    const index_t gr = row0 + r, gc = col0 + c;
    tile[r * pitch + c] = (gr >= 0 && gr < rows && gc >= 0 && gc < cols) ? plane[gr * cols + gc] : zero;
  }
}

// The two zero-margined copies of every weight row (rotated by 180 degrees when `flip`):
// w_even[ky * wlen + u] = w'[ky, u - 16], w_odd[ky * wlen + u] = w'[ky, u - 17].
template <typename T>
__device__ __forceinline__ void dwtc_stage_weights(T* w_even, T* w_odd, const T* __restrict__ wp, int kh, int kw,
                                                   unsigned wlen, bool flip) {
  const T zero = from_acc<T>(0.0f);
  for (unsigned e = threadIdx.x; e < unsigned(kh) * wlen; e += blockDim.x) {
    const int ky = int(e / wlen), u = int(e % wlen);
    const int row = flip ? kh - 1 - ky : ky;
#pragma unroll
    for (int copy = 0; copy < 2; ++copy) {
      const int i = u - DWTC_MARGIN - copy;
      const T v = (i >= 0 && i < kw) ? wp[row * kw + (flip ? kw - 1 - i : i)] : zero;
      (copy ? w_odd : w_even)[e] = v;
    }
  }
}

// acc[s] += the warp's 16 x 32 block of sum_ky X[m + ky, :] @ T_ky (see the header):
// rows m0 .. m0+15, columns n_base + 8s .. + 7.
template <typename T>
__device__ __forceinline__ void dwtc_toeplitz_accumulate(float (&acc)[4][4], const T* halo, const T* w_even,
                                                         const T* w_odd, int kh, int kw, unsigned pitch,
                                                         unsigned wlen, int m0, int n_base, int gid, int tid4) {
  const int k_end = n_base + 24 + 7 + kw;  // the last n block's band ends there
  for (int ky = 0; ky < kh; ++ky) {
    const T* arow = halo + unsigned(m0 + ky + gid) * pitch + 2 * tid4;
    // lanes with odd n = n0 + gid read the odd copy, 1 further on (even index)
    const T* wrow = ((gid & 1) ? w_odd + 1 : w_even) + unsigned(ky) * wlen + DWTC_MARGIN + 2 * tid4 - gid;
    for (int k0 = n_base; k0 < k_end; k0 += 16) {
      mma_reg_t a[4];
      a[0] = mma_load_pair(arow + k0);              // A[gid][k0 + 2t ..]
      a[1] = mma_load_pair(arow + 8 * pitch + k0);  // A[gid + 8][..]
      a[2] = mma_load_pair(arow + k0 + 8);          // A[gid][k0 + 2t + 8 ..]
      a[3] = mma_load_pair(arow + 8 * pitch + k0 + 8);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int n0 = n_base + 8 * s;
        if (k0 + 16 <= n0 || k0 >= n0 + 7 + kw) continue;  // the step misses this block's band
        const T* b = wrow + (k0 - n0);                          // wz[k0 + 2t - n0 - gid]
        mma_reg_t bf[2];
        bf[0] = mma_load_pair(b);
        bf[1] = mma_load_pair(b + 8);
        mma_m16n8k16<T>(acc[s], a, bf);
      }
    }
  }
}

// Writes the warp's 16 x 32 block (+ bias) to the plane `out` (rows x cols), masked.
template <typename T>
__device__ __forceinline__ void dwtc_store(const float (&acc)[4][4], T* __restrict__ out, index_t rows, index_t cols,
                                           index_t row0, index_t col0, float bias, int gid, int tid4) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const index_t r = row0 + gid + 8 * (q >> 1), c = col0 + 8 * s + 2 * tid4 + (q & 1);
      if (r < rows && c < cols) out[r * cols + c] = from_acc<T>(acc[s][q] + bias);
    }
  }
}

template <typename T>
__global__ void depthwise_tc_fwd(const DepthwiseTcParams p, const T* __restrict__ x, const T* __restrict__ w,
                                 const T* __restrict__ bias, T* __restrict__ y) {
  CUCONV_DYNAMIC_SHARED(T, smem);
  const int kh = int(p.kernel_h), kw = int(p.kernel_w);
  const unsigned pitch = unsigned(p.pitch), wlen = unsigned(p.wlen);
  T* halo = smem;                                      // [halo_rows][pitch]
  T* w_even = halo + unsigned(p.halo_rows) * pitch;    // [kh][wlen]
  T* w_odd = w_even + unsigned(kh) * wlen;             // [kh][wlen]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tid4 = lane & 3;
  const int row_blocks = int(p.tile_h) / 16;
  const int m0 = 16 * (warp % row_blocks), n_base = 32 * (warp / row_blocks);
  const index_t tiles_x = ceil_div(p.out_w, p.tile_w), tiles = ceil_div(p.out_h, p.tile_h) * tiles_x;
  const index_t items = p.batch * p.out_channels * tiles;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t tile = item % tiles, plane = item / tiles;  // plane = b*Cout + o
    const index_t o = plane % p.out_channels, b = plane / p.out_channels;
    const index_t oy0 = (tile / tiles_x) * p.tile_h, ox0 = (tile % tiles_x) * p.tile_w;
    __syncthreads();  // every warp is done with the previous item's tiles
    dwtc_stage_weights(w_even, w_odd, w + o * kh * kw, kh, kw, wlen, false);
    dwtc_stage(halo, x + (b * p.in_channels + o / p.multiplier) * p.in_h * p.in_w, p.in_h, p.in_w, oy0 - p.pad_h,
               ox0 - p.pad_w, unsigned(p.halo_rows), unsigned(p.span), pitch);
    __syncthreads();
    float acc[4][4];
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[s][q] = 0.0f;
    dwtc_toeplitz_accumulate<T>(acc, halo, w_even, w_odd, kh, kw, pitch, wlen, m0, n_base, gid, tid4);
    dwtc_store<T>(acc, y + plane * p.out_h * p.out_w, p.out_h, p.out_w, oy0 + m0, ox0 + n_base,
                  bias != nullptr ? to_acc(bias[o]) : 0.0f, gid, tid4);
  }
}

template <typename T>
__global__ void depthwise_tc_bwd_input(const DepthwiseTcParams p, const T* __restrict__ grad_y,
                                       const T* __restrict__ w, T* __restrict__ grad_x) {
  CUCONV_DYNAMIC_SHARED(T, smem);
  const int kh = int(p.kernel_h), kw = int(p.kernel_w);
  const unsigned pitch = unsigned(p.pitch), wlen = unsigned(p.wlen);
  T* halo = smem;                                      // gy halo [halo_rows][pitch]
  T* w_even = halo + unsigned(p.halo_rows) * pitch;    // rotated weights [kh][wlen]
  T* w_odd = w_even + unsigned(kh) * wlen;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tid4 = lane & 3;
  const int row_blocks = int(p.tile_h) / 16;
  const int m0 = 16 * (warp % row_blocks), n_base = 32 * (warp / row_blocks);
  const index_t tiles_x = ceil_div(p.in_w, p.tile_w), tiles = ceil_div(p.in_h, p.tile_h) * tiles_x;
  const index_t items = p.batch * p.in_channels * tiles;
  // the rotated kernel's padding: gx = correlation of gy with w' from (iy0 - PH', ix0 - PW')
  const index_t pad_h = p.kernel_h - 1 - p.pad_h, pad_w = p.kernel_w - 1 - p.pad_w;
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t tile = item % tiles, plane = item / tiles;  // plane = b*C + c
    const index_t c = plane % p.in_channels, b = plane / p.in_channels;
    const index_t iy0 = (tile / tiles_x) * p.tile_h, ix0 = (tile % tiles_x) * p.tile_w;
    float acc[4][4];
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[s][q] = 0.0f;
    for (index_t m = 0; m < p.multiplier; ++m) {
      const index_t o = c * p.multiplier + m;
      __syncthreads();  // every warp is done with the previous tiles
      dwtc_stage_weights(w_even, w_odd, w + o * kh * kw, kh, kw, wlen, true);
      dwtc_stage(halo, grad_y + (b * p.out_channels + o) * p.out_h * p.out_w, p.out_h, p.out_w, iy0 - pad_h,
                 ix0 - pad_w, unsigned(p.halo_rows), unsigned(p.span), pitch);
      __syncthreads();
      dwtc_toeplitz_accumulate<T>(acc, halo, w_even, w_odd, kh, kw, pitch, wlen, m0, n_base, gid, tid4);
    }
    dwtc_store<T>(acc, grad_x + plane * p.in_h * p.in_w, p.in_h, p.in_w, iy0 + m0, ix0 + n_base, 0.0f, gid, tid4);
  }
}

// Stage 1 of the weight gradient: ws[chunk, o, ky*KW + kx] = the chunk's fp32 partial.
template <typename T>
__global__ void depthwise_tc_bwd_weight(const DepthwiseTcParams p, const T* __restrict__ grad_y,
                                        const T* __restrict__ x, float* __restrict__ ws) {
  CUCONV_DYNAMIC_SHARED(T, smem);
  const int kh = int(p.kernel_h), kw = int(p.kernel_w), th = int(p.tile_h), tw = int(p.tile_w);
  const int span = int(p.span);
  const unsigned pitch = unsigned(p.pitch), gpitch = unsigned(p.wlen);
  T* xh = smem;                                        // x halo [halo_rows][pitch]
  T* g_even = xh + unsigned(p.halo_rows) * pitch;      // gy tile [th][gpitch]
  T* g_odd = g_even + unsigned(th) * gpitch;           // [th][gpitch], shifted by one
  float* red = reinterpret_cast<float*>(smem);         // [warps][pairs][32][4], after the chunk
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tid4 = lane & 3;
  const int warps = int(blockDim.x >> 5);
  const int kx_blocks = (kw + 7) / 8, pairs = ((kh + 15) / 16) * kx_blocks;
  const index_t tiles_y = ceil_div(p.out_h, p.tile_h), tiles_x = ceil_div(p.out_w, p.tile_w);
  const index_t plane_tiles = tiles_y * tiles_x, tiles = p.batch * plane_tiles;
  const index_t items = p.out_channels * p.chunks, taps = p.kernel_h * p.kernel_w;
  const T zero = from_acc<T>(0.0f);
  for (index_t item = blockIdx.x; item < items; item += gridDim.x) {
    const index_t chunk = item % p.chunks, o = item / p.chunks;
    const index_t t_lo = chunk * p.tiles_per_chunk, t_hi = min_index(tiles, t_lo + p.tiles_per_chunk);
    for (int pass = 0; pass < pairs; pass += DWTC_WGRAD_PAIRS) {
      float acc[DWTC_WGRAD_PAIRS][4];
#pragma unroll
      for (int i = 0; i < DWTC_WGRAD_PAIRS; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][q] = 0.0f;
      for (index_t t = t_lo; t < t_hi; ++t) {
        const index_t b = t / plane_tiles, rest = t % plane_tiles;
        const index_t oy0 = (rest / tiles_x) * p.tile_h, ox0 = (rest % tiles_x) * p.tile_w;
        const T* gp = grad_y + (b * p.out_channels + o) * p.out_h * p.out_w;
        __syncthreads();  // every warp is done with the previous tiles (or the reduction buffer)
        dwtc_stage(xh, x + (b * p.in_channels + o / p.multiplier) * p.in_h * p.in_w, p.in_h, p.in_w,
                   oy0 - p.pad_h, ox0 - p.pad_w, unsigned(p.halo_rows), unsigned(span), pitch);
        for (unsigned e = threadIdx.x; e < unsigned(th) * gpitch; e += blockDim.x) {
          const unsigned r = e / gpitch;
          const int u = int(e % gpitch);
#pragma unroll
          for (int copy = 0; copy < 2; ++copy) {
            const int cc = u - DWTC_MARGIN - copy;  // tile column
            const index_t oy = oy0 + r, ox = ox0 + cc;
            const bool inside = cc >= 0 && cc < tw && oy < p.out_h && ox < p.out_w;
            (copy ? g_odd : g_even)[e] = inside ? gp[oy * p.out_w + ox] : zero;
          }
        }
        __syncthreads();
        for (int r = warp; r < th; r += warps) {
#pragma unroll
          for (int i = 0; i < DWTC_WGRAD_PAIRS; ++i) {
            const int pair = pass + i;
            if (pair >= pairs) continue;
            const int ky0 = 16 * (pair / kx_blocks), n0 = 8 * (pair % kx_blocks);
            const T* arow = xh + unsigned(r + ky0 + gid) * pitch + 2 * tid4;
            // B[(r, j), kx] = gyt(r, j - kx), kx = n0 + gid: odd kx read the odd copy, 1 further on
            const T* bsrc = (gid & 1) ? g_odd + 1 : g_even;
            const int bbase = int(unsigned(r) * gpitch) + DWTC_MARGIN + 2 * tid4 - (n0 + gid);  // + j0 >= 1
            const int j_end = n0 + 7 + tw < span ? n0 + 7 + tw : span;
            for (int j0 = n0 & ~15; j0 < j_end; j0 += 16) {
              mma_reg_t a[4], bf[2];
              a[0] = mma_load_pair(arow + j0);
              a[1] = mma_load_pair(arow + 8 * pitch + j0);
              a[2] = mma_load_pair(arow + j0 + 8);
              a[3] = mma_load_pair(arow + 8 * pitch + j0 + 8);
              bf[0] = mma_load_pair(bsrc + (bbase + j0));
              bf[1] = mma_load_pair(bsrc + (bbase + j0 + 8));
              mma_m16n8k16<T>(acc[i], a, bf);
            }
          }
        }
      }
      // the warps' partials, added in warp order (the staged tiles are dead: reuse their bytes)
      __syncthreads();
#pragma unroll
      for (int i = 0; i < DWTC_WGRAD_PAIRS; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) red[((warp * DWTC_WGRAD_PAIRS + i) * 32 + lane) * 4 + q] = acc[i][q];
      __syncthreads();
      for (int e = threadIdx.x; e < DWTC_WGRAD_PAIRS * 128; e += blockDim.x) {
        const int i = e / 128, l = (e / 4) % 32, q = e % 4, pair = pass + i;
        if (pair >= pairs) continue;
        // D fragment element q of lane l: row (l >> 2) + 8*(q >> 1), column 2*(l & 3) + (q & 1)
        const int ky = 16 * (pair / kx_blocks) + (l >> 2) + 8 * (q >> 1);
        const int kx = 8 * (pair % kx_blocks) + 2 * (l & 3) + (q & 1);
        if (ky >= kh || kx >= kw) continue;
        float total = 0.0f;
        for (int v = 0; v < warps; ++v) total += red[v * DWTC_WGRAD_PAIRS * 128 + e];
        ws[(chunk * p.out_channels + o) * taps + ky * kw + kx] = total;
      }
    }
  }
}

// Stage 2: grad_w[e] = sum_{chunk < chunks} ws[chunk, e] in chunk order, e = o*taps + tap.
template <typename T>
__global__ void depthwise_tc_reduce_chunks(const DepthwiseTcParams p, const float* __restrict__ ws,
                                           T* __restrict__ grad_w) {
  const index_t n = p.out_channels * p.kernel_h * p.kernel_w;
  for (index_t e = blockIdx.x * index_t(blockDim.x) + threadIdx.x; e < n; e += index_t(gridDim.x) * blockDim.x) {
    float total = 0.0f;
    for (index_t chunk = 0; chunk < p.chunks; ++chunk) total += ws[chunk * n + e];
    grad_w[e] = from_acc<T>(total);
  }
}
